/**
 * The review of a change — what a reviewer reads to decide "should I merge this?". One model, rendered three
 * ways: markdown (check runs, `ekaci review`), JSON (API, `ekaci review --json`) and HTML (web UI). The JSON
 * form is exactly this model.
 */

import type { ChangeSummary } from './change-summary.js';
import type { HeldBack } from './build-limits.js';

export type Change = 'added' | 'removed' | 'changed' | 'unchanged';

export type BuildOutcomeName =
  'succeeded' | 'failed' | 'dependency-failed' | 'timed-out' | 'unbuildable' | 'cancelled' | 'not-built';

/** How a changed attribute's build moved between base and head. */
export type Outcome = 'newly-failing' | 'still-failing' | 'newly-succeeding' | 'still-succeeding';

export interface SideResult {
  drv: string | null;
  eval: 'ok' | 'error';
  error?: string;
  build: BuildOutcomeName;
  /** Not for a system this review builds (meta.platforms, the job's systems): not built on purpose. */
  skipped?: true;
}

export interface OutputSizes {
  output: string;
  base: { narSize: number; closureSize: number } | null;
  head: { narSize: number; closureSize: number } | null;
  narSizeDelta: number | null;
  closureSizeDelta: number | null;
  /** Closure growth in percent of the base closure; null without a base. */
  closureSizePercent: number | null;
  /** The job's size_check.max_increase_percent was exceeded. */
  warning: boolean;
  /**
   * Set when the job's size_check.base_branch names a branch: what `base` is. `branch`: the newest recorded build of
   * that branch with this attribute, from `commit`. `pull-request-base`: the branch has no recorded sizes of it, so
   * `base` is the pull request's base commit (`commit`), as without base_branch.
   */
  baseline?: SizeBaseline;
}

export interface SizeBaseline {
  kind: 'branch' | 'pull-request-base';
  /** The branch size_check.base_branch names (also for `pull-request-base`). */
  branch: string;
  commit: string;
}

export interface DependencyChange {
  name: string;
  /** Versions on each side; [] where the dependency is absent. */
  base: string[];
  head: string[];
  kind: 'added' | 'removed' | 'changed';
}

export interface RootCause {
  drv: string;
  /** The last lines of the root's build log. */
  logTail: string;
}

export interface AttrReview {
  job: string;
  attr: string;
  system: string | null;
  change: Change;
  outcome?: Outcome;
  base?: SideResult;
  head?: SideResult;
  sizes?: OutputSizes[];
  dependencies?: DependencyChange[];
  rootCauses?: RootCause[];
  /**
   * The attribute failed to evaluate on head, and its job's `allow_eval_failures` (the base's, see base-policy) lets
   * that pass: the error is shown, but it does not make the review fail.
   */
  evalFailuresAllowed?: true;
}

export interface Review {
  base: { rev: string };
  head: { rev: string };
  /** The head changes eka-ci's configuration: its gates apply only once merged, and only a writer may merge it. */
  configChanged?: true;
  attrs: AttrReview[];
  /** Counts per outcome, plus `added`, `removed`, `eval-failing` (new evaluation errors) and `size-warnings`. */
  summary: Record<string, number>;
  /** The head's repository checks (`checks.<name>` of its configuration), one per check and system. */
  checks?: CheckResult[];
  /**
   * What the change does to the packages (versions, new and removed packages, license, maintainers, platforms,
   * broken), over every attribute of both evaluations — a meta-only change leaves the drv alike. Absent when none.
   */
  changes?: ChangeSummary;
  /**
   * What the base's build rules held back (a mass rebuild over `max_rebuild_count`, a change touching only
   * `skip_build_paths`): the change was evaluated, but only attributes named by commands and commit titles were
   * built. Absent when nothing was held back, and in a review nobody built.
   */
  heldBack?: HeldBack;
}

/** A repository check on one system, as it stands. */
export interface CheckResult {
  name: string;
  system: string;
  /** `waiting` (for its shell), `queued` and `running` until it ends; then its outcome. */
  state: 'waiting' | 'queued' | 'running' | 'succeeded' | 'failed' | 'timed-out' | 'cancelled' | 'unbuildable';
  /** The command's exit status, when it ran to an exit. */
  exitCode: number | null;
  /** How long the command ran, once it ended. */
  seconds: number | null;
  /** The last lines of its output. */
  logTail: string;
  /** Why it failed beyond its exit code (timeout, output cap, an unbuildable shell), if anything. */
  error: string | null;
}
