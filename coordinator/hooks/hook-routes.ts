import type Router from '@koa/router';
import type { AccessControl } from '../access/access-control.js';
import { followLogFile, serveLog } from '../http/log-routes.js';
import { mayRead, notFound, numberParam } from '../http/respond.js';
import type { LogStore } from '../logs/log-store.js';
import { isFinalHookState, type HookRunRow } from './hook-run-store.js';

export interface HookRouteSources {
  hooks: { runsOf(drvPath: string): HookRunRow[]; run(id: number): HookRunRow | undefined };
  logs: LogStore;
  access: AccessControl;
  /** The derivation a `:hash` parameter names (as the other derivation routes find it). */
  findDrv(hashOrName: string): string | undefined;
}

/**
 * A derivation's hook runs and each run's output. Hooks are the operator's configuration and their output may name
 * hosts, caches and whatever a tool printed: readable with a credential only (as `/agents` is), whatever the
 * derivation's repository.
 */
export function addHookRoutes(router: Router, sources: HookRouteSources): void {
  const { hooks, logs, access } = sources;
  router.get('/derivations/:hash/hooks', (ctx) => {
    if (!mayRead(ctx, access, 'private')) return;
    const drvPath = sources.findDrv(ctx.params.hash ?? '');
    if (!drvPath) return notFound(ctx, `no derivation ${ctx.params.hash ?? ''}`);
    ctx.body = { runs: hooks.runsOf(drvPath).map(hookRunJson) };
  });
  // A hook run's output: `Range` reads part of it; `follow=1` (or `Accept: text/event-stream`) follows it live as
  // Server-Sent Events until the run ends.
  router.get('/hook-runs/:id/log', (ctx) => {
    if (!mayRead(ctx, access, 'private')) return;
    const id = numberParam(ctx, 'id');
    const row = id === undefined ? undefined : hooks.run(id);
    if (!row) return notFound(ctx, `no hook run ${ctx.params.id ?? ''}`);
    if (row.log_path === null) return notFound(ctx, `hook run ${row.id} has not started (it is ${row.state})`);
    const follow = ctx.query.follow === '1' || ctx.get('Accept').includes('text/event-stream');
    if (!follow) return serveLog(ctx, row.log_path);
    followLogFile(ctx, logs, row.log_path, () => {
      const now = hooks.run(row.id);
      if (!now || !isFinalHookState(now.state)) return undefined;
      return { state: now.state, exitCode: now.exit_code, reason: now.reason };
    });
  });
}

export function hookRunJson(r: HookRunRow): Record<string, unknown> {
  return {
    id: r.id,
    hook: r.hook_id,
    attempt: r.attempt,
    result: r.result,
    buildState: r.build_state,
    state: r.state,
    reason: r.reason,
    exitCode: r.exit_code,
    signal: r.signal,
    runId: r.run_id,
    repo: r.repo,
    branch: r.branch,
    attr: r.attr,
    job: r.job,
    commitSha: r.commit_sha,
    logBytes: r.log_bytes,
    logTruncated: r.log_truncated === 1,
    logUrl: r.log_path === null ? null : `/api/v1/hook-runs/${r.id}/log`,
    queuedAt: r.queued_at,
    startedAt: r.started_at,
    finishedAt: r.finished_at,
  };
}
