import { execFileSync } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../common/logging.js';
import { runNixChecked } from '../common/nix/cli.js';
import { AccessControl } from '../coordinator/access/access-control.js';
import { TokenStore } from '../coordinator/access/token-store.js';
import { AuditLog } from '../coordinator/audit-log.js';
import { BinaryCache } from '../coordinator/cache/binary-cache.js';
import { type UploadLease, cacheRouter } from '../coordinator/cache/http-routes.js';
import { generateSigningKey } from '../coordinator/cache/signing-key.js';
import { TempDirs, buildTrivial, nixEnv, serveUnderCache, type TestServer } from '../coordinator/cache/test-support.js';
import { openDatabase } from '../coordinator/db/database.js';
import { shellDerivation } from '../agent/testing/derivations.js';
import { CacheUploader } from '../agent/nix/cache-upload.js';
import { StorePool } from '../agent/nix/store-pool.js';

const TOKEN = 'uploading-agent-token-0123';
const temp = new TempDirs();
const leases = new Map<string, UploadLease>();
let cache: BinaryCache;
let server: TestServer;
let pool: StorePool;
let spoolDir: string;
let env: NodeJS.ProcessEnv;
/** PUT requests the cache answered: each one looks its lease up once. */
let puts = 0;

beforeAll(async () => {
  env = nixEnv(await temp.make());
  spoolDir = await temp.make();
  const db = openDatabase(':memory:');
  const audit = new AuditLog(db);
  const access = new AccessControl(
    new TokenStore(db, audit, [{ name: 'agent-a', token: TOKEN }]),
    new TokenStore(db, audit, [], 'api'),
    { publicReads: true },
  );
  cache = new BinaryCache({
    dir: await temp.make(),
    secretKey: generateSigningKey('upload-test-1').secretKey,
    logger: silentLogger(),
  });
  server = await serveUnderCache(
    cacheRouter(cache, {
      access,
      lease: (id) => {
        puts++;
        return leases.get(id);
      },
      visibility: () => 'public',
      checkContentAddressed: () => Promise.resolve(),
    }),
  );
  pool = new StorePool(silentLogger());
});

afterAll(async () => {
  await pool?.closeAll();
  await server?.close();
  await temp.removeAll();
});

/** A lease of `drv` held by agent-a, the derivation's outputs its only paths. */
async function lease(drv: string): Promise<string> {
  const outputs = (await runNixChecked('nix-store', ['-q', '--outputs', drv], { env })).split('\n').filter(Boolean);
  const id = `lease-${Math.random().toString(36).slice(2)}`;
  leases.set(id, { agentId: 'agent-a', drvPath: drv, outputPaths: outputs, fixedOutput: false });
  return id;
}

async function uploadAs(oneRequest: boolean, drv: string, out: string): Promise<number> {
  const id = await lease(drv);
  const conn = await pool.acquire();
  const before = puts;
  try {
    await new CacheUploader(TOKEN, 0, spoolDir).upload(conn, server.url, [out], id, { oneRequest });
  } finally {
    pool.release(conn);
  }
  return puts - before;
}

describe('CacheUploader against the coordinator cache', () => {
  it.each([
    [true, 1],
    [false, 2],
  ])('uploads an output, oneRequest %s, in %i request(s), checked and signed there', async (oneRequest, requests) => {
    const built = await buildTrivial(await temp.make(), env, 1);
    await cache.pushFromLocalStore(built.deps);

    expect(await uploadAs(oneRequest, built.drv, built.out)).toBe(requests);

    const info = (await cache.narInfo(built.out))!;
    expect(info.references).toEqual(built.deps);
    expect(info.sigs).toHaveLength(1);
    expect(await readFile(join(cache.dir, info.url))).toEqual(
      execFileSync('nix-store', ['--dump', built.out], { env }),
    );
  });

  it.each([true, false])(
    'sends a NAR too big to hold in memory from a spool file, oneRequest %s, and leaves none behind',
    async (oneRequest) => {
      // 2^23 bytes: past what the uploader holds in memory.
      const drv = await shellDerivation(
        'x=0123456789abcdef; i=4; while [ $i -lt 23 ]; do x=$x$x; i=$((i+1)); done; printf %s "$x" > $out',
      );
      const out = (await runNixChecked('nix-store', ['-r', drv, '--option', 'substituters', ''], { env })).trim();

      expect(await uploadAs(oneRequest, drv, out)).toBe(oneRequest ? 1 : 2);

      const info = (await cache.narInfo(out))!;
      expect(info.narSize).toBeGreaterThan(2 ** 23);
      expect((await readFile(join(cache.dir, info.url))).length).toBe(info.narSize);
      expect(await readdir(spoolDir)).toEqual([]);
    },
  );
});
