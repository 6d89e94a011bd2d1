import Router from '@koa/router';
import type { BuildManager } from '../scheduler/build-manager.js';
import type { BuildStore } from '../scheduler/build-store.js';
import type { LogStore } from '../logs/log-store.js';

/** Read-only API over build state: a derivation's state, attempts and logs. */
export function apiRouter(store: BuildStore, logs: LogStore, manager: BuildManager): Router {
  const router = new Router();
  router.get('/derivations/:hash', (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return;
    ctx.body = {
      derivation: store.derivation(drvPath),
      outputs: store.outputsOf(drvPath),
      attempts: store.attemptsOf(drvPath).map(({ log_path: _ignored, ...a }) => a),
    };
  });
  router.get('/derivations/:hash/attempts/:attempt/log', (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return;
    ctx.type = 'text/plain; charset=utf-8';
    ctx.body = logs.read(logs.pathFor(drvPath, Number(ctx.params.attempt)));
  });
  router.get('/requests/:id', (ctx) => {
    const id = Number(ctx.params.id);
    ctx.body = { settled: manager.isSettled(id), builds: manager.results(id) };
  });
  return router;
}

function findDrv(store: BuildStore, hashOrName: string): string | undefined {
  const row = store.db
    .prepare('SELECT drv_path FROM derivations WHERE drv_path >= ? AND drv_path < ? LIMIT 1')
    .get(`/nix/store/${hashOrName}`, `/nix/store/${hashOrName}\uffff`) as { drv_path: string } | undefined;
  return row?.drv_path;
}
