import Router from '@koa/router';
import { Registry } from 'prom-client';
import { silentLogger } from '../../common/logging.js';
import type { AccessControl } from '../../coordinator/access/access-control.js';
import type { AuditLog } from '../../coordinator/audit-log.js';
import type { BinaryCache } from '../../coordinator/cache/binary-cache.js';
import { type S3PushGrant, s3PushRouter } from '../../coordinator/caches/s3-push-routes.js';
import { createHttpApp, listen } from '../../coordinator/http/server.js';

/**
 * The coordinator's HTTP app with only the agents' S3 push routes, on a loopback port: leases and grants come from
 * the maps (`grants` keyed `"<lease> <cache>"`), as the build manager and the push service would answer.
 */
export async function serveS3PushRoutes(o: {
  access: AccessControl;
  audit: AuditLog;
  leases: ReadonlyMap<string, { agentId: string }>;
  grants: ReadonlyMap<string, S3PushGrant>;
  builtIn: Pick<BinaryCache, 'narInfo'>;
}) {
  const app = createHttpApp(
    {
      cache: new Router(),
      api: new Router(),
      metrics: new Registry(),
      ready: () => undefined,
      access: o.access,
      agent: [
        s3PushRouter({
          access: o.access,
          audit: o.audit,
          lease: (id) => o.leases.get(id),
          cacheFor: (leaseId, cacheId) => o.grants.get(`${leaseId} ${cacheId}`),
          builtIn: o.builtIn,
        }),
      ],
    },
    silentLogger(),
  );
  const http = await listen(app, '127.0.0.1', 0);
  return { server: http.server, url: `http://127.0.0.1:${http.port}` };
}
