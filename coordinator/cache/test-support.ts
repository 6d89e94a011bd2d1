/**
 * Real-Nix fixtures shared by the cache tests: temporary directories, trivial derivations built in the machine's
 * store, a second store in a private mount namespace, and the cache served over real HTTP.
 */
import type { AddressInfo } from 'node:net';
import Router from '@koa/router';
import Koa from 'koa';

export {
  NIX,
  TempDirs,
  buildTrivial,
  inFreshStore,
  nixEnv,
  realiseFromCache,
  type Built,
} from '../../common/nix/test-support.js';

export interface TestServer {
  /** `http://127.0.0.1:PORT/cache` */
  url: string;
  close(): Promise<void>;
}

/** Serves `router` under `/cache` on a fresh loopback port, mounted the way the coordinator mounts it. */
export async function serveUnderCache(router: Router): Promise<TestServer> {
  const app = new Koa();
  const root = new Router();
  root.use('/cache', router.routes(), router.allowedMethods());
  app.use(root.routes());
  const server = app.listen(0, '127.0.0.1');
  await new Promise<void>((resolve) => server.once('listening', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/cache`,
    close: () =>
      new Promise<void>((resolve, reject) => {
        server.closeAllConnections();
        server.close((err) => (err ? reject(err) : resolve()));
      }),
  };
}
