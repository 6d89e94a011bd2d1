/**
 * bench/cache-push-coordinator: the coordinator's side of bench/cache-push, in a process of its own so that the
 * agent's process measures the agent alone: the built-in binary cache (filled from the machine's store with the
 * closure, as agents' uploads would have filled it), the S3 buckets it writes narinfos to (bench/cache-push-s3.ts
 * serves them), and the push routes on the coordinator's real HTTP app. Driven over IPC by bench/cache-push.ts.
 */
import { randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import { silentLogger } from '../common/logging.js';
import { AccessControl } from '../coordinator/access/access-control.js';
import { TokenStore } from '../coordinator/access/token-store.js';
import { AuditLog } from '../coordinator/audit-log.js';
import { BinaryCache } from '../coordinator/cache/binary-cache.js';
import { generateSigningKey } from '../coordinator/cache/signing-key.js';
import { S3BinaryCache } from '../coordinator/caches/s3-cache.js';
import type { NarCompression } from '../common/nix/nar.js';
import { leaseClosure, type S3PushGrant } from '../coordinator/caches/s3-push-routes.js';
import { serveS3PushRoutes } from '../test/support/s3-push-app.js';
import { openDatabase } from '../coordinator/db/database.js';

/** Where the S3 service (bench/cache-push-s3.ts) listens, and its key. */
export interface S3Service {
  endpoint: string;
  region: string;
  bucket: string;
  key: { accessKeyId: string; secretAccessKey: string };
}

export type CoordinatorCommand =
  | { type: 'start'; cacheDir: string; top: string; compression: NarCompression; s3: S3Service }
  | { type: 'lease'; prefix: string }
  | { type: 'stop' };

export type CoordinatorReport =
  | { type: 'started'; url: string; token: string; publicKey: string; fillMs: number }
  | { type: 'leased'; leaseId: string; cacheId: string }
  | { type: 'stopped'; cpuMs: number; maxRssMiB: number }
  | { type: 'failed'; error: string };

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';
const send = (m: CoordinatorReport): void => void process.send?.(m, undefined, {}, () => undefined);

const TOKEN = `bench-agent-${randomUUID()}`;
const bucketKey = generateSigningKey('ekaci-bench-push-1');
const leases = new Map<string, { agentId: string }>();
const grants = new Map<string, S3PushGrant>();
const caches: S3BinaryCache[] = [];
let s3: S3Service | undefined;
let server: Server | undefined;
let builtIn: BinaryCache | undefined;
let top = '';
let compression: NarCompression = 'zstd';
let closure: Set<string> | undefined;

process.on('message', (command: CoordinatorCommand) => {
  void handle(command).catch((err: unknown) =>
    send({ type: 'failed', error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
  );
});
process.on('disconnect', () => void stop().finally(() => process.exit(0)));

async function handle(command: CoordinatorCommand): Promise<void> {
  switch (command.type) {
    case 'start': {
      top = command.top;
      compression = command.compression;
      builtIn = new BinaryCache({
        dir: command.cacheDir,
        secretKey: generateSigningKey('ekaci-bench-coordinator-1').secretKey,
        logger: silentLogger(),
      });
      const started = performance.now();
      await builtIn.pushFromLocalStore([top]);
      const fillMs = performance.now() - started;
      closure = await leaseClosure(builtIn, [top]);
      s3 = command.s3;
      const db = openDatabase(':memory:');
      const audit = new AuditLog(db);
      const access = new AccessControl(
        new TokenStore(db, audit, [{ name: 'bench-agent', token: TOKEN }]),
        new TokenStore(db, audit, [], 'api'),
        { publicReads: false },
      );
      const http = await serveS3PushRoutes({ access, audit, leases, grants, builtIn });
      server = http.server;
      send({
        type: 'started',
        url: http.url,
        token: TOKEN,
        publicKey: bucketKey.publicKey,
        fillMs,
      });
      return;
    }
    case 'lease': {
      const cache = new S3BinaryCache({
        id: `bench-${command.prefix}`,
        bucket: s3!.bucket,
        prefix: command.prefix,
        region: s3!.region,
        endpoint: s3!.endpoint,
        forcePathStyle: true,
        compression,
        signingKey: bucketKey.secretKey,
        credentials: () => Promise.resolve({ ...s3!.key }),
      });
      caches.push(cache);
      const leaseId = `lease-${randomUUID()}`;
      leases.set(leaseId, { agentId: 'bench-agent' });
      grants.set(`${leaseId} ${cache.id}`, { cache, closure: closure! });
      send({ type: 'leased', leaseId, cacheId: cache.id });
      return;
    }
    case 'stop': {
      const { user, system } = process.cpuUsage();
      await stop();
      send({ type: 'stopped', cpuMs: (user + system) / 1000, maxRssMiB: process.resourceUsage().maxRSS / 1024 });
      process.exit(0);
    }
  }
}

async function stop(): Promise<void> {
  server?.closeAllConnections();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  server = undefined;
  for (const c of caches.splice(0)) c.close();
}
