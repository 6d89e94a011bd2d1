import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import Router from '@koa/router';
import Koa from 'koa';
import type { Registry } from 'prom-client';
import type { Logger } from '../../common/logging.js';

export interface HttpRoutes {
  cache: Router;
  metrics: Registry;
  ready: () => boolean;
  api: Router;
  /** The GitHub webhook endpoint, when GitHub Apps are configured. */
  github?: Router;
}

/** The coordinator's HTTP port: the binary cache, health, metrics and the API. */
export function createHttpApp(routes: HttpRoutes, logger: Logger): Koa {
  const app = new Koa();
  app.on('error', (err: Error) => logger.warn({ err: err.message }, 'http request failed'));
  const root = new Router();
  root.get('/healthz', (ctx) => {
    ctx.body = { ok: true };
  });
  root.get('/readyz', (ctx) => {
    const ready = routes.ready();
    ctx.status = ready ? 200 : 503;
    ctx.body = { ready };
  });
  root.get('/metrics', async (ctx) => {
    ctx.type = routes.metrics.contentType;
    ctx.body = await routes.metrics.metrics();
  });
  root.use('/cache', routes.cache.routes(), routes.cache.allowedMethods());
  root.use('/api/v1', routes.api.routes(), routes.api.allowedMethods());
  if (routes.github) root.use(routes.github.routes(), routes.github.allowedMethods());
  app.use(root.routes()).use(root.allowedMethods());
  return app;
}

export function listen(app: Koa, address: string, port: number): Promise<{ server: Server; port: number }> {
  return new Promise((resolve, reject) => {
    const server = createServer(app.callback());
    server.once('error', reject);
    server.listen(port, address, () => resolve({ server, port: (server.address() as AddressInfo).port }));
  });
}
