import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import Router from '@koa/router';
import Koa from 'koa';
import type { Registry } from 'prom-client';
import type { Logger } from '../../common/logging.js';
import type { AccessControl, Principal } from '../access/access-control.js';
import { isWebUiRequest } from './web-routes.js';
import { CSRF_HEADER, SESSION_COOKIE } from '../access/sessions.js';

export interface HttpRoutes {
  cache: Router;
  metrics: Registry;
  /** Undefined when ready to take work; otherwise why not. */
  ready: () => string | undefined;
  api: Router;
  /** The GitHub webhook endpoint, when GitHub Apps are configured. */
  github?: Router;
  /** The web UI's pages and assets (web-routes.ts). */
  web?: Router;
  /** GitHub login (`/auth/…`), when `[oauth]` is configured. */
  auth?: Router;
  /** What agents fetch and push for their leases (`/agent/…`: a check's source, presigned cache uploads). */
  agent?: Router[];
  /** `[web] cors_origins`: other origins whose pages may call the API. */
  corsOrigins?: readonly string[];
  access: AccessControl;
}

/** What every request carries once the access middleware has run (`ctx.state`). */
export interface RequestState {
  principal: Principal;
}

/**
 * Routes anyone may call whatever `[web] public` says: liveness probes, the API's description, and the webhook
 * endpoint, which proves its caller with the webhook signature instead of a token.
 */
export const ANONYMOUS_ROUTES: ReadonlyArray<{ method: string; path: string }> = [
  { method: 'GET', path: '/healthz' },
  { method: 'GET', path: '/readyz' },
  { method: 'POST', path: '/github/webhook' },
  { method: 'GET', path: '/api/v1/openapi.json' },
  // Who the caller is (anonymous, as likely as not): what a page needs to offer a login.
  { method: 'GET', path: '/api/v1/me' },
  // Logging in is how a person gets a credential.
  { method: 'GET', path: '/auth/login' },
  { method: 'GET', path: '/auth/callback' },
  { method: 'POST', path: '/auth/logout' },
];

const SAFE_METHODS = new Set(['GET', 'HEAD', 'OPTIONS']);

/** Whether anyone may make this request whatever `[web] public` says: the routes above, and the web UI's files. */
export function isAnonymousRequest(method: string, path: string): boolean {
  return (
    ANONYMOUS_ROUTES.some((r) => r.path === path && (r.method === method || method === 'HEAD')) ||
    isWebUiRequest(method, path)
  );
}

/** Every route the app serves, method and path, for tests that must cover them all (access rules). */
export function routeList(app: Koa): Array<{ method: string; path: string }> {
  const root = (app as Koa & { [ROOT]?: Router })[ROOT];
  return (root?.stack ?? []).flatMap((layer) =>
    layer.methods.filter((m) => m !== 'HEAD').map((method) => ({ method, path: String(layer.path) })),
  );
}

const ROOT = Symbol('ekaci root router');

/** The coordinator's HTTP port: the binary cache, health, metrics and the API. */
export function createHttpApp(routes: HttpRoutes, logger: Logger): Koa {
  const app = new Koa();
  app.on('error', (err: Error) => logger.warn({ err: err.message }, 'http request failed'));
  // Who is asking, decided once per request by AccessControl; on a coordinator that is not public, nobody without a
  // credential gets past this point except to the routes above. Routes then check the visibility of what they serve.
  app.use(async (ctx, next) => {
    // CORS: only the origins `[web] cors_origins` lists; a preflight is answered here.
    const origin = ctx.get('Origin');
    if (origin && routes.corsOrigins?.includes(origin)) {
      ctx.set('Access-Control-Allow-Origin', origin);
      ctx.set('Access-Control-Allow-Credentials', 'true');
      ctx.vary('Origin');
      if (ctx.method === 'OPTIONS') {
        ctx.set('Access-Control-Allow-Methods', 'GET, POST, DELETE');
        ctx.set('Access-Control-Allow-Headers', `Authorization, Content-Type, Last-Event-ID, Range, ${CSRF_HEADER}`);
        ctx.set('Access-Control-Max-Age', '600');
        ctx.status = 204;
        return;
      }
    }
    const principal = routes.access.principal(ctx.get('Authorization') || undefined, ctx.cookies.get(SESSION_COOKIE));
    (ctx.state as RequestState).principal = principal;
    // A browser sends the session cookie by itself, also for another site's form: a change needs the CSRF token too.
    if (!SAFE_METHODS.has(ctx.method) && !routes.access.csrfOk(principal, ctx.get(CSRF_HEADER) || undefined)) {
      ctx.status = 403;
      ctx.body = {
        error: {
          code: 'EKACI_ERR_CSRF',
          message: `a change made with a login session needs the ${CSRF_HEADER} header`,
        },
      };
      return;
    }
    if (!isAnonymousRequest(ctx.method, ctx.path) && principal.kind === 'anonymous' && !routes.access.publicReads) {
      ctx.status = 401;
      ctx.set('WWW-Authenticate', 'Bearer realm="eka-ci"');
      ctx.body = { error: { code: 'EKACI_ERR_AUTH', message: 'this coordinator is not public: send an API token' } };
      return;
    }
    await next();
  });
  const root = new Router();
  root.get('/healthz', (ctx) => {
    ctx.body = { ok: true };
  });
  root.get('/readyz', (ctx) => {
    const reason = routes.ready();
    ctx.status = reason === undefined ? 200 : 503;
    ctx.body = reason === undefined ? { ready: true } : { ready: false, reason };
  });
  root.get('/metrics', async (ctx) => {
    ctx.type = routes.metrics.contentType;
    ctx.body = await routes.metrics.metrics();
  });
  root.use('/cache', routes.cache.routes(), routes.cache.allowedMethods());
  root.use('/api/v1', routes.api.routes(), routes.api.allowedMethods());
  for (const r of routes.agent ?? []) root.use('/agent', r.routes(), r.allowedMethods());
  if (routes.github) root.use(routes.github.routes(), routes.github.allowedMethods());
  if (routes.auth) root.use(routes.auth.routes(), routes.auth.allowedMethods());
  if (routes.web) root.use(routes.web.routes(), routes.web.allowedMethods());
  app.use(root.routes()).use(root.allowedMethods());
  (app as Koa & { [ROOT]?: Router })[ROOT] = root;
  return app;
}

/**
 * Connections waiting to be accepted. Node's default (511) overflowed thousands of times a run when a hundred agents
 * opened their upload connections together (bench/fleet: the kernel's TcpExtListenOverflows); the kernel caps it at
 * net.core.somaxconn.
 *
 * The queue does fill: Node 20's libuv accepts one connection per turn of the event loop. With the loop busy (turns
 * of 50–100 ms) a burst of 1,000 new connections is accepted at 10–20 a second, and their first requests wait
 * seconds (bench/fleet, the first wide layer: Assign → Finished p99 of 5–10 s). Kept connections (agents upload over
 * keep-alive) pay this once; a connection in the queue waits, it is not refused.
 */
const LISTEN_BACKLOG = 4096;

export function listen(app: Koa, address: string, port: number): Promise<{ server: Server; port: number }> {
  return new Promise((resolve, reject) => {
    const server = createServer(app.callback());
    server.once('error', reject);
    server.listen({ port, host: address, backlog: LISTEN_BACKLOG }, () =>
      resolve({ server, port: (server.address() as AddressInfo).port }),
    );
  });
}
