import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Logger } from '../../common/logging.js';
import { readStoreDerivation } from '../../common/nix/derivation.js';
import {
  type Assign,
  type Finished,
  type LeaseDecision,
  Outcome,
  type RunningLease,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { type HeldLease, LeaseTable } from '../agents/lease-table.js';
import type { Db } from '../db/database.js';
import type { CheckResult } from '../review/model.js';
import type { Health } from '../health.js';
import type { LogStore } from '../logs/log-store.js';
import type { BuildManager, OutputCache } from '../scheduler/build-manager.js';
import type { BuildStore } from '../scheduler/build-store.js';
import type { AgentCapabilities } from '../scheduler/scheduler.js';

/**
 * A repository check's state. `waiting`: its shell's inputs are being built; `unbuildable`: they failed (or the
 * shell did not evaluate), so the check never ran.
 */
export type CheckState = CheckResult['state'];

export const CHECK_TERMINAL_STATES: ReadonlySet<CheckState> = new Set([
  'succeeded',
  'failed',
  'timed-out',
  'cancelled',
  'unbuildable',
]);

export interface CheckRow {
  id: number;
  repo: string;
  commit_sha: string;
  name: string;
  system: string;
  clone_url: string;
  command: string;
  allow_network: number;
  ro_bind_json: string;
  timeout_seconds: number;
  shell_drv: string | null;
  untrusted: number;
  state: CheckState;
  attempts: number;
  lease_id: string | null;
  agent_id: string | null;
  cancel_reason: string | null;
  log_path: string | null;
  log_bytes: number;
  exit_code: number | null;
  error: string | null;
  queued_at: number;
  started_at: number | null;
  finished_at: number | null;
}

/** One check on one system, as a run asks for it (network already decided by the caller's policy). */
export interface CheckSpec {
  name: string;
  system: string;
  command: string;
  allowNetwork: boolean;
  roBind: readonly string[];
  timeoutSeconds: number;
  shellDrv: string | undefined;
  /** The shell did not evaluate for this system: the check is unbuildable with this message. */
  error: string | undefined;
}

export interface CheckRequest {
  repo: string;
  commit: string;
  /** The repository the coordinator's mirror fetched the commit from (source archives are made from it). */
  cloneUrl: string;
  checks: readonly CheckSpec[];
  untrusted: boolean;
  private: boolean;
  /** Failed and timed-out checks run again (a "Rebuild failed"); otherwise a commit's settled result stands. */
  rerunFailed: boolean;
}

export interface CheckManagerOptions {
  leaseTtlMs: number;
  maxAttempts: number;
  /** `check_max_log_bytes`; 0: none. */
  maxLogBytes: number;
  /** Where the holder of a check lease downloads the commit's source. */
  sourceUrl(leaseId: string): string;
}

interface CheckLease extends HeldLease {
  checkId: number;
  cancelled?: string;
  overLimit?: boolean;
}

/** How long a check ran on its agent, once it started and ended. */
export function checkSeconds(row: Pick<CheckRow, 'started_at' | 'finished_at'>): number | null {
  return row.started_at !== null && row.finished_at !== null
    ? Math.max(0, row.finished_at - row.started_at) / 1000
    : null;
}

// Lines of a check's output a review keeps: what a failing formatter or linter says fits in them.
const CHECK_LOG_TAIL_LINES = 30;

const OUTCOME_STATE: Partial<Record<Outcome, CheckState>> = {
  [Outcome.OUTCOME_SUCCEEDED]: 'succeeded',
  [Outcome.OUTCOME_FAILED]: 'failed',
  [Outcome.OUTCOME_TIMED_OUT]: 'timed-out',
  [Outcome.OUTCOME_CANCELLED]: 'cancelled',
};

/**
 * Repository checks from request to result: a check waits for its shell's inputs (built by the build pipeline),
 * is handed to an agent that runs checks as a lease (TTL, heartbeats, log chunks, cancel), and ends in a state with
 * the command's exit code. The lease protocol is the builds' (agent.proto); an agent's events reach this manager
 * for the leases it `owns`. Every transition is written to `check_jobs` before anything is sent, so a restart
 * picks up where it left: running checks wait one lease TTL for their agents, waiting ones wait for their shells
 * again. Events: `work` (a check can be assigned), `cancel-lease` (leaseId, agentId, reason), `state` (CheckRow:
 * any change of state), `settled` (CheckRow: it ended).
 */
export class CheckManager extends EventEmitter {
  private readonly leases: LeaseTable<CheckLease>;
  private readonly waitingShells = new Set<number>();
  private readonly waiters = new Set<{ ids: readonly number[]; resolve: (rows: CheckRow[]) => void }>();

  constructor(
    private readonly db: Db,
    private readonly builds: BuildManager,
    private readonly store: BuildStore,
    private readonly cache: OutputCache,
    private readonly logs: LogStore,
    private readonly options: CheckManagerOptions,
    private readonly logger: Logger,
    private readonly health: Health,
    private readonly now: () => number = Date.now,
  ) {
    super();
    this.leases = new LeaseTable<CheckLease>(options.leaseTtlMs, logs, now);
  }

  /** After a start: running checks keep their leases for one TTL; checks waiting for their shells wait again. */
  recover(): void {
    const expiresAt = this.now() + this.options.leaseTtlMs;
    for (const row of this.rowsIn('running')) {
      if (row.lease_id === null || row.agent_id === null || row.log_path === null) continue;
      this.leases.add({
        leaseId: row.lease_id,
        checkId: row.id,
        agentId: row.agent_id,
        expiresAt,
        logPath: row.log_path,
        ...(row.cancel_reason !== null ? { cancelled: row.cancel_reason } : {}),
      });
    }
    for (const row of this.rowsIn('waiting')) this.awaitShell(row);
    if (this.rowsIn('queued').length > 0) this.emit('work');
  }

  /**
   * Asks for a commit's checks; answers their ids. A check that already ran for the commit keeps its result
   * (unless it failed and `rerunFailed`), one still going is joined, a cancelled or unbuildable one runs again.
   */
  request(req: CheckRequest): number[] {
    const ids: number[] = [];
    const now = this.now();
    const reset = new Set<CheckState>([
      'cancelled',
      'unbuildable',
      ...(req.rerunFailed ? (['failed', 'timed-out'] as const) : []),
    ]);
    const fresh: CheckRow[] = [];
    this.db.transaction(() => {
      for (const c of req.checks) {
        const existing = this.db
          .prepare('SELECT * FROM check_jobs WHERE repo = ? AND commit_sha = ? AND name = ? AND system = ?')
          .get(req.repo, req.commit, c.name, c.system) as CheckRow | undefined;
        const state: CheckState =
          c.error !== undefined ? 'unbuildable' : c.shellDrv !== undefined ? 'waiting' : 'queued';
        const values = [
          req.cloneUrl,
          c.command,
          c.allowNetwork ? 1 : 0,
          JSON.stringify(c.roBind),
          c.timeoutSeconds,
          c.shellDrv ?? null,
          req.untrusted ? 1 : 0,
          state,
          c.error ?? null,
          now,
          c.error !== undefined ? now : null,
        ];
        if (existing && !reset.has(existing.state)) {
          ids.push(existing.id);
          continue;
        }
        if (existing) {
          this.db
            .prepare(
              `UPDATE check_jobs SET clone_url = ?, command = ?, allow_network = ?, ro_bind_json = ?, timeout_seconds = ?,
                 shell_drv = ?, untrusted = ?, state = ?, error = ?, queued_at = ?, finished_at = ?, exit_code = NULL,
                 cancel_reason = NULL, lease_id = NULL, agent_id = NULL, started_at = NULL WHERE id = ?`,
            )
            .run(...values, existing.id);
          ids.push(existing.id);
        } else {
          const id = this.db
            .prepare(
              `INSERT INTO check_jobs (repo, commit_sha, name, system, clone_url, command, allow_network, ro_bind_json,
                 timeout_seconds, shell_drv, untrusted, state, error, queued_at, finished_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
            )
            .run(req.repo, req.commit, c.name, c.system, ...values).lastInsertRowid;
          ids.push(Number(id));
        }
        fresh.push(this.row(ids[ids.length - 1]!)!);
      }
    })();
    for (const row of fresh) {
      if (row.state === 'waiting') this.awaitShell(row, req);
      if (CHECK_TERMINAL_STATES.has(row.state)) this.announce(row);
      else this.emit('state', row);
    }
    if (fresh.some((r) => r.state === 'queued')) this.emit('work');
    return ids;
  }

  /** Resolves with the rows once every one of `ids` is settled. */
  waitFor(ids: readonly number[]): Promise<CheckRow[]> {
    const rows = this.settledRows(ids);
    if (rows) return Promise.resolve(rows);
    return new Promise((resolve) => this.waiters.add({ ids, resolve }));
  }

  /** A commit's checks, by name and system. */
  checksOf(repo: string, commit: string): CheckRow[] {
    return this.db
      .prepare('SELECT * FROM check_jobs WHERE repo = ? AND commit_sha = ? ORDER BY name, system')
      .all(repo, commit) as CheckRow[];
  }

  /** A commit's checks as a review shows them, with the end of each one's output. */
  resultsOf(repo: string, commit: string): CheckResult[] {
    return this.checksOf(repo, commit).map((row) => ({
      name: row.name,
      system: row.system,
      state: row.state,
      exitCode: row.exit_code,
      seconds: checkSeconds(row),
      // A check writes to a terminal: its lines end in CRLF.
      logTail: row.log_path === null ? '' : this.logs.tail(row.log_path, CHECK_LOG_TAIL_LINES).replace(/\r\n/g, '\n'),
      error: row.error,
    }));
  }

  row(id: number): CheckRow | undefined {
    return this.db.prepare('SELECT * FROM check_jobs WHERE id = ?').get(id) as CheckRow | undefined;
  }

  /** Whether a lease id is a check's (open now or finished): its agent's events come here, not to the builds. */
  owns(leaseId: string): boolean {
    return (
      this.holds(leaseId) || this.db.prepare('SELECT 1 FROM check_jobs WHERE lease_id = ?').get(leaseId) !== undefined
    );
  }

  /** Whether a lease is an open check lease (memory only). */
  holds(leaseId: string): boolean {
    return this.leases.get(leaseId) !== undefined;
  }

  /** An open check lease: who holds it and the commit it runs on; undefined when not open or not a check's. */
  openLease(leaseId: string): { agentId: string; repo: string; cloneUrl: string; commit: string } | undefined {
    const lease = this.leases.get(leaseId);
    const row = lease && this.row(lease.checkId);
    return row && { agentId: lease.agentId, repo: row.repo, cloneUrl: row.clone_url, commit: row.commit_sha };
  }

  /** Hands queued checks to an agent that runs checks, up to `slots`, committed before they are sent. */
  assign(agent: AgentCapabilities, slots: number): Assign[] {
    if (!agent.runsChecks || slots <= 0 || !this.health.accepting) return [];
    const out: Assign[] = [];
    const running: number[] = [];
    const now = this.now();
    this.db.transaction(() => {
      for (const row of this.rowsIn('queued')) {
        if (out.length >= slots) break;
        if (!agent.systems.includes(row.system)) continue;
        const attempt = row.attempts + 1;
        const lease: CheckLease = {
          leaseId: randomUUID(),
          checkId: row.id,
          agentId: agent.agentId,
          expiresAt: now + this.options.leaseTtlMs,
          logPath: this.logs.pathFor(`check-${row.id}`, attempt),
        };
        this.db
          .prepare(
            `UPDATE check_jobs SET state = 'running', attempts = ?, lease_id = ?, agent_id = ?, log_path = ?,
               log_bytes = 0, started_at = NULL WHERE id = ?`,
          )
          .run(attempt, lease.leaseId, agent.agentId, lease.logPath, row.id);
        this.leases.add(lease);
        out.push(this.assignmentOf(row, lease, attempt));
        running.push(row.id);
      }
    })();
    for (const id of running) this.emit('state', this.row(id));
    return out;
  }

  private assignmentOf(row: CheckRow, lease: CheckLease, attempt: number): Assign {
    // The shell's inputs, as its .drv names them (the shell itself is not in the build graph: it is not built).
    const inputs = row.shell_drv === null ? {} : readStoreDerivation(row.shell_drv).inputDrvs;
    return {
      leaseId: lease.leaseId,
      drvPath: row.shell_drv ?? '',
      attempt,
      maxSilentSeconds: 0,
      timeoutSeconds: row.timeout_seconds,
      outputNames: [],
      pushes: [],
      maxLogBytes: this.options.maxLogBytes,
      inputOutputs: Object.entries(inputs).flatMap(([input, names]) =>
        this.store
          .outputsOf(input)
          .filter((o) => names.includes(o.name))
          .map((o) => ({ drvPath: input, name: o.name, path: o.path })),
      ),
      check: {
        name: row.name,
        command: row.command,
        allowNetwork: row.allow_network === 1,
        roBind: JSON.parse(row.ro_bind_json) as string[],
        sourceUrl: this.options.sourceUrl(lease.leaseId),
      },
    };
  }

  accepted(agentId: string, leaseId: string): void {
    // Nothing to record: `running` was written at assignment.
    void this.own(agentId, leaseId);
  }

  started(agentId: string, leaseId: string, at: number): void {
    const lease = this.own(agentId, leaseId);
    if (lease)
      this.db.prepare('UPDATE check_jobs SET started_at = ? WHERE id = ?').run(at || this.now(), lease.checkId);
  }

  /** A check's result. Idempotent: a result for a lease that is no longer open changes nothing. */
  finished(agentId: string, leaseId: string, f: Finished): void {
    const lease = this.own(agentId, leaseId);
    if (!lease) return;
    const row = this.row(lease.checkId)!;
    const now = this.now();
    const logBytes = this.logs.storedBytes(lease.logPath);
    this.leases.delete(leaseId);
    this.logs.close(lease.logPath);
    let state: CheckState | undefined;
    let error = f.error || null;
    if (lease.overLimit) {
      state = 'failed';
      error = this.overLimitReason();
    } else if (lease.cancelled !== undefined && f.outcome !== Outcome.OUTCOME_SUCCEEDED) {
      state = 'cancelled';
      error = lease.cancelled;
    } else {
      state = OUTCOME_STATE[f.outcome];
    }
    if (state === undefined) {
      // The agent could not run it properly (download, store, sandbox): another attempt, elsewhere if possible.
      if (row.attempts < this.options.maxAttempts) {
        this.db
          .prepare(`UPDATE check_jobs SET state = 'queued', error = ?, lease_id = ?, log_bytes = ? WHERE id = ?`)
          .run(error, leaseId, logBytes, row.id);
        this.logger.warn(
          { check: row.name, leaseId, agentId, error },
          'check attempt failed on the agent; queued again',
        );
        this.emit('work');
        return;
      }
      state = 'failed';
      error = `could not be run after ${row.attempts} attempts: ${error ?? 'infrastructure failure'}`;
    }
    this.db
      .prepare(`UPDATE check_jobs SET state = ?, error = ?, exit_code = ?, finished_at = ?, log_bytes = ? WHERE id = ?`)
      .run(state, error, f.exitCode ?? null, now, logBytes, row.id);
    this.announce(this.row(row.id)!);
  }

  /** Stores a log chunk of a check lease; answers the bytes stored, or undefined for a lease not this agent's. */
  appendLog(agentId: string, leaseId: string, offset: number, data: Uint8Array): number | undefined {
    const limit = this.options.maxLogBytes > 0 ? this.options.maxLogBytes : Infinity;
    const lease = this.own(agentId, leaseId);
    if (!lease) {
      // After its result (a reconnect sends result and log in any order): stored where the attempt's log is.
      const row = this.db.prepare('SELECT * FROM check_jobs WHERE lease_id = ?').get(leaseId) as CheckRow | undefined;
      if (!row || row.agent_id !== agentId || row.log_path === null) return undefined;
      const stored = this.logs.append(row.log_path, offset, data, limit);
      this.logs.close(row.log_path);
      this.db.prepare('UPDATE check_jobs SET log_bytes = ? WHERE id = ?').run(stored, row.id);
      return stored >= limit ? Math.max(stored, offset + data.length) : stored;
    }
    const stored = this.logs.append(lease.logPath, offset, data, limit);
    if (stored < offset + data.length && stored >= limit && !lease.overLimit) {
      lease.overLimit = true;
      this.emit('cancel-lease', lease.leaseId, lease.agentId, this.overLimitReason());
    }
    return lease.overLimit ? Math.max(stored, offset + data.length) : stored;
  }

  private overLimitReason(): string {
    return `the check's output exceeded check_max_log_bytes (${this.options.maxLogBytes} bytes); the rest was dropped`;
  }

  renew(agentId: string, leaseIds: readonly string[]): { renewed: string[]; expiresAt: number } {
    return this.leases.renew(agentId, leaseIds);
  }

  /** An agent (re)connected: the check leases it lists are kept if still its own; its others died with it. */
  reconcile(agentId: string, running: readonly RunningLease[]): LeaseDecision[] {
    const stopped = (lease: CheckLease): string | undefined => {
      if (lease.cancelled !== undefined) this.end(lease, 'cancelled', lease.cancelled);
      return lease.cancelled;
    };
    return this.leases.reconcile(agentId, running, stopped, (lease) =>
      this.lose(lease, 'the agent restarted without it'),
    );
  }

  expireLeases(): void {
    for (const lease of this.leases.expired()) {
      this.lose(lease, `lease expired: agent ${lease.agentId} stopped renewing it`);
    }
  }

  /** Cancels a commit's unfinished checks (a newer push, a closed pull request): recorded first, then sent. */
  cancel(repo: string, commit: string, reason: string): void {
    for (const row of this.checksOf(repo, commit)) {
      if (CHECK_TERMINAL_STATES.has(row.state)) continue;
      const lease = row.lease_id === null ? undefined : this.leases.get(row.lease_id);
      if (row.state === 'running' && lease) {
        lease.cancelled = reason;
        this.db.prepare('UPDATE check_jobs SET cancel_reason = ? WHERE id = ?').run(reason, row.id);
        this.emit('cancel-lease', lease.leaseId, lease.agentId, reason);
      } else {
        this.settleAs(row.id, 'cancelled', reason);
      }
    }
  }

  /** A lease whose agent is gone: the check is queued again (or fails after its attempts). */
  private lose(lease: CheckLease, reason: string): void {
    this.leases.delete(lease.leaseId);
    this.logs.close(lease.logPath);
    const row = this.row(lease.checkId)!;
    if (lease.cancelled !== undefined) return this.settleAs(row.id, 'cancelled', lease.cancelled);
    this.logger.warn({ check: row.name, leaseId: lease.leaseId, reason }, 'check lease lost');
    if (row.attempts >= this.options.maxAttempts) {
      return this.settleAs(row.id, 'failed', `could not be run after ${row.attempts} attempts: ${reason}`);
    }
    this.db.prepare(`UPDATE check_jobs SET state = 'queued', error = ? WHERE id = ?`).run(reason, row.id);
    this.emit('state', this.row(row.id));
    this.emit('work');
  }

  private end(lease: CheckLease, state: CheckState, reason: string): void {
    this.leases.delete(lease.leaseId);
    this.logs.close(lease.logPath);
    this.settleAs(lease.checkId, state, reason);
  }

  private settleAs(id: number, state: CheckState, error: string): void {
    this.db
      .prepare('UPDATE check_jobs SET state = ?, error = ?, finished_at = ? WHERE id = ?')
      .run(state, error, this.now(), id);
    this.announce(this.row(id)!);
  }

  /**
   * Builds the inputs of a check's shell (the derivation itself is an environment, not a product: like nix-shell,
   * its inputs make it), puts the shell's `.drv` closure in the cache for the agent, then queues the check; a shell
   * input that fails makes the check unbuildable, naming it.
   */
  private awaitShell(row: CheckRow, req?: Pick<CheckRequest, 'untrusted' | 'private' | 'rerunFailed'>): void {
    if (this.waitingShells.has(row.id) || row.shell_drv === null) return;
    this.waitingShells.add(row.id);
    const shell = row.shell_drv;
    void (async () => {
      const inputs = Object.keys(readStoreDerivation(shell).inputDrvs);
      await this.cache.importDerivations?.([shell]);
      await this.cache.pushFromLocalStore([shell], { derivation: true });
      if (inputs.length > 0) {
        const requestId = await this.builds.submit(
          inputs.map((drvPath) => ({ attr: `${row.name} shell input`, drvPath })),
          `check ${row.name} of ${row.repo} ${row.commit_sha}`,
          {
            untrusted: req?.untrusted ?? row.untrusted === 1,
            private: req?.private ?? true,
            rebuildFailed: req?.rerunFailed ?? false,
          },
        );
        const results = await this.builds.waitFor(requestId);
        const bad = results.find((r) => r.state !== 'succeeded');
        if (bad) {
          const why = bad.error ? `: ${bad.error}` : '';
          return this.settleAs(row.id, 'unbuildable', `shell input ${bad.drvPath} ${bad.state}${why}`);
        }
      }
      if (this.row(row.id)?.state !== 'waiting') return;
      this.db.prepare(`UPDATE check_jobs SET state = 'queued' WHERE id = ? AND state = 'waiting'`).run(row.id);
      this.emit('state', this.row(row.id));
      this.emit('work');
    })()
      .catch((err: Error) => {
        this.logger.error({ check: row.name, err: err.message }, 'cannot prepare the shell of a check');
        if (this.row(row.id)?.state === 'waiting') this.settleAs(row.id, 'unbuildable', `shell: ${err.message}`);
      })
      .finally(() => this.waitingShells.delete(row.id));
  }

  private announce(row: CheckRow): void {
    this.emit('state', row);
    this.emit('settled', row);
    for (const w of [...this.waiters]) {
      const rows = this.settledRows(w.ids);
      if (!rows) continue;
      this.waiters.delete(w);
      w.resolve(rows);
    }
  }

  private settledRows(ids: readonly number[]): CheckRow[] | undefined {
    const rows = ids.map((id) => this.row(id));
    return rows.every((r) => r !== undefined && CHECK_TERMINAL_STATES.has(r.state)) ? (rows as CheckRow[]) : undefined;
  }

  private rowsIn(state: CheckState): CheckRow[] {
    return this.db.prepare('SELECT * FROM check_jobs WHERE state = ? ORDER BY id').all(state) as CheckRow[];
  }

  private own(agentId: string, leaseId: string): CheckLease | undefined {
    return this.leases.own(agentId, leaseId);
  }
}
