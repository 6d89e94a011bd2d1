import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import { diffCommits } from '../graph/commit-diff.js';
import type { DiffStore, StoredJobDiff } from '../graph/diff-store.js';
import type { LogStore } from '../logs/log-store.js';
import type { BuildStore, DerivationRow } from '../scheduler/build-store.js';
import type { CheckResult, Review } from './model.js';
import { changesConfig, gatesFor } from './base-policy.js';
import { type BuildFacts, buildReview } from './review-builder.js';
import { type SizeHistory, branchPoints } from './size-history.js';
import type { RunRoot } from '../github/run-store.js';
import { turn } from '../../common/turn.js';

// Derivations whose build rows are read between two turns of the event loop.
const STATES_SLICE = 5_000;

export interface ReviewSources {
  store: BuildStore;
  logs: LogStore;
  evaluations: EvaluationStore;
  diffs: DiffStore;
  /** A store path's references, from the binary cache; [] when unknown. */
  references(path: string): Promise<string[]>;
  /** The repository checks of a commit, as they stand. */
  checks?(repo: string, commit: string): CheckResult[];
  /** Branches' sizes over time: recorded as runs end, the baseline of `size_check.base_branch`. */
  sizes?: SizeHistory;
}

/**
 * Reviews computed from the database: the evaluations of both commits, their rebuild diff, and whatever the
 * build store knows of each derivation right now. `ekaci review` and the coordinator (API, GitHub summary) use
 * the same code, so a review reads the same wherever it is shown.
 */
export class ReviewService {
  constructor(private readonly sources: ReviewSources) {}

  /** Keeps both evaluations and returns their rebuild diff (stored, so later reviews of the pair reuse it). */
  async record(repo: string, base: CommitEvaluation, head: CommitEvaluation): Promise<StoredJobDiff[]> {
    // Written once: a run has stored what it evaluated already.
    for (const side of [base, head]) {
      if (!this.sources.evaluations.has(repo, side)) await this.sources.evaluations.save(repo, side);
    }
    return this.diff(repo, base, head);
  }

  /**
   * The review of `head` against `base`, or undefined when either commit was never evaluated. `jobs` narrows it
   * to some jobs (all by default). With `recordedOnly` (the API), only a pair a run or `ekaci review` recorded
   * (`record`) has a review: nothing new is diffed or stored for whoever asks. `evaluations`: the two the caller
   * recorded and still holds, which are then not read back from the database (100,000 attributes: a second each).
   */
  async reviewOf(
    repo: string,
    baseCommit: string,
    headCommit: string,
    jobs?: readonly string[],
    options: { recordedOnly?: boolean; evaluations?: { base: CommitEvaluation; head: CommitEvaluation } } = {},
  ): Promise<Review | undefined> {
    if (options.recordedOnly && !this.sources.diffs.has(repo, baseCommit, headCommit)) return undefined;
    const narrow = (e: CommitEvaluation): CommitEvaluation => ({
      commit: e.commit,
      jobs: e.jobs.filter((j) => !jobs?.length || jobs.includes(j.name)),
    });
    const held = options.evaluations;
    const loaded = async (commit: string, side: CommitEvaluation | undefined) => {
      if (side?.commit === commit && this.sources.evaluations.has(repo, side)) return side;
      const e = this.sources.evaluations.load(repo, commit);
      await turn();
      return e;
    };
    const baseEval = await loaded(baseCommit, held?.base);
    const headEval = await loaded(headCommit, held?.head);
    if (!baseEval || !headEval) return undefined;
    const base = narrow(baseEval);
    const head = narrow(headEval);
    const diffs = options.recordedOnly
      ? (this.sources.diffs.load(repo, baseEval, headEval) ?? []).filter((d) => !jobs?.length || jobs.includes(d.name))
      : await this.diff(repo, base, head);
    const { store, logs } = this.sources;
    const rows = await statesOf(store, [base, head]);
    const review = await buildReview({
      baseRev: base.commit,
      headRev: head.commit,
      jobs: diffs.map((d) => ({
        name: d.name,
        // The base's gates: a pull request does not get to loosen the rules it is judged by.
        ...gatesFor(d.name, head, base),
        diff: d,
        base: base.jobs.find((j) => j.name === d.name)?.attrs ?? [],
        head: head.jobs.find((j) => j.name === d.name)?.attrs ?? [],
      })),
      build: (drv) => buildFacts(store, rows.get(drv)),
      logTail: (drv, lines) => {
        const path = store.logPathOf(drv, store.derivation(drv)?.attempts ?? 0);
        return path === undefined ? '' : logs.tail(path, lines);
      },
      references: (path) => this.sources.references(path),
      branchSizes: (branch, job, attr) => this.sources.sizes?.newestOnBranch(repo, branch, job, attr),
    });
    if (changesConfig(baseEval, headEval)) review.configChanged = true;
    const checks = this.sources.checks?.(repo, headCommit) ?? [];
    if (checks.length > 0) review.checks = checks;
    return review;
  }

  /**
   * Records the sizes a finished run built of a commit of its branch (see `branchPoints`): the history `size_check.
   * base_branch` compares with and `/api/v1/sizes` serves.
   */
  async recordSizes(
    run: Parameters<typeof branchPoints>[0],
    roots: readonly RunRoot[],
    evaluations: { head: CommitEvaluation; base: CommitEvaluation | undefined },
  ): Promise<void> {
    if (this.sources.sizes)
      await this.sources.sizes.record(await branchPoints(run, roots, evaluations, this.sources.store));
  }

  /** The diff of each job both evaluations have; jobs never diffed before are diffed now and stored. */
  private async diff(repo: string, base: CommitEvaluation, head: CommitEvaluation): Promise<StoredJobDiff[]> {
    const names = [...new Set([...base.jobs, ...head.jobs].map((j) => j.name))].sort();
    const stored = new Map((this.sources.diffs.load(repo, base, head) ?? []).map((d) => [d.name, d]));
    const missing = names.filter((n) => !stored.has(n));
    if (missing.length > 0) {
      const only = (e: CommitEvaluation): CommitEvaluation => ({
        commit: e.commit,
        jobs: e.jobs.filter((j) => missing.includes(j.name)),
      });
      const fresh = await diffCommits(only(base), only(head));
      this.sources.diffs.save(repo, base.commit, head.commit, fresh);
      for (const d of fresh) stored.set(d.name, d);
    }
    return names.map((n) => stored.get(n)!);
  }
}

/**
 * The build rows of every derivation of the evaluations, read in batches (one query per few hundred, not one per
 * derivation: 40,000 lookups were a third of building a 20,000-attribute review), with a turn of the event loop now
 * and then.
 */
async function statesOf(
  store: BuildStore,
  evaluations: readonly CommitEvaluation[],
): Promise<Map<string, DerivationRow>> {
  const drvs = [
    ...new Set(
      evaluations.flatMap((e) => e.jobs.flatMap((j) => j.attrs.flatMap((a) => (a.drvPath ? [a.drvPath] : [])))),
    ),
  ];
  const rows = new Map<string, DerivationRow>();
  for (let i = 0; i < drvs.length; i += STATES_SLICE) {
    if (i > 0) await turn();
    for (const [drv, row] of store.states(drvs.slice(i, i + STATES_SLICE))) rows.set(drv, row);
  }
  return rows;
}

function buildFacts(store: BuildStore, row: DerivationRow | undefined): BuildFacts | undefined {
  if (!row) return undefined;
  const drv = row.drv_path;
  return {
    state: row.state,
    rootCause: row.root_cause,
    outputs: store.outputsOf(drv).map((o) => ({
      name: o.name,
      path: o.path,
      narSize: o.nar_size,
      closureSize: o.closure_size,
    })),
  };
}
