import { IllegalStateError } from '../../common/errors.js';
import type { Db } from '../db/database.js';
import type { HookResult } from './hook-config.js';

/**
 * The `hook_runs` table: one row per hook and build result (a derivation's attempt), whatever became of it.
 *
 *   queued ──▶ running ──▶ succeeded | failed (exit ≠ 0) | timed-out | error (could not start) | interrupted
 *     └──────▶ error (the hook is no longer configured)
 *   skipped (inserted so: permissions, or credentials and untrusted code; `reason` says which)
 *
 * `interrupted`: the coordinator stopped while it ran (it is not run again: a hook may not be safe to repeat).
 * Queued runs wait in the table across a restart.
 */
export type HookRunState =
  'queued' | 'running' | 'succeeded' | 'failed' | 'timed-out' | 'error' | 'skipped' | 'interrupted';

const TRANSITIONS: Record<HookRunState, readonly HookRunState[]> = {
  queued: ['running', 'error'],
  running: ['succeeded', 'failed', 'timed-out', 'error', 'interrupted'],
  succeeded: [],
  failed: [],
  'timed-out': [],
  error: [],
  skipped: [],
  interrupted: [],
};

export const HOOK_RUN_STATES = Object.keys(TRANSITIONS) as HookRunState[];

export function isFinalHookState(s: HookRunState): boolean {
  return TRANSITIONS[s].length === 0;
}

export interface HookRunRow {
  id: number;
  hook_id: string;
  drv_path: string;
  /** The derivation's attempt whose result started it. */
  attempt: number;
  result: HookResult;
  /** `succeeded`, `failed` or `timed-out`. */
  build_state: string;
  /** The GitHub run whose context it has; null for a CLI/API request. */
  run_id: number | null;
  attr: string;
  repo: string;
  branch: string;
  commit_sha: string;
  job: string;
  state: HookRunState;
  reason: string | null;
  exit_code: number | null;
  signal: string | null;
  log_path: string | null;
  log_bytes: number;
  log_truncated: number;
  queued_at: number;
  started_at: number | null;
  finished_at: number | null;
}

export type NewHookRun = Pick<
  HookRunRow,
  | 'hook_id'
  | 'drv_path'
  | 'attempt'
  | 'result'
  | 'build_state'
  | 'run_id'
  | 'attr'
  | 'repo'
  | 'branch'
  | 'commit_sha'
  | 'job'
  | 'reason'
> & { state: 'queued' | 'skipped' };

type Finish = Partial<Pick<HookRunRow, 'reason' | 'exit_code' | 'signal' | 'log_bytes' | 'log_truncated'>>;

export class HookRunStore {
  private readonly s;

  constructor(readonly db: Db) {
    this.s = {
      insert: db.prepare(
        `INSERT OR IGNORE INTO hook_runs (hook_id, drv_path, attempt, result, build_state, run_id, attr, repo, branch,
           commit_sha, job, state, reason, queued_at, finished_at)
         VALUES (@hook_id, @drv_path, @attempt, @result, @build_state, @run_id, @attr, @repo, @branch, @commit_sha,
           @job, @state, @reason, @now, @finished_at)`,
      ),
      get: db.prepare('SELECT * FROM hook_runs WHERE id = ?'),
      ofDrv: db.prepare('SELECT * FROM hook_runs WHERE drv_path = ? ORDER BY id'),
      inState: db.prepare('SELECT * FROM hook_runs WHERE state = ? ORDER BY id'),
      start: db.prepare(
        "UPDATE hook_runs SET state = 'running', started_at = ?, log_path = ? WHERE id = ? AND state = 'queued'",
      ),
      finish: db.prepare(
        `UPDATE hook_runs SET state = @state, reason = @reason, exit_code = @exit_code, signal = @signal,
           log_bytes = @log_bytes, log_truncated = @log_truncated, finished_at = @now
         WHERE id = @id AND state = @from`,
      ),
    };
  }

  /** The new run's row, or undefined when this hook already has one for this attempt (a result announced twice). */
  insert(run: NewHookRun, now: number): HookRunRow | undefined {
    const r = this.s.insert.run({ ...run, now, finished_at: run.state === 'skipped' ? now : null });
    return r.changes === 1 ? this.get(Number(r.lastInsertRowid)) : undefined;
  }

  get(id: number): HookRunRow | undefined {
    return this.s.get.get(id) as HookRunRow | undefined;
  }

  runsOf(drvPath: string): HookRunRow[] {
    return this.s.ofDrv.all(drvPath) as HookRunRow[];
  }

  inState(state: HookRunState): HookRunRow[] {
    return this.s.inState.all(state) as HookRunRow[];
  }

  start(id: number, logPath: string, now: number): HookRunRow {
    this.check(id, 'running');
    this.s.start.run(now, logPath, id);
    return this.get(id)!;
  }

  finish(id: number, state: HookRunState, f: Finish, now: number): HookRunRow {
    const from = this.check(id, state);
    this.s.finish.run({
      id,
      from,
      state,
      now,
      reason: f.reason ?? null,
      exit_code: f.exit_code ?? null,
      signal: f.signal ?? null,
      log_bytes: f.log_bytes ?? 0,
      log_truncated: f.log_truncated ?? 0,
    });
    return this.get(id)!;
  }

  private check(id: number, to: HookRunState): HookRunState {
    const from = this.get(id)?.state;
    if (from === undefined || !TRANSITIONS[from].includes(to)) {
      throw new IllegalStateError(`hook run ${id}: ${from ?? 'no such run'} → ${to} is not a move a hook run makes`);
    }
    return from;
  }
}
