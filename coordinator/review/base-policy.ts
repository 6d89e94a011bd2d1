import type { CommitEvaluation, JobEvaluation } from '../eval/repo-evaluation.js';

/**
 * A pull request is judged by the rules of its base, never by its own (ARCHITECTURE.md §7): the head may change
 * what it reports, not how the report is judged. The gates of each job — `allow_eval_failures`,
 * `size_check.max_increase_percent` and `size_check.base_branch` — are the base commit's; a job the head adds gets the strictest ones (no
 * evaluation failure allowed, no size threshold) until it is merged. Without a base (a push to the default branch),
 * the commit's own configuration is the repository's.
 */

export interface JobGates {
  allowEvalFailures: boolean;
  maxIncreasePercent: number | undefined;
  /** `size_check.base_branch`: which branch's sizes the head is measured against. */
  sizeBaseBranch: string | undefined;
}

const STRICT: JobGates = { allowEvalFailures: false, maxIncreasePercent: undefined, sizeBaseBranch: undefined };

export function gatesFor(job: string, head: CommitEvaluation, base: CommitEvaluation | undefined): JobGates {
  const source = base === undefined ? head : base;
  const j = source.jobs.find((x) => x.name === job);
  return j
    ? {
        allowEvalFailures: j.allowEvalFailures,
        maxIncreasePercent: j.maxIncreasePercent,
        sizeBaseBranch: j.sizeBaseBranch,
      }
    : STRICT;
}

/** The head's jobs with the base's gates (see `gatesFor`). */
export function withBaseGates(head: CommitEvaluation, base: CommitEvaluation | undefined): JobEvaluation[] {
  return head.jobs.map((j) => ({ ...j, ...gatesFor(j.name, head, base) }));
}

/** Whether the head changes the repository's eka-ci configuration (then only a writer may merge it). */
export function changesConfig(base: CommitEvaluation | undefined, head: CommitEvaluation): boolean {
  if (base === undefined) return false;
  // An evaluation stored before digests were recorded counts as changed: unknown is not the same.
  return base.configDigest === undefined || head.configDigest === undefined || base.configDigest !== head.configDigest;
}
