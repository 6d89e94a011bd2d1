import type { Db } from '../db/database.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { RunRoot, RunRow } from '../github/run-store.js';
import { type BuildState, SUCCESS_STATES } from '../scheduler/build-state.js';
import type { SizesByOutput } from './sizes.js';
import { turn } from '../../common/turn.js';

/** One output's sizes, built from one commit of a branch. */
export interface SizePoint {
  repo: string;
  branch: string;
  job: string;
  /** Relative to the job. */
  attr: string;
  output: string;
  system: string;
  commit: string;
  drvPath: string;
  narSize: number;
  closureSize: number;
}

export interface RecordedSizePoint extends SizePoint {
  recordedAt: number;
}

export interface SizeQuery {
  repo: string;
  attr: string;
  branch?: string | undefined;
  job?: string | undefined;
  output?: string | undefined;
  /** Only the newest this many points. */
  limit?: number | undefined;
}

/** An attribute's sizes in the newest recorded build of a branch. */
export interface BranchSizes {
  commit: string;
  recordedAt: number;
  sizes: SizesByOutput;
}

interface Row {
  repo: string;
  branch: string;
  job: string;
  attr: string;
  output: string;
  system: string;
  commit_sha: string;
  drv_path: string;
  nar_size: number;
  closure_size: number;
  recorded_at: number;
}

// Points written per transaction: a push to a nixpkgs branch has some 150,000 (attributes × outputs); between slices
// the event loop serves agents and webhooks.
const RECORD_SLICE = 500;
// Roots whose builds are read between two turns of the event loop.
const POINTS_SLICE = 2_000;

/**
 * Output sizes of a repository's branches over time, per job, attribute and output: what `size_check.base_branch`
 * compares a pull request with, and what `/api/v1/sizes` serves. Unlike sizes read through evaluations, these
 * outlive evaluation retention and know their branch.
 *
 * A series (repository, branch, job, attribute, output) gets a point when the attribute's derivation differs from
 * its newest point's: a commit that leaves the derivation as it was says nothing new, since one derivation's sizes
 * are the same wherever it is built. So a point's commit is the first recorded one with that derivation. The newest
 * `keepPoints` of each series are kept. "Newest" is the order of recording: the base of a pull request opened
 * against an old commit of a branch, built only now, becomes that branch's newest point.
 */
export class SizeHistory {
  private readonly s;

  constructor(
    private readonly db: Db,
    private readonly options: { keepPoints: number },
  ) {
    const series = 'repo = ? AND attr = ? AND branch = ? AND job = ? AND output = ?';
    this.s = {
      newestDrv: db.prepare(
        `SELECT drv_path FROM size_history WHERE ${series} ORDER BY recorded_at DESC, id DESC LIMIT 1`,
      ),
      insert: db.prepare(
        `INSERT OR IGNORE INTO size_history (repo, branch, job, attr, output, system, commit_sha, drv_path, nar_size,
           closure_size, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ),
      prune: db.prepare(
        `DELETE FROM size_history WHERE id IN (SELECT id FROM size_history WHERE ${series}
           ORDER BY recorded_at DESC, id DESC LIMIT -1 OFFSET ?)`,
      ),
      newestCommit: db.prepare(
        `SELECT commit_sha, recorded_at FROM size_history WHERE repo = ? AND attr = ? AND branch = ? AND job = ?
          ORDER BY recorded_at DESC, id DESC LIMIT 1`,
      ),
      ofCommit: db.prepare(
        `SELECT output, nar_size, closure_size FROM size_history
          WHERE repo = ? AND attr = ? AND branch = ? AND job = ? AND commit_sha = ?`,
      ),
      history: db.prepare(
        `SELECT * FROM size_history
          WHERE repo = ? AND attr = ? AND (? IS NULL OR branch = ?) AND (? IS NULL OR job = ?) AND (? IS NULL OR output = ?)
          ORDER BY recorded_at DESC, id DESC LIMIT ?`,
      ),
    };
  }

  /**
   * Adds the points whose derivation is new to their series, and trims each series it added to; returns how many it
   * added. Recording the same points again adds nothing.
   */
  async record(points: readonly SizePoint[], at = Date.now()): Promise<number> {
    let added = 0;
    for (let start = 0; start < points.length; start += RECORD_SLICE) {
      if (start > 0) await turn();
      added += this.db.transaction(() => {
        let n = 0;
        for (const p of points.slice(start, start + RECORD_SLICE)) {
          const key = [p.repo, p.attr, p.branch, p.job, p.output] as const;
          const newest = this.s.newestDrv.get(...key) as { drv_path: string } | undefined;
          if (newest?.drv_path === p.drvPath) continue;
          const inserted = this.s.insert.run(
            p.repo,
            p.branch,
            p.job,
            p.attr,
            p.output,
            p.system,
            p.commit,
            p.drvPath,
            p.narSize,
            p.closureSize,
            at,
          ).changes;
          if (inserted === 0) continue;
          n++;
          this.s.prune.run(...key, this.options.keepPoints);
        }
        return n;
      })();
    }
    return added;
  }

  /** An attribute's points, oldest first: the newest `limit` of those matching the query. */
  history(q: SizeQuery): RecordedSizePoint[] {
    const rows = this.s.history.all(
      q.repo,
      q.attr,
      q.branch ?? null,
      q.branch ?? null,
      q.job ?? null,
      q.job ?? null,
      q.output ?? null,
      q.output ?? null,
      q.limit ?? -1,
    ) as Row[];
    return rows.reverse().map((r) => ({
      repo: r.repo,
      branch: r.branch,
      job: r.job,
      attr: r.attr,
      output: r.output,
      system: r.system,
      commit: r.commit_sha,
      drvPath: r.drv_path,
      narSize: r.nar_size,
      closureSize: r.closure_size,
      recordedAt: r.recorded_at,
    }));
  }

  /** The sizes of every output of an attribute in the newest recorded build of `branch`, if it has one. */
  newestOnBranch(repo: string, branch: string, job: string, attr: string): BranchSizes | undefined {
    const newest = this.s.newestCommit.get(repo, attr, branch, job) as
      { commit_sha: string; recorded_at: number } | undefined;
    if (!newest) return undefined;
    const rows = this.s.ofCommit.all(repo, attr, branch, job, newest.commit_sha) as Array<
      Pick<Row, 'output' | 'nar_size' | 'closure_size'>
    >;
    return {
      commit: newest.commit_sha,
      recordedAt: newest.recorded_at,
      sizes: Object.fromEntries(rows.map((r) => [r.output, { narSize: r.nar_size, closureSize: r.closure_size }])),
    };
  }
}

/** What the points of a run are read from: a BuildStore. */
export interface BuildSizes {
  /** The states of those derivations that have a build row. */
  stateNames(drvPaths: readonly string[]): Map<string, BuildState>;
  /** The outputs of those derivations that have some. */
  outputsOfMany(
    drvPaths: readonly string[],
  ): Map<string, Array<{ name: string; nar_size: number | null; closure_size: number | null }>>;
}

/**
 * The points a finished run learnt of its branch: a push builds a commit of the branch (its head); the base of a pull
 * request or merge group is a commit of the branch it goes to, whose changed attributes were built for the review (the
 * head is not on the branch, yet). Each root of that side that succeeded gives a point per output with known sizes.
 * The builds are read in batches, with a turn of the event loop between them: a push to a branch of nixpkgs' size has
 * 100,000 roots, and reading them one query each held the loop 3 s (bench/sizes).
 */
export async function branchPoints(
  run: Pick<RunRow, 'repo' | 'kind' | 'branch' | 'head_sha' | 'base_sha'>,
  roots: readonly RunRoot[],
  evaluations: { head: CommitEvaluation; base: CommitEvaluation | undefined },
  builds: BuildSizes,
): Promise<SizePoint[]> {
  if (run.branch === null) return [];
  const side = run.kind === 'push' ? 'head' : 'base';
  const evaluation = side === 'head' ? evaluations.head : evaluations.base;
  if (!evaluation) return [];
  const drvs = [...new Set(roots.filter((r) => r.side === side).map((r) => r.drvPath))];
  const outputs = new Map<string, Array<{ name: string; nar_size: number | null; closure_size: number | null }>>();
  for (let i = 0; i < drvs.length; i += POINTS_SLICE) {
    if (i > 0) await turn();
    const states = builds.stateNames(drvs.slice(i, i + POINTS_SLICE));
    const built = [...states].flatMap(([drv, state]) => (SUCCESS_STATES.has(state) ? [drv] : []));
    for (const [drv, list] of builds.outputsOfMany(built)) outputs.set(drv, list);
  }
  const points: SizePoint[] = [];
  for (const job of evaluation.jobs) {
    for (const a of job.attrs) {
      if (!a.drvPath) continue;
      for (const o of outputs.get(a.drvPath) ?? []) {
        if (o.nar_size === null || o.closure_size === null) continue;
        points.push({
          repo: run.repo,
          branch: run.branch,
          job: job.name,
          attr: a.attr,
          output: o.name,
          system: a.system ?? 'unknown',
          commit: evaluation.commit,
          drvPath: a.drvPath,
          narSize: o.nar_size,
          closureSize: o.closure_size,
        });
      }
    }
  }
  return points;
}
