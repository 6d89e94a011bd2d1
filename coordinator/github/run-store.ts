import type { Db } from '../db/database.js';
import type { HeldBack } from '../review/build-limits.js';

// Dependents walked up from a derivation to find the runs it was built for: a nixpkgs core package has tens of
// thousands; past this many, the repositories found so far answer.
const MAX_DEPENDENTS_WALKED = 50_000;

/**
 * A run evaluates a commit (against a base, for pull requests and merge groups), builds what it needs and
 * reports check runs on the commit.
 *
 * Lifecycle: `queued` → `evaluating` → `building` → `done`; `awaiting-approval` (an outside contributor's pull
 * request, until `@eka-ci approve`); any unfinished state → `cancelled` (the pull request was closed or got a new
 * head, the merge group was destroyed) or `failed` (the commit could not be fetched or evaluated at all). Runs in
 * `queued`, `evaluating` or `building` are resumed from the start after a restart: evaluations are cached and
 * builds already done are not repeated, so resuming costs little.
 */
export type RunState = 'queued' | 'awaiting-approval' | 'evaluating' | 'building' | 'done' | 'cancelled' | 'failed';

export const OPEN_RUN_STATES: ReadonlySet<RunState> = new Set(['queued', 'evaluating', 'building']);

export type RunKind = 'pull_request' | 'push' | 'merge_group';

export interface RunRow {
  id: number;
  repo: string;
  installation_id: number;
  kind: RunKind;
  pr_number: number | null;
  base_sha: string | null;
  head_sha: string;
  base_clone_url: string;
  head_clone_url: string;
  extra_attrs: string;
  rebuild_failed: number;
  state: RunState;
  error: string | null;
  /** 1: the head is code of someone without write access, built only by sandboxed agents. */
  untrusted: number;
  created_at: number;
  updated_at: number;
  /** JSON of a RunSummary, once the run has diffed its commits. */
  summary_json: string | null;
  /** See NewRun.branch; null for runs recorded before branches were. */
  branch: string | null;
  /** JSON of what the base's build rules held back (review/build-limits.ts HeldBack); null: nothing. */
  held_back_json: string | null;
}

/** A run's counts, for lists of pull requests: rebuilds per system once diffed; the review's once built. */
export interface RunSummary {
  rebuildCountBySystem: Record<string, number>;
  /** The review's counts (see Review.summary), once the builds are done. */
  review?: Record<string, number>;
}

export interface NewRun {
  repo: string;
  installationId: number;
  kind: RunKind;
  prNumber?: number;
  baseSha?: string;
  headSha: string;
  baseCloneUrl: string;
  headCloneUrl: string;
  extraAttrs?: readonly string[];
  rebuildFailed?: boolean;
  state?: RunState;
  /** The head is code of someone without write access (see RunRow.untrusted). */
  untrusted?: boolean;
  /** The branch the run's code goes to: the pushed branch, or a pull request's or merge group's base. */
  branch?: string;
}

export interface RepositoryRow {
  full_name: string;
  installation_id: number;
  clone_url: string;
  default_branch: string;
  private: number;
}

export interface PullRequestRow {
  repo: string;
  number: number;
  state: 'open' | 'closed';
  head_sha: string;
  head_clone_url: string;
  base_sha: string;
  base_ref: string;
  author: string;
  author_association: string;
  draft: number;
  approved_by: string | null;
  approved_sha: string | null;
  merge_method: string | null;
  merge_for_sha: string | null;
  merge_by: string | null;
  merge_comment_id: number | null;
  merge_waiting: number;
  title: string;
  updated_at: number;
}

export interface RunRoot {
  side: 'base' | 'head';
  drvPath: string;
  attr: string;
  system: string;
}

/** The GitHub App's durable state: installations, repositories, pull requests, runs and their roots. */
export class RunStore {
  /** `onRun`: a run was created or changed state (the coordinator's event stream). */
  constructor(
    readonly db: Db,
    private readonly onRun: (run: RunRow) => void = () => {},
  ) {}

  upsertInstallation(id: number, app: string, account: string, suspended: boolean): void {
    this.db
      .prepare(
        `INSERT INTO github_installations (installation_id, app, account, suspended, updated_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT (installation_id) DO UPDATE SET app = excluded.app, account = excluded.account,
           suspended = excluded.suspended, updated_at = excluded.updated_at`,
      )
      .run(id, app, account, suspended ? 1 : 0, Date.now());
  }

  installation(id: number): { app: string; account: string; suspended: boolean } | undefined {
    const row = this.db
      .prepare('SELECT app, account, suspended FROM github_installations WHERE installation_id = ?')
      .get(id) as { app: string; account: string; suspended: number } | undefined;
    return row && { app: row.app, account: row.account, suspended: row.suspended === 1 };
  }

  deleteInstallation(id: number): void {
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM github_installations WHERE installation_id = ?').run(id);
      this.db.prepare('DELETE FROM github_repositories WHERE installation_id = ?').run(id);
    })();
  }

  upsertRepository(r: {
    fullName: string;
    installationId: number;
    cloneUrl: string;
    defaultBranch: string;
    private: boolean;
  }): void {
    this.db
      .prepare(
        `INSERT INTO github_repositories (full_name, installation_id, clone_url, default_branch, private, updated_at)
         VALUES (?, ?, ?, ?, ?, ?)
         ON CONFLICT (full_name) DO UPDATE SET installation_id = excluded.installation_id,
           clone_url = excluded.clone_url, default_branch = excluded.default_branch, private = excluded.private,
           updated_at = excluded.updated_at`,
      )
      .run(r.fullName, r.installationId, r.cloneUrl, r.defaultBranch, r.private ? 1 : 0, Date.now());
  }

  removeRepository(fullName: string): void {
    this.db.prepare('DELETE FROM github_repositories WHERE full_name = ?').run(fullName);
  }

  repository(fullName: string): RepositoryRow | undefined {
    return this.db.prepare('SELECT * FROM github_repositories WHERE full_name = ?').get(fullName) as
      RepositoryRow | undefined;
  }

  upsertPullRequest(
    p: Omit<
      PullRequestRow,
      | 'approved_by'
      | 'approved_sha'
      | 'merge_method'
      | 'merge_for_sha'
      | 'merge_by'
      | 'merge_comment_id'
      | 'merge_waiting'
      | 'updated_at'
    >,
  ): void {
    this.db
      .prepare(
        `INSERT INTO github_pull_requests (repo, number, state, head_sha, head_clone_url, base_sha, base_ref, author,
           author_association, draft, title, updated_at)
         VALUES (@repo, @number, @state, @head_sha, @head_clone_url, @base_sha, @base_ref, @author,
           @author_association, @draft, @title, @now)
         ON CONFLICT (repo, number) DO UPDATE SET state = excluded.state, head_sha = excluded.head_sha, title = excluded.title,
           head_clone_url = excluded.head_clone_url, base_sha = excluded.base_sha, base_ref = excluded.base_ref,
           author_association = excluded.author_association, draft = excluded.draft, updated_at = excluded.updated_at`,
      )
      .run({ ...p, now: Date.now() });
  }

  pullRequest(repo: string, number: number): PullRequestRow | undefined {
    return this.db.prepare('SELECT * FROM github_pull_requests WHERE repo = ? AND number = ?').get(repo, number) as
      PullRequestRow | undefined;
  }

  /**
   * A head commit of a pull request and when GitHub says it became the head (ms, GitHub's clock). Seen again
   * later (a command reading the pull request from the API), the earliest time stays.
   */
  recordHead(repo: string, number: number, headSha: string, since: number): void {
    this.db
      .prepare(
        `INSERT INTO github_pull_request_heads (repo, number, head_sha, since) VALUES (?, ?, ?, ?)
         ON CONFLICT (repo, number, head_sha) DO UPDATE SET since = MIN(since, excluded.since)`,
      )
      .run(repo, number, headSha, since);
  }

  /** The head a pull request had just before `at` (ms, GitHub's clock), as far as eka-ci saw; undefined if none. */
  headBefore(repo: string, number: number, at: number): string | undefined {
    const row = this.db
      .prepare(
        `SELECT head_sha FROM github_pull_request_heads WHERE repo = ? AND number = ? AND since < ?
         ORDER BY since DESC LIMIT 1`,
      )
      .get(repo, number, at) as { head_sha: string } | undefined;
    return row?.head_sha;
  }

  /** Heads of a pull request eka-ci has seen whose sha starts with `prefix`. */
  headsMatching(repo: string, number: number, prefix: string): string[] {
    return (
      this.db
        .prepare(
          'SELECT head_sha FROM github_pull_request_heads WHERE repo = ? AND number = ? AND head_sha >= ? AND head_sha < ?',
        )
        .all(repo, number, prefix, `${prefix}\uffff`) as Array<{ head_sha: string }>
    ).map((r) => r.head_sha);
  }

  /** An outside contributor's head commit, approved to build by `@eka-ci approve`. */
  setApproval(repo: string, number: number, approvedBy: string, headSha: string): void {
    this.db
      .prepare('UPDATE github_pull_requests SET approved_by = ?, approved_sha = ? WHERE repo = ? AND number = ?')
      .run(approvedBy, headSha, repo, number);
  }

  /** Records (or with `method` undefined, clears) a pending `@eka-ci merge` for the given head. */
  setMerge(
    repo: string,
    number: number,
    merge: { method: string; forSha: string; by: string; commentId: number | null } | undefined,
  ): void {
    this.db
      .prepare(
        `UPDATE github_pull_requests SET merge_method = ?, merge_for_sha = ?, merge_by = ?, merge_comment_id = ?,
           merge_waiting = 0 WHERE repo = ? AND number = ?`,
      )
      .run(merge?.method ?? null, merge?.forSha ?? null, merge?.by ?? null, merge?.commentId ?? null, repo, number);
  }

  /** GitHub said a pending merge cannot happen yet, and the requester was told so (once). */
  setMergeWaiting(repo: string, number: number): void {
    this.db
      .prepare('UPDATE github_pull_requests SET merge_waiting = 1 WHERE repo = ? AND number = ?')
      .run(repo, number);
  }

  createRun(r: NewRun): number {
    const now = Date.now();
    const info = this.db
      .prepare(
        `INSERT INTO github_runs (repo, installation_id, kind, pr_number, base_sha, head_sha, base_clone_url,
           head_clone_url, extra_attrs, rebuild_failed, state, created_at, updated_at, untrusted, branch)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      )
      .run(
        r.repo,
        r.installationId,
        r.kind,
        r.prNumber ?? null,
        r.baseSha ?? null,
        r.headSha,
        r.baseCloneUrl,
        r.headCloneUrl,
        JSON.stringify(r.extraAttrs ?? []),
        r.rebuildFailed ? 1 : 0,
        r.state ?? 'queued',
        now,
        now,
        r.untrusted ? 1 : 0,
        r.branch ?? null,
      );
    const id = Number(info.lastInsertRowid);
    this.onRun(this.run(id)!);
    return id;
  }

  run(id: number): RunRow | undefined {
    return this.db.prepare('SELECT * FROM github_runs WHERE id = ?').get(id) as RunRow | undefined;
  }

  setRunState(id: number, state: RunState, error: string | null = null): void {
    this.db
      .prepare('UPDATE github_runs SET state = ?, error = ?, updated_at = ? WHERE id = ?')
      .run(state, error, Date.now(), id);
    const run = this.run(id);
    if (run) this.onRun(run);
  }

  /** The counts a list of pull requests shows for this run (see RunSummary); replaces what was there. */
  setSummary(id: number, summary: RunSummary): void {
    this.db.prepare('UPDATE github_runs SET summary_json = ? WHERE id = ?').run(JSON.stringify(summary), id);
  }

  /** The repositories with runs that build this derivation as a root (whose writers may cancel or rebuild it). */
  repositoriesOf(drvPath: string): string[] {
    return (
      this.db
        .prepare(
          `SELECT DISTINCT g.repo FROM github_run_roots r JOIN github_runs g ON g.id = r.run_id
            WHERE r.drv_path = ? ORDER BY g.repo`,
        )
        .all(drvPath) as Array<{ repo: string }>
    ).map((r) => r.repo);
  }

  /**
   * The repositories with runs that build this derivation, as a root or anywhere below one (a failed dependency's
   * log belongs to the pull requests it broke): up its dependents to the runs' roots, at most
   * MAX_DEPENDENTS_WALKED of them.
   */
  repositoriesBuilding(drvPath: string): string[] {
    return (
      this.db
        .prepare(
          `WITH RECURSIVE up(d) AS (
             SELECT ? UNION SELECT i.drv_path FROM derivation_inputs i JOIN up ON i.input_drv = up.d LIMIT ?
           )
           SELECT DISTINCT g.repo FROM up JOIN github_run_roots r ON r.drv_path = up.d
             JOIN github_runs g ON g.id = r.run_id ORDER BY g.repo`,
        )
        .all(drvPath, MAX_DEPENDENTS_WALKED) as Array<{ repo: string }>
    ).map((r) => r.repo);
  }

  /** Repositories the GitHub Apps serve, by name. */
  repositories(): RepositoryRow[] {
    return this.db.prepare('SELECT * FROM github_repositories ORDER BY full_name').all() as RepositoryRow[];
  }

  /** A repository's pull requests in a state (`all`: both), each with its newest run of its current head. */
  pullRequests(repo: string, state: 'open' | 'closed' | 'all'): Array<PullRequestRow & { run: RunRow | undefined }> {
    // Two statements for any number of pull requests (nixpkgs has thousands open), not one query per pull request.
    const prs = this.db
      .prepare(
        `SELECT p.*, (SELECT r.id FROM github_runs r
                       WHERE r.repo = p.repo AND r.head_sha = p.head_sha AND r.pr_number = p.number
                         AND r.kind = 'pull_request' ORDER BY r.id DESC LIMIT 1) AS latest_run_id
         FROM github_pull_requests p WHERE p.repo = ? AND (? = 'all' OR p.state = ?) ORDER BY p.number`,
      )
      .all(repo, state, state) as Array<PullRequestRow & { latest_run_id: number | null }>;
    const ids = prs.flatMap((p) => (p.latest_run_id === null ? [] : [p.latest_run_id]));
    const runs = new Map(
      (
        this.db
          .prepare('SELECT * FROM github_runs WHERE id IN (SELECT value FROM json_each(?))')
          .all(JSON.stringify(ids)) as RunRow[]
      ).map((r) => [r.id, r]),
    );
    return prs.map(({ latest_run_id: id, ...p }) => ({ ...p, run: id === null ? undefined : runs.get(id) }));
  }

  /** The newest run of a pull request's head. */
  latestPullRun(repo: string, number: number, headSha: string): RunRow | undefined {
    return this.db
      .prepare(
        `SELECT * FROM github_runs WHERE repo = ? AND pr_number = ? AND kind = 'pull_request' AND head_sha = ?
         ORDER BY id DESC LIMIT 1`,
      )
      .get(repo, number, headSha) as RunRow | undefined;
  }

  openRuns(): RunRow[] {
    return this.db
      .prepare("SELECT * FROM github_runs WHERE state IN ('queued', 'evaluating', 'building') ORDER BY id")
      .all() as RunRow[];
  }

  /**
   * Commits a repository still needs the evaluations of: the heads and bases of its open pull requests and of its
   * runs that have not finished (or wait for approval).
   */
  commitsInUse(repo: string): Set<string> {
    const rows = this.db
      .prepare(
        `SELECT head_sha AS sha FROM github_pull_requests WHERE repo = ? AND state = 'open'
         UNION SELECT base_sha FROM github_pull_requests WHERE repo = ? AND state = 'open'
         UNION SELECT head_sha FROM github_runs
           WHERE repo = ? AND state IN ('queued', 'evaluating', 'building', 'awaiting-approval')
         UNION SELECT base_sha FROM github_runs
           WHERE repo = ? AND base_sha IS NOT NULL AND state IN ('queued', 'evaluating', 'building', 'awaiting-approval')`,
      )
      .all(repo, repo, repo, repo) as Array<{ sha: string }>;
    return new Set(rows.map((r) => r.sha));
  }

  /** Unfinished runs of a pull request (all kinds: pull_request runs by number) or of a commit. */
  runsOf(filter: { repo: string; prNumber?: number; headSha?: string; states?: readonly RunState[] }): RunRow[] {
    const rows = this.db
      .prepare(
        `SELECT * FROM github_runs WHERE repo = ? AND (? IS NULL OR pr_number = ?) AND (? IS NULL OR head_sha = ?)
         ORDER BY id`,
      )
      .all(
        filter.repo,
        filter.prNumber ?? null,
        filter.prNumber ?? null,
        filter.headSha ?? null,
        filter.headSha ?? null,
      ) as RunRow[];
    return filter.states ? rows.filter((r) => filter.states!.includes(r.state)) : rows;
  }

  /** The newest run of a commit, whatever its state. */
  latestRunOf(repo: string, headSha: string): RunRow | undefined {
    return this.db
      .prepare('SELECT * FROM github_runs WHERE repo = ? AND head_sha = ? ORDER BY id DESC LIMIT 1')
      .get(repo, headSha) as RunRow | undefined;
  }

  /** What the base's build rules held back in a run (undefined: nothing), for the review the API serves. */
  setHeldBack(runId: number, heldBack: HeldBack | undefined): void {
    this.db
      .prepare('UPDATE github_runs SET held_back_json = ? WHERE id = ?')
      .run(heldBack ? JSON.stringify(heldBack) : null, runId);
  }

  /** What the newest run of a pair of commits held back; undefined when it held nothing back (or no run did). */
  heldBack(repo: string, baseSha: string, headSha: string): HeldBack | undefined {
    const row = this.db
      .prepare(
        'SELECT held_back_json FROM github_runs WHERE repo = ? AND base_sha = ? AND head_sha = ? ORDER BY id DESC LIMIT 1',
      )
      .get(repo, baseSha, headSha) as { held_back_json: string | null } | undefined;
    return row?.held_back_json ? (JSON.parse(row.held_back_json) as HeldBack) : undefined;
  }

  setRoots(runId: number, roots: readonly RunRoot[]): void {
    const put = this.db.prepare(
      'INSERT OR IGNORE INTO github_run_roots (run_id, side, drv_path, attr, system) VALUES (?, ?, ?, ?, ?)',
    );
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM github_run_roots WHERE run_id = ?').run(runId);
      for (const r of roots) put.run(runId, r.side, r.drvPath, r.attr, r.system);
    })();
  }

  roots(runId: number): RunRoot[] {
    return (
      this.db
        .prepare('SELECT side, drv_path, attr, system FROM github_run_roots WHERE run_id = ? ORDER BY side, attr')
        .all(runId) as Array<{ side: 'base' | 'head'; drv_path: string; attr: string; system: string }>
    ).map((r) => ({ side: r.side, drvPath: r.drv_path, attr: r.attr, system: r.system }));
  }

  /** Roots of unfinished runs other than `runId`: what cancelling that run must leave running. */
  rootsOfOtherOpenRuns(runId: number): string[] {
    return (
      this.db
        .prepare(
          `SELECT DISTINCT r.drv_path FROM github_run_roots r JOIN github_runs g ON g.id = r.run_id
           WHERE g.id != ? AND g.state IN ('queued', 'evaluating', 'building')`,
        )
        .all(runId) as Array<{ drv_path: string }>
    ).map((r) => r.drv_path);
  }
}
