import { createHash } from 'node:crypto';
import type { Octokit } from '@octokit/core';
import { Backoff } from '../../common/backoff.js';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { Db } from '../db/database.js';
import {
  type CheckConclusion,
  type CheckRunSpec,
  type CheckStatus,
  type Desired,
  desiredState,
  requestBody,
  validate,
} from './check-run-body.js';
import { GitHubUnavailableError, recordedError } from './errors.js';
import { classifyFailure } from './rate-limit.js';
import { checkRunsResponse, createdCheckRunResponse, readResponse } from './responses.js';

/**
 * GitHub check runs, reported durably and coalesced. `set` commits the desired state of a check run (keyed by
 * repository, commit and name) to `check_runs` before it returns; sending happens later, so callers may set as often
 * as their state changes and GitHub sees at most one request per check run per `minIntervalMs`, carrying the latest
 * state. The first send creates the check run and stores its GitHub id; every later send PATCHes that id, so a
 * restart (which resumes rows left dirty, in `start`) never creates a check run twice once its id is stored.
 *
 * A row is dirty while its desired state differs from what GitHub last acknowledged. Sends that GitHub refuses for
 * good (as `classifyFailure` in rate-limit.ts decides: a 422, 404, …) mark the row failed with GitHub's message and
 * stop; a later `set` with a different state tries again. Other failures (GitHub unavailable after the client's own
 * retries) are retried with jittered backoff. Requests of one installation go out one at a time, as GitHub asks of
 * integrators to stay clear of its secondary rate limits.
 *
 * Reporter lifecycle: `created` → `running` (start) → `stopping` (stopGracefully: sends each pending row once,
 * without waiting for its interval) → `stopped`; stopNow goes to `stopped` from anywhere at once. `set` works in every
 * state: rows recorded while no reporter runs wait for the next `start`. A stopped reporter is not restarted.
 */
export type CheckRunReporterState = 'created' | 'running' | 'stopping' | 'stopped';
export type { CheckConclusion, CheckRunAction, CheckRunSpec, CheckStatus } from './check-run-body.js';

const TRANSITIONS: Record<CheckRunReporterState, readonly CheckRunReporterState[]> = {
  created: ['running', 'stopped'],
  running: ['stopping', 'stopped'],
  stopping: ['stopped'],
  stopped: [],
};

export interface CheckTarget {
  installationId: number;
  owner: string;
  repo: string;
  headSha: string;
}

export interface CheckRunState {
  name: string;
  status: CheckStatus;
  conclusion: CheckConclusion | null;
  githubId: number | null;
  /** GitHub's refusal of the desired state, when it refused it for good. */
  failedError: string | null;
}

export interface CheckRunReporterOptions {
  /** The least time between two sends of one check run; sets in between coalesce into the later send. */
  minIntervalMs: number;
  logger: Logger;
  now?: () => number;
  /** Backoff between sends that GitHub could not take; tests shrink it. */
  retryBaseMs?: number;
  retryCapMs?: number;
}

// A send that failed after the GitHub client's own retries met an outage: try again soon, then back off to a few
// minutes, so a long outage costs GitHub a request per check run every few minutes, not a storm when it returns.
const RETRY_BASE_MS = 5_000;
// Requests in flight for one installation when one of them creates a commit's first check run (see `pump`).
const FIRST_CHECK_CONCURRENCY = 2;
const RETRY_CAP_MS = 5 * 60_000;

interface Row {
  owner: string;
  repo: string;
  head_sha: string;
  name: string;
  installation_id: number;
  github_id: number | null;
  desired_json: string;
  sent_json: string | null;
  last_sent_at: number | null;
  failed_error: string | null;
  create_attempted: number;
}

const KEY_WHERE = 'owner = ? AND repo = ? AND head_sha = ? AND name = ?';

export class CheckRunReporter {
  private current: CheckRunReporterState = 'created';
  private readonly now: () => number;
  private timer: NodeJS.Timeout | undefined;
  private timerAt = Infinity;
  private readonly inFlight = new Set<string>();
  /** Requests in flight per installation. */
  private readonly busyInstallations = new Map<number, number>();
  private readonly retries = new Map<string, { backoff: Backoff; at: number }>();
  /** The revision of each row last tried while stopping: each state gets one attempt, then waits for a start. */
  private readonly triedWhileStopping = new Map<string, number>();
  // Revisions let flush tell a state recorded before it was called from one recorded after: `revs` counts sets per
  // row in this process, `settled` is the revision GitHub last acknowledged or refused for good.
  private readonly revs = new Map<string, number>();
  private readonly settled = new Map<string, number>();
  private readonly flushes = new Set<{ pending: Map<string, number>; resolve(): void; reject(e: Error): void }>();
  private stopped: { promise: Promise<void>; resolve(): void } | undefined;

  constructor(
    private readonly db: Db,
    private readonly api: { octokit(installationId: number): Promise<Octokit> },
    private readonly options: CheckRunReporterOptions,
  ) {
    this.now = options.now ?? Date.now;
  }

  get state(): CheckRunReporterState {
    return this.current;
  }

  start(): void {
    this.transition('running');
    this.schedule(0);
  }

  /**
   * Records the desired state of a check run; it is committed when `set` returns. A completed check run is re-opened
   * by `in_progress`, but a `queued` state for it is taken as stale and ignored unless `rerun` says the caller is
   * running the check again.
   */
  set(target: CheckTarget, spec: CheckRunSpec, options: { rerun?: boolean } = {}): void {
    validate(spec);
    const key = [target.owner, target.repo, target.headSha, spec.name] as const;
    const id = keyOf(key);
    const changed = this.db.transaction((): 'unchanged' | 'dirty' | 'clean' => {
      const row = this.db.prepare(`SELECT desired_json, sent_json FROM check_runs WHERE ${KEY_WHERE}`).get(...key) as
        Pick<Row, 'desired_json' | 'sent_json'> | undefined;
      const prev = row ? (JSON.parse(row.desired_json) as Desired) : undefined;
      if (prev?.status === 'completed' && spec.status === 'queued' && !options.rerun) {
        this.options.logger.debug({ check: spec.name, sha: target.headSha }, 'ignoring queued for a completed check');
        return 'unchanged';
      }
      const json = JSON.stringify(desiredState(spec, prev, isoSeconds(this.now())));
      if (json === row?.desired_json) return 'unchanged';
      const dirty = json !== row?.sent_json;
      this.db
        .prepare(
          `INSERT INTO check_runs (owner, repo, head_sha, name, installation_id, desired_json, dirty, created_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT (owner, repo, head_sha, name) DO UPDATE SET installation_id = excluded.installation_id,
             desired_json = excluded.desired_json, dirty = excluded.dirty, failed_error = NULL`,
        )
        .run(...key, target.installationId, json, dirty ? 1 : 0, this.now());
      return dirty ? 'dirty' : 'clean';
    })();
    if (changed === 'unchanged') return;
    const rev = (this.revs.get(id) ?? 0) + 1;
    this.revs.set(id, rev);
    if (changed === 'dirty') {
      // Not sent synchronously: sets made in the same tick go out as one request.
      if (this.current === 'running' || this.current === 'stopping') this.schedule(0);
    } else if (!this.inFlight.has(id)) {
      // GitHub already has this state, so a wait for an older one is over too. (With a request out, GitHub is about
      // to get another state; its answer marks the row dirty again, and the send after it settles the wait.)
      this.settle(id, rev);
    }
  }

  /** Resolves once every state recorded so far reached GitHub or was refused for good; rejects if stopped first. */
  async flush(): Promise<void> {
    if (this.current !== 'running' && this.current !== 'stopping') {
      throw new IllegalStateError(`check run reporter cannot flush while ${this.current}`);
    }
    const dirty = this.db.prepare('SELECT owner, repo, head_sha, name FROM check_runs WHERE dirty = 1').all() as Row[];
    const pending = new Map(dirty.map((r) => keyOf(rowKey(r))).map((id) => [id, this.revs.get(id) ?? 0]));
    if (pending.size === 0) return;
    await new Promise<void>((resolve, reject) => {
      this.flushes.add({ pending, resolve, reject });
      this.checkFlushes();
    });
  }

  /** What eka-ci last asked for on a commit (not necessarily on GitHub yet), by check name. */
  states(owner: string, repo: string, headSha: string): CheckRunState[] {
    const sql =
      'SELECT desired_json, github_id, failed_error FROM check_runs WHERE owner = ? AND repo = ? AND head_sha = ?';
    const rows = this.db.prepare(`${sql} ORDER BY name`).all(owner, repo, headSha) as Row[];
    return rows.map((r) => {
      const { name, status, conclusion } = JSON.parse(r.desired_json) as Desired;
      return { name, status, conclusion, githubId: r.github_id, failedError: r.failed_error };
    });
  }

  /** Sends every pending row once, without waiting out its interval, then stops; rows that failed stay for next start. */
  async stopGracefully(): Promise<void> {
    if (this.current === 'created') return this.stopNow();
    if (this.current === 'running') {
      this.transition('stopping');
      let resolve = (): void => {};
      const promise = new Promise<void>((r) => (resolve = r));
      this.stopped = { promise, resolve };
      this.schedule(0);
    }
    await this.stopped?.promise;
  }

  /** Stops at once. A request already sent is not cancelled; its answer is still recorded if the database is open. */
  stopNow(): void {
    if (this.current === 'stopped') return;
    this.transition('stopped');
    this.finishStop();
  }

  private schedule(delayMs: number): void {
    const at = this.now() + delayMs;
    if (this.timer !== undefined && this.timerAt <= at) return;
    clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.timerAt = Infinity;
      this.pump();
    }, delayMs);
  }

  /** Starts every send that is due, and arms the timer for the next one. */
  private pump(): void {
    if (this.current !== 'running' && this.current !== 'stopping') return;
    const now = this.now();
    let next = Infinity;
    const rows = this.db
      .prepare(
        // First the first check run of each commit (the author sees eka-ci picked the change up), then the other
        // creations, both in the order they were asked for, then updates, least recently sent first. The JSON bodies
        // are read by the send that needs them.
        `SELECT owner, repo, head_sha, name, installation_id, github_id, last_sent_at, create_attempted,
           github_id IS NULL AND NOT EXISTS (SELECT 1 FROM check_runs o WHERE o.owner = c.owner AND o.repo = c.repo
             AND o.head_sha = c.head_sha AND o.github_id IS NOT NULL) AS first_of_commit
         FROM check_runs c WHERE dirty = 1
         ORDER BY github_id IS NOT NULL, first_of_commit DESC,
           CASE WHEN github_id IS NULL THEN created_at END, last_sent_at, owner, repo, head_sha, name`,
      )
      .all() as Array<Omit<Row, 'desired_json' | 'sent_json'> & { first_of_commit: number }>;
    for (const row of rows) {
      const id = keyOf(rowKey(row));
      // One request at a time per installation, as GitHub asks of integrators; the first check run of a commit may
      // go beside it, so a long queue of updates never hides from an author that eka-ci picked the change up.
      const busy = this.busyInstallations.get(row.installation_id) ?? 0;
      if (this.inFlight.has(id) || busy >= (row.first_of_commit === 1 ? FIRST_CHECK_CONCURRENCY : 1)) continue;
      const due = this.dueAt(row, id);
      if (due > now) {
        next = Math.min(next, due);
        continue;
      }
      this.inFlight.add(id);
      this.busyInstallations.set(row.installation_id, busy + 1);
      const rev = this.revs.get(id) ?? 0;
      void this.send(row, id, rev)
        .catch((err: unknown) => {
          // Only the bookkeeping can land here: the row keeps its state and is sent again.
          this.options.logger.error({ err: recordedError(err), check: row.name }, 'check run bookkeeping failed');
        })
        .finally(() => {
          this.inFlight.delete(id);
          const left = (this.busyInstallations.get(row.installation_id) ?? 1) - 1;
          if (left > 0) this.busyInstallations.set(row.installation_id, left);
          else this.busyInstallations.delete(row.installation_id);
          if (this.current === 'stopping') this.triedWhileStopping.set(id, rev);
          this.checkFlushes();
          this.pump();
        });
    }
    if (next !== Infinity) this.schedule(next - now);
    if (this.current === 'stopping' && this.inFlight.size === 0 && next === Infinity) {
      this.transition('stopped');
      this.finishStop();
    }
  }

  /** The id of a check run this reporter created for the row before (same external id), if GitHub has one. */
  private async findCreated(octokit: Octokit, row: Row, externalId: string): Promise<number | null> {
    const op = 'GET /repos/{owner}/{repo}/commits/{ref}/check-runs';
    const response = await octokit.request(op, {
      owner: row.owner,
      repo: row.repo,
      ref: row.head_sha,
      check_name: row.name,
      filter: 'all',
    });
    const found = readResponse(checkRunsResponse, op, response).check_runs.find((r) => r.external_id === externalId);
    return found ? found.id : null;
  }

  private dueAt(row: Pick<Row, 'github_id' | 'last_sent_at'>, id: string): number {
    if (this.current === 'stopping') {
      return (this.triedWhileStopping.get(id) ?? -1) >= (this.revs.get(id) ?? 0) ? Infinity : 0;
    }
    const spaced = row.github_id === null ? 0 : (row.last_sent_at ?? 0) + this.options.minIntervalMs;
    return Math.max(spaced, this.retries.get(id)?.at ?? 0);
  }

  private async send(pending: Omit<Row, 'desired_json' | 'sent_json'>, id: string, rev: number): Promise<void> {
    const key = rowKey(pending);
    const bodies = this.db
      .prepare(`SELECT desired_json, sent_json FROM check_runs WHERE ${KEY_WHERE}`)
      .get(...key) as Pick<Row, 'desired_json' | 'sent_json'>;
    const row: Row = { ...pending, ...bodies };
    const desired = JSON.parse(row.desired_json) as Desired;
    const sent = row.sent_json === null ? undefined : (JSON.parse(row.sent_json) as Desired);
    const sentAt = this.now();
    const log = { check: row.name, repo: `${row.owner}/${row.repo}`, sha: row.head_sha };
    try {
      const octokit = await this.api.octokit(row.installation_id);
      const body = requestBody(desired, sent);
      // A create whose answer was lost (a crash, a timeout) may have happened all the same: the check run is found
      // again by the external id every create carries, rather than created twice.
      const externalId = desired.externalId ?? defaultExternalId(key);
      let githubId =
        row.github_id ?? (row.create_attempted === 1 ? await this.findCreated(octokit, row, externalId) : null);
      if (githubId === null) {
        this.db.prepare(`UPDATE check_runs SET create_attempted = 1 WHERE ${KEY_WHERE}`).run(...key);
        const op = 'POST /repos/{owner}/{repo}/check-runs';
        const created = await octokit.request(op, {
          owner: row.owner,
          repo: row.repo,
          head_sha: row.head_sha,
          ...body,
          external_id: externalId,
        });
        githubId = readResponse(createdCheckRunResponse, op, created).id;
      } else {
        const params = { owner: row.owner, repo: row.repo, check_run_id: githubId };
        await octokit.request('PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}', { ...params, ...body });
      }
      this.record(log, () =>
        this.db
          .prepare(
            `UPDATE check_runs SET github_id = ?, sent_json = ?, last_sent_at = ?, failed_error = NULL,
             dirty = (desired_json <> ?) WHERE ${KEY_WHERE}`,
          )
          .run(githubId, row.desired_json, sentAt, row.desired_json, ...key),
      );
      this.retries.delete(id);
      this.settle(id, rev);
    } catch (err) {
      if (this.current === 'stopped') return;
      const message = recordedError(err);
      if (isFatal(err)) {
        this.options.logger.error({ ...log, err: message }, 'GitHub refused a check run; giving up on this state');
        // A state set while the request was out may well be accepted: it stays dirty.
        this.record(log, () =>
          this.db
            .prepare(
              `UPDATE check_runs SET failed_error = ?, dirty = CASE WHEN desired_json = ? THEN 0 ELSE dirty END
               WHERE ${KEY_WHERE}`,
            )
            .run(message, row.desired_json, ...key),
        );
        this.retries.delete(id);
        this.settle(id, rev);
        return;
      }
      const retry = this.retries.get(id) ?? {
        backoff: new Backoff(this.options.retryBaseMs ?? RETRY_BASE_MS, this.options.retryCapMs ?? RETRY_CAP_MS),
        at: 0,
      };
      const delay = retry.backoff.next();
      retry.at = this.now() + delay;
      this.retries.set(id, retry);
      this.options.logger.warn({ ...log, err: message, retryInMs: delay }, 'check run not sent; will retry');
    }
  }

  /** Runs a bookkeeping write; after stopNow the database may be closed, and the row is then resent next start. */
  private record(log: object, write: () => void): void {
    try {
      write();
    } catch (err) {
      if (this.current !== 'stopped') throw err;
      this.options.logger.warn({ ...log, err: recordedError(err) }, 'check run sent after stop; not recorded');
    }
  }

  private settle(id: string, rev: number): void {
    this.settled.set(id, Math.max(rev, this.settled.get(id) ?? -1));
    this.checkFlushes();
  }

  private checkFlushes(): void {
    for (const flush of this.flushes) {
      for (const [id, rev] of flush.pending) if ((this.settled.get(id) ?? -1) >= rev) flush.pending.delete(id);
      if (flush.pending.size > 0) continue;
      this.flushes.delete(flush);
      flush.resolve();
    }
  }

  private finishStop(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    for (const flush of this.flushes) {
      flush.reject(new IllegalStateError('check run reporter stopped before every check run was sent'));
    }
    this.flushes.clear();
    this.stopped?.resolve();
  }

  private transition(to: CheckRunReporterState): void {
    if (!TRANSITIONS[this.current].includes(to)) {
      throw new IllegalStateError(`check run reporter cannot go from ${this.current} to ${to}`);
    }
    this.current = to;
  }
}

/** Whether retrying the same request cannot help; the decision itself is rate-limit.ts's. */
function isFatal(err: unknown): boolean {
  if (err instanceof GitHubUnavailableError) return false;
  const failure = err as { status?: unknown; response?: { headers?: Record<string, string | number | undefined> } };
  // No HTTP status: the request never got an answer (connection lost, token not minted), which a retry may fix.
  if (typeof failure.status !== 'number') return false;
  const message = err instanceof Error ? err.message : '';
  return classifyFailure(failure.status, failure.response?.headers ?? {}, message) === 'fatal';
}

/** The external id a check run is created with when its spec gives none: stable for its repository, commit and name. */
function defaultExternalId(key: readonly [string, string, string, string]): string {
  return `ekaci-${createHash('sha256').update(JSON.stringify(key)).digest('hex').slice(0, 32)}`;
}

function keyOf(key: readonly [string, string, string, string]): string {
  return JSON.stringify(key);
}

function rowKey(r: Pick<Row, 'owner' | 'repo' | 'head_sha' | 'name'>): [string, string, string, string] {
  return [r.owner, r.repo, r.head_sha, r.name];
}

/** ISO 8601 without milliseconds, the `YYYY-MM-DDTHH:MM:SSZ` form GitHub documents. */
function isoSeconds(ms: number): string {
  return new Date(ms).toISOString().replace(/\.\d{3}Z$/, 'Z');
}
