import { EventEmitter } from 'node:events';
import { join } from 'node:path';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { AuditLog } from '../audit-log.js';
import type { Db } from '../db/database.js';
import type { LogStore } from '../logs/log-store.js';
import type { BuildStore } from '../scheduler/build-store.js';
import type { BuildState } from '../scheduler/build-state.js';
import {
  type HookResult,
  type HookSpec,
  type HookVariable,
  type HooksOptions,
  expandCommand,
  expandTemplate,
} from './hook-config.js';
import { HookContexts, chooseContext } from './hook-context.js';
import { HOOK_PATH, HookProcess, type HookProcessResult } from './hook-runner.js';
import { type HookRunRow, type HookRunState, HookRunStore } from './hook-run-store.js';

/**
 * Runs the configured hooks after build results are recorded, out of the build path: results are announced after
 * their commit (`settled`), noted here on the next turn of the event loop in one transaction, and run from a queue
 * at most HOOK_CONCURRENCY at a time, so that a slow hook delays other hooks, never a result.
 *
 * A hook runs for a derivation that a run or request asked for as a root, once per result of an attempt that built
 * it: `succeeded` is a success, `failed` and `timed-out` a failure. A derivation substituted from a cache, failed for
 * a dependency, cancelled or unbuildable was not built, and runs no hook (Nix's post-build-hook neither). Which of
 * several runs' contexts a hook gets: see hook-context.ts.
 *
 * Events: `queued`, `started`, `finished` (a HookRunRow; skipped runs are `finished` at once).
 * Lifecycle: `created` → `running` (start) → `stopping` (stopGracefully) → `stopped` (stopNow).
 */
export type HookServiceState = 'created' | 'running' | 'stopping' | 'stopped';

// Hooks push closures over the network and call other services: a few at a time keep a burst of thousands of
// results from starting thousands of processes on the coordinator, whose cores evaluate pull requests.
export const HOOK_CONCURRENCY = 2;

const RESULT_OF: Partial<Record<BuildState, HookResult>> = {
  succeeded: 'success',
  failed: 'failure',
  'timed-out': 'failure',
};

export interface HookServiceOptions {
  db: Db;
  store: BuildStore;
  logs: LogStore;
  audit: AuditLog;
  hooks: HooksOptions;
  /** Where each run's output is stored (`<id>.log`). */
  logDir: string;
  logger: Logger;
  concurrency?: number;
  /** SIGTERM to SIGKILL at a hook's timeout and at a graceful stop (tests shrink it). */
  killGraceMs?: number;
  now?: () => number;
}

export class HookService extends EventEmitter {
  state: HookServiceState = 'created';
  readonly runs: HookRunStore;
  private readonly contexts: HookContexts;
  private readonly byId: Map<string, HookSpec>;
  private readonly queue: number[] = [];
  private readonly active = new Map<number, { proc?: HookProcess; done: Promise<void> }>();
  private settledSoon: string[] = [];
  private unsubscribe: (() => void) | undefined;
  private readonly now: () => number;

  constructor(private readonly o: HookServiceOptions) {
    super();
    this.runs = new HookRunStore(o.db);
    this.contexts = new HookContexts(o.db);
    this.byId = new Map(o.hooks.hooks.map((h) => [h.id, h]));
    this.now = o.now ?? Date.now;
  }

  /**
   * Listens to `builds`' `settled`; runs left `running` by a previous process are `interrupted` (a hook may not be
   * safe to repeat), queued ones run.
   */
  start(builds: EventEmitter): void {
    if (this.state !== 'created') throw new IllegalStateError(`cannot start hooks that are ${this.state}`);
    this.state = 'running';
    for (const row of this.runs.inState('running')) {
      this.end(row, 'interrupted', { reason: 'the coordinator stopped while it ran' });
    }
    this.queue.push(...this.runs.inState('queued').map((r) => r.id));
    if (this.o.hooks.hooks.length > 0) {
      const listener = (drvPath: string): void => this.noteSettled(drvPath);
      builds.on('settled', listener);
      this.unsubscribe = () => builds.off('settled', listener);
    }
    this.pump();
  }

  runsOf(drvPath: string): HookRunRow[] {
    return this.runs.runsOf(drvPath);
  }

  run(id: number): HookRunRow | undefined {
    return this.runs.get(id);
  }

  /** Stops taking results; running hooks get SIGTERM and the kill grace, and end `interrupted`. */
  async stopGracefully(): Promise<void> {
    if (this.state === 'running') {
      this.state = 'stopping';
      this.unsubscribe?.();
      for (const a of this.active.values()) a.proc?.stop(true);
      await Promise.all([...this.active.values()].map((a) => a.done));
    }
    this.stopNow();
  }

  /**
   * Kills running hooks at once and records them `interrupted`; queued ones wait for the next start. Closes the
   * hooks' credentials (their renewal timers).
   */
  stopNow(): void {
    if (this.state === 'stopped') return;
    const started = this.state !== 'created';
    this.state = 'stopped';
    this.unsubscribe?.();
    if (started) {
      for (const [id, a] of this.active) {
        a.proc?.stop(false);
        this.end(this.runs.get(id)!, 'interrupted', { reason: 'the coordinator stopped' });
      }
    }
    this.active.clear();
    for (const h of this.o.hooks.hooks) h.credentials?.close();
  }

  /** Called inside the build manager's announcement: only notes the derivation, and must never throw there. */
  private noteSettled(drvPath: string): void {
    this.settledSoon.push(drvPath);
    if (this.settledSoon.length === 1) setImmediate(() => this.recordSettled());
  }

  private recordSettled(): void {
    const drvs = this.settledSoon;
    this.settledSoon = [];
    if (this.state !== 'running') return;
    const made: HookRunRow[] = [];
    try {
      this.o.db.transaction(() => {
        for (const drvPath of drvs) made.push(...this.recordResult(drvPath));
      })();
    } catch (err) {
      this.o.logger.error({ err, derivations: drvs.length }, 'could not record hook runs for build results');
      return;
    }
    for (const row of made) {
      if (row.state === 'skipped') {
        this.audit('hook.skipped', row, { reason: row.reason });
        this.finished(row);
      } else {
        this.emit('queued', row);
        this.queue.push(row.id);
      }
    }
    this.pump();
  }

  /** The hook runs one derivation's result makes (none for a derivation no run or request has as a root). */
  private recordResult(drvPath: string): HookRunRow[] {
    const drv = this.o.store.derivation(drvPath);
    const result = drv && RESULT_OF[drv.state];
    if (!drv || !result) return [];
    const hooks = this.o.hooks.hooks.filter((h) => h.on.has(result));
    const contexts = hooks.length > 0 ? this.contexts.of(drvPath) : [];
    if (contexts.length === 0) return [];
    const rows: HookRunRow[] = [];
    for (const hook of hooks) {
      const choice = chooseContext(hook, contexts, drv.untrusted === 1);
      const c = choice.context;
      const row = this.runs.insert(
        {
          hook_id: hook.id,
          drv_path: drvPath,
          attempt: drv.attempts,
          result,
          build_state: drv.state,
          run_id: c.runId,
          attr: c.attr,
          repo: c.repo,
          branch: c.branch,
          commit_sha: c.commitSha,
          job: c.job,
          state: 'skip' in choice ? 'skipped' : 'queued',
          reason: 'skip' in choice ? choice.skip : null,
        },
        this.now(),
      );
      if (row) rows.push(row);
    }
    return rows;
  }

  private pump(): void {
    const limit = this.o.concurrency ?? HOOK_CONCURRENCY;
    while (this.state === 'running' && this.active.size < limit && this.queue.length > 0) {
      const id = this.queue.shift()!;
      const entry: { proc?: HookProcess; done: Promise<void> } = { done: Promise.resolve() };
      this.active.set(id, entry);
      entry.done = this.execute(id, entry)
        .catch((err: unknown) => this.o.logger.error({ err, hookRun: id }, 'hook run failed unexpectedly'))
        .finally(() => {
          if (this.active.get(id) === entry) this.active.delete(id);
          this.pump();
        });
    }
  }

  private async execute(id: number, entry: { proc?: HookProcess }): Promise<void> {
    const queued = this.runs.get(id)!;
    const hook = this.byId.get(queued.hook_id);
    if (!hook) {
      const reason = `no hook ${queued.hook_id} is configured any more`;
      this.finished(this.runs.finish(id, 'error', { reason }, this.now()));
      return;
    }
    const row = this.runs.start(id, join(this.o.logDir, `${id}.log`), this.now());
    this.audit('hook.started', row, {});
    this.emit('started', row);
    let credentials: ReadonlyMap<string, string> = new Map();
    let problem: string | undefined;
    try {
      if (hook.credentials) credentials = await hook.credentials.values();
    } catch (err) {
      problem = `credentials (${hook.credentials!.description}): ${(err as Error).message}`;
    }
    if (this.isState('stopped')) return; // recorded by stopNow
    if (this.isState('stopping')) return this.end(row, 'interrupted', { reason: 'the coordinator stopped' });
    const env = problem === undefined ? this.environment(hook, row, credentials) : problem;
    if (typeof env === 'string') return this.end(row, 'error', { reason: env });
    const vars = env.vars;
    const proc = new HookProcess({
      argv: expandCommand(hook.command, vars, vars.OUT_PATHS === '' ? [] : vars.OUT_PATHS.split(' ')),
      env: env.all,
      timeoutMs: hook.timeoutSeconds * 1000,
      ...(this.o.killGraceMs !== undefined ? { killGraceMs: this.o.killGraceMs } : {}),
      logs: this.o.logs,
      logPath: row.log_path!,
      secrets: [...credentials.values()],
    });
    entry.proc = proc;
    const r = await proc.done;
    if (this.isState('stopped')) return;
    this.end(row, ...outcomeOf(r, hook));
  }

  /** The run's whole environment: PATH, the hook variables, the hook's env, its credentials; or why it cannot run. */
  private environment(
    hook: HookSpec,
    row: HookRunRow,
    credentials: ReadonlyMap<string, string>,
  ): { vars: Record<HookVariable, string>; all: Record<string, string> } | string {
    const drv = this.o.store.derivation(row.drv_path);
    const outputs = row.result === 'success' ? this.o.store.outputsOf(row.drv_path).map((o) => o.path) : [];
    const attempt = this.o.store.attemptsOf(row.drv_path).find((a) => a.attempt === row.attempt);
    const vars: Record<HookVariable, string> = {
      DRV_PATH: row.drv_path,
      OUT_PATHS: outputs.join(' '),
      ATTR: row.attr,
      REPO: row.repo,
      BRANCH: row.branch,
      RESULT: row.result,
      EKA_JOB_NAME: row.job,
      EKA_SYSTEM: drv?.system ?? '',
      EKA_COMMIT_SHA: row.commit_sha,
      EKA_IS_FOD: drv?.is_fod === 1 ? 'true' : 'false',
      EKA_BUILD_LOG_PATH: attempt?.log_path ?? '',
      EKA_BUILD_STATE: row.build_state,
    };
    const all: Record<string, string> = { PATH: HOOK_PATH, ...vars };
    for (const [name, value] of Object.entries(hook.env)) all[name] = expandTemplate(value, vars);
    for (const [name, value] of credentials) {
      if (name === '' || name.includes('=') || name.includes('\0')) {
        return `credentials (${hook.credentials!.description}): a value is named "${name}", which cannot be a variable`;
      }
      if (name in all) {
        return `credentials (${hook.credentials!.description}): ${name} is also a hook variable or in the hook's env`;
      }
      all[name] = value;
    }
    return { vars, all };
  }

  /** The state now (a method: TypeScript narrows a field across an await as if nothing else ran meanwhile). */
  private isState(s: HookServiceState): boolean {
    return this.state === s;
  }

  private end(row: HookRunRow, state: HookRunState, f: Parameters<HookRunStore['finish']>[2]): void {
    const done = this.runs.finish(row.id, state, f, this.now());
    this.audit('hook.finished', done, { state, exitCode: done.exit_code, reason: done.reason });
    this.o.logger.info({ hook: done.hook_id, hookRun: done.id, drvPath: done.drv_path, state }, 'hook run ended');
    this.finished(done);
  }

  private finished(row: HookRunRow): void {
    this.emit('finished', row);
  }

  private audit(action: string, row: HookRunRow, extra: Record<string, unknown>): void {
    if (!this.o.hooks.audit) return;
    this.o.audit.record(`hook:${row.hook_id}`, action, {
      run: row.id,
      drvPath: row.drv_path,
      attempt: row.attempt,
      result: row.result,
      repo: row.repo,
      branch: row.branch,
      attr: row.attr,
      ...extra,
    });
  }
}

function outcomeOf(r: HookProcessResult, hook: HookSpec): [HookRunState, Parameters<HookRunStore['finish']>[2]] {
  const log = { log_bytes: r.logBytes, log_truncated: r.truncated ? 1 : 0, exit_code: r.exitCode, signal: r.signal };
  switch (r.outcome) {
    case 'spawn-error':
      return ['error', { ...log, reason: r.error ?? 'could not start' }];
    case 'timed-out':
      return ['timed-out', { ...log, reason: `still running after timeout_seconds (${hook.timeoutSeconds}): killed` }];
    case 'stopped':
      return ['interrupted', { ...log, reason: 'the coordinator stopped' }];
    case 'exited':
      if (r.exitCode === 0) return ['succeeded', log];
      return ['failed', { ...log, reason: r.signal ? `killed by ${r.signal}` : `exited with ${r.exitCode ?? '?'}` }];
  }
}
