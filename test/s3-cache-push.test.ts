/**
 * Pushing a lease's closure to an S3 binary cache through presigned URLs, end to end on real parts: a closure built
 * by Nix in the machine's store and held by the coordinator's built-in cache, the coordinator's push routes served by
 * its real HTTP app (access middleware included), the agent's push streaming NARs out of a real nix-daemon
 * connection, an S3 server that checks signatures as S3 does (test/stand-ins/s3-server.ts), and a fresh Nix store
 * that substitutes from the bucket over plain HTTP, checking signatures.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import type { Server } from 'node:http';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { pushToS3, type S3PushOptions } from '../agent/nix/s3-push.js';
import { silentLogger } from '../common/logging.js';
import { NixDaemonConnection } from '../common/nix/daemon-client.js';
import { nixBase32, parseNarInfo } from '../common/nix/narinfo.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import { storePathHash } from '../common/nix/store-path.js';
import { AccessControl } from '../coordinator/access/access-control.js';
import { TokenStore } from '../coordinator/access/token-store.js';
import { AuditLog } from '../coordinator/audit-log.js';
import { BinaryCache } from '../coordinator/cache/binary-cache.js';
import { generateSigningKey } from '../coordinator/cache/signing-key.js';
import { TempDirs, inFreshStore, nixEnv } from '../coordinator/cache/test-support.js';
import { S3BinaryCache } from '../coordinator/caches/s3-cache.js';
import type { NarCompression } from '../common/nix/nar.js';
import { leaseClosure, s3PushPath, type S3PushGrant } from '../coordinator/caches/s3-push-routes.js';
import { serveS3PushRoutes } from './support/s3-push-app.js';
import { closeServer } from './stand-ins/loopback.js';
import { openDatabase } from '../coordinator/db/database.js';
import { startS3StandIn, type S3StandIn } from './stand-ins/s3-server.js';

process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';

const AGENT_A = 'agent-a-token-0123456789';
const AGENT_B = 'agent-b-token-9876543210';
const API_TOKEN = 'api-token-0123456789abcdef';
const temp = new TempDirs();
const coordinatorKey = generateSigningKey('coordinator-s3-test-1');
const bucketKey = generateSigningKey('ekaci-s3-test-1');

let work: string;
let env: NodeJS.ProcessEnv;
let builtIn: BinaryCache;
let s3: S3StandIn;
let server: Server;
let coordinatorUrl: string;
let conn: NixDaemonConnection;
let audit: AuditLog;
const caches: S3BinaryCache[] = [];
/** Open leases: id → holder. */
const leases = new Map<string, { agentId: string }>();
/** What each lease may push where: `${lease} ${cache}` → grant. */
const grants = new Map<string, S3PushGrant>();

interface Closure {
  top: string;
  mid: string;
  leaf: string;
  big: string;
}

/**
 * A closure of four paths (top → mid → leaf, top → leaf, top → big), new on every call: NARs small enough to be
 * compressed in a batch, and one (`big`) large enough to stream through a compressor of its own.
 */
async function buildClosure(): Promise<Closure> {
  const nonce = randomUUID().slice(0, 8);
  const file = join(work, `${nonce}.nix`);
  await writeFile(
    file,
    `let mk = name: script: refs: derivation {
       name = "ekaci-s3-\${name}-${nonce}";
       system = builtins.currentSystem;
       builder = "/bin/sh";
       args = [ "-c" script ];
       inherit refs;
     };
     leaf = mk "leaf" "/bin/mkdir $out; i=0; while [ $i -lt 3000 ]; do echo line $i ${nonce} >> $out/text; i=$((i+1)); done" [];
     big = mk "big" "(echo ${nonce}; /usr/bin/head -c 1500000 /dev/zero) > $out" [];
     mid = mk "mid" "echo mid ${nonce} $refs > $out" [ leaf ];
   in { top = mk "top" "echo top ${nonce} $refs > $out" [ mid leaf big ]; inherit mid leaf big; }`,
  );
  const paths: Record<string, string> = {};
  for (const attr of ['top', 'mid', 'leaf', 'big']) {
    const drv = (await runNixChecked('nix-instantiate', [file, '-A', attr, ...NO_SUBSTITUTERS], { env })).trim();
    paths[attr] = (await runNixChecked('nix-store', ['-r', drv, ...NO_SUBSTITUTERS], { env })).trim();
  }
  return { top: paths.top!, mid: paths.mid!, leaf: paths.leaf!, big: paths.big! };
}

function s3Cache(id: string, compression: NarCompression, prefix: string, bucket = s3.bucket): S3BinaryCache {
  const cache = new S3BinaryCache({
    id,
    bucket,
    prefix,
    region: s3.region,
    endpoint: s3.endpoint,
    forcePathStyle: true,
    compression,
    signingKey: bucketKey.secretKey,
    credentials: () => Promise.resolve({ ...s3.key }),
  });
  caches.push(cache);
  return cache;
}

/** A lease held by agent-a (or `agentId`) that may push the closure of `outputs` to `cache`. */
async function lease(cache: S3BinaryCache, outputs: string[], agentId = 'agent-a'): Promise<string> {
  await builtIn.pushFromLocalStore(outputs);
  const id = `lease-${randomUUID().slice(0, 8)}`;
  leases.set(id, { agentId });
  grants.set(`${id} ${cache.id}`, { cache, closure: await leaseClosure(builtIn, outputs) });
  return id;
}

function push(leaseId: string, cache: S3BinaryCache, outputs: string[], extra: Partial<S3PushOptions> = {}) {
  return pushToS3({
    conn,
    coordinatorUrl,
    token: AGENT_A,
    leaseId,
    cacheId: cache.id,
    outputs,
    compression: cache.compression,
    spoolDir: work,
    stopped: () => false,
    ...extra,
  });
}

/** A push route called directly, as a hostile or confused agent would. */
async function post(
  leaseId: string,
  cacheId: string,
  step: 'missing' | 'nar' | 'narinfo',
  body: unknown,
  token: string | null = AGENT_A,
): Promise<{ status: number; body: { error?: { message: string }; url?: string; headers?: Record<string, string> } }> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (token !== null) headers.authorization = `Bearer ${token}`;
  const r = await fetch(`${coordinatorUrl}${s3PushPath(leaseId, cacheId, step)}`, {
    method: 'POST',
    headers,
    body: JSON.stringify(body),
  });
  const text = await r.text();
  return { status: r.status, body: text === '' ? {} : (JSON.parse(text) as { error?: { message: string } }) };
}

/** `nix-store -r path` in a store of its own, substituting only from `substituter` and trusting only `publicKey`. */
async function substitute(path: string, substituter: string, publicKey: string) {
  return inFreshStore(await temp.make('ekaci-s3-store-'), env, [
    'nix-store',
    '-r',
    path,
    ...['--option', 'substituters', substituter],
    ...['--option', 'trusted-public-keys', publicKey],
    ...['--option', 'require-sigs', 'true'],
    ...['--option', 'narinfo-cache-negative-ttl', '0'],
    ...['--option', 'narinfo-cache-positive-ttl', '0'],
  ]);
}

async function bucketNarInfo(prefix: string, path: string) {
  const r = await fetch(`${s3.bucketUrl}/${prefix === '' ? '' : `${prefix}/`}${storePathHash(path)}.narinfo`);
  return r.ok ? parseNarInfo(await r.text()) : undefined;
}

const narPuts = () => s3.requests.filter((r) => r.method === 'PUT' && r.path.includes('/nar/')).length;

beforeAll(async () => {
  work = await temp.make('ekaci-s3-push-');
  env = nixEnv(work);
  builtIn = new BinaryCache({
    dir: await temp.make(),
    secretKey: coordinatorKey.secretKey,
    logger: silentLogger(),
  });
  s3 = await startS3StandIn();
  const db = openDatabase(':memory:');
  audit = new AuditLog(db);
  const access = new AccessControl(
    new TokenStore(db, audit, [
      { name: 'agent-a', token: AGENT_A },
      { name: 'agent-b', token: AGENT_B },
    ]),
    new TokenStore(db, audit, [{ name: 'dashboard', token: API_TOKEN }], 'api'),
    { publicReads: false },
  );
  const http = await serveS3PushRoutes({ access, audit, leases, grants, builtIn });
  server = http.server;
  coordinatorUrl = http.url;
  conn = await NixDaemonConnection.open({ nixOptions: { substituters: '' } });
});

afterAll(async () => {
  await conn?.close();
  await closeServer(server);
  for (const c of caches) c.close();
  await s3?.close();
  await temp.removeAll();
});

describe('pushing to an S3 cache through presigned URLs', () => {
  it('pushes a lease’s closure so that a fresh store substitutes it from the bucket, checking the cache key', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-zstd', 'zstd', '');
    const id = await lease(cache, [built.top]);

    const result = await push(id, cache, [built.top]);

    expect(result.pushed).toBe(4);
    expect(result.skipped).toBe(0);
    expect(result.bytes).toBeGreaterThan(0);
    const r = await substitute(built.top, s3.bucketUrl, bucketKey.publicKey);
    expect(r.stderr).not.toMatch(/error|not signed/);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(built.top);
    const cacheInfo = await fetch(`${s3.bucketUrl}/nix-cache-info`);
    expect(await cacheInfo.text()).toBe('StoreDir: /nix/store\nWantMassQuery: 1\n');
    // What the narinfo vouches for is the coordinator's own description of the path; how it is stored, the agent's.
    const trusted = await builtIn.narInfo(built.leaf);
    const published = await bucketNarInfo('', built.leaf);
    expect(published).toMatchObject({
      narHash: trusted!.narHash,
      narSize: trusted!.narSize,
      references: trusted!.references,
      deriver: trusted!.deriver,
      compression: 'zstd',
    });
    expect(published!.url).toMatch(/^nar\/[0-9a-z]{52}\.nar\.zst$/);
    expect(published!.fileSize).toBeLessThan(trusted!.narSize);
    const big = await bucketNarInfo('', built.big);
    expect(big?.fileSize).toBeLessThan((await builtIn.narInfo(built.big))!.narSize / 100);
    expect(published!.sigs.map((s) => s.split(':')[0])).toEqual(['coordinator-s3-test-1', 'ekaci-s3-test-1']);
  });

  it('a store that trusts another key refuses the bucket’s paths', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-other-key', 'zstd', 'other-key');
    await push(await lease(cache, [built.top]), cache, [built.top]);

    const r = await substitute(built.top, `${s3.bucketUrl}/other-key`, generateSigningKey('stranger-1').publicKey);

    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/not signed by any of the keys/);
  });

  it('a second push presigns and uploads nothing: every path is in the bucket', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-again', 'zstd', 'again');
    await push(await lease(cache, [built.top]), cache, [built.top]);
    const putsBefore = narPuts();

    // Another lease of a build with the same outputs (another agent built the same derivation).
    const result = await push(await lease(cache, [built.top]), cache, [built.top]);

    expect(result).toEqual({ pushed: 0, skipped: 4, bytes: 0 });
    expect(narPuts()).toBe(putsBefore);
  });

  it('pushes only what the bucket lacks, references before the paths that need them', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-partial', 'zstd', 'partial');
    await push(await lease(cache, [built.leaf]), cache, [built.leaf]);

    const result = await push(await lease(cache, [built.top]), cache, [built.top]);

    expect(result).toMatchObject({ pushed: 3, skipped: 1 });
    expect((await substitute(built.top, `${s3.bucketUrl}/partial`, bucketKey.publicKey)).code).toBe(0);
  });

  it('writes xz and uncompressed NARs that Nix substitutes', async () => {
    const built = await buildClosure();
    for (const [compression, prefix] of [
      ['xz', 'xz/nested'],
      ['none', 'plain'],
    ] as const) {
      const cache = s3Cache(`s3-${compression}`, compression, prefix);
      const result = await push(await lease(cache, [built.top]), cache, [built.top]);
      expect(result.pushed).toBe(4);
      for (const path of [built.top, built.big])
        expect((await bucketNarInfo(prefix, path))?.compression).toBe(compression);
      const r = await substitute(built.top, `${s3.bucketUrl}/${prefix}`, bucketKey.publicKey);
      expect(r.stderr).not.toMatch(/error/);
      expect(r.code).toBe(0);
    }
  });

  it('writes a narinfo only after its NAR is in the bucket with the announced size; Nix checks the NAR itself', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-order', 'zstd', 'order');
    const id = await lease(cache, [built.leaf]);
    // Not the NAR of the path: the coordinator cannot tell (it never reads NARs), the substituting Nix can.
    const garbage = randomBytes(5000);
    const fileHash = `sha256:${nixBase32(createHash('sha256').update(garbage).digest())}`;
    const body = { storePath: built.leaf, compression: 'zstd', fileHash, fileSize: garbage.length };
    const put = (url: string, headers: Record<string, string>, bytes: Buffer) =>
      fetch(url, { method: 'PUT', headers, body: new Uint8Array(bytes) }).then((r) => r.status);

    const early = await post(id, cache.id, 'narinfo', body);
    const nar = await post(id, cache.id, 'nar', body);
    const short = await put(
      nar.body.url!,
      { ...nar.body.headers, 'content-length': String(garbage.length - 1) },
      garbage.subarray(1),
    );
    const afterShort = await post(id, cache.id, 'narinfo', body);
    const whole = await put(nar.body.url!, nar.body.headers!, garbage);
    const oversized = await post(id, cache.id, 'narinfo', { ...body, fileSize: garbage.length + 1 });
    const written = await post(id, cache.id, 'narinfo', body);

    expect(early.status).toBe(409);
    expect(early.body.error?.message).toMatch(/is not in S3 cache s3-order/);
    expect([short, afterShort.status, whole]).toEqual([403, 409, 200]);
    expect(oversized.status).toBe(409);
    expect(oversized.body.error?.message).toMatch(/has 5000 bytes in S3 cache s3-order, not the announced 5001/);
    expect(written.status).toBe(204);
    expect((await bucketNarInfo('order', built.leaf))?.narHash).toBe((await builtIn.narInfo(built.leaf))?.narHash);
    const r = await substitute(built.leaf, `${s3.bucketUrl}/order`, bucketKey.publicKey);
    expect(r.code).not.toBe(0);
  });
});

describe('who may push what', () => {
  let built: Closure;
  let cache: S3BinaryCache;
  let id: string;
  let body: { storePath: string; compression: string; fileHash: string; fileSize: number };

  beforeAll(async () => {
    built = await buildClosure();
    cache = s3Cache('s3-guarded', 'zstd', 'guarded');
    id = await lease(cache, [built.mid]);
    body = { storePath: built.mid, compression: 'zstd', fileHash: `sha256:${'1'.repeat(52)}`, fileSize: 100 };
  });

  it('refuses paths outside the closure of the lease’s outputs', async () => {
    await builtIn.pushFromLocalStore([built.top]);

    const nar = await post(id, cache.id, 'nar', { ...body, storePath: built.top });
    const narinfo = await post(id, cache.id, 'narinfo', { ...body, storePath: built.top });
    const missing = await post(id, cache.id, 'missing', { paths: [built.leaf, built.top] });
    const inside = await post(id, cache.id, 'missing', { paths: [built.leaf, built.mid] });

    expect([nar.status, narinfo.status, missing.status]).toEqual([403, 403, 403]);
    expect(nar.body.error?.message).toContain(`may push only the closure of its outputs, not ${built.top}`);
    expect(inside.status).toBe(200);
    expect(audit.recent().some((e) => e.action === 'agent.cache-push-refused' && e.detail.includes(built.top))).toBe(
      true,
    );
  });

  it('answers only the agent holding the lease, for a cache the lease may push to', async () => {
    const otherAgent = await post(id, cache.id, 'nar', body, AGENT_B);
    const apiToken = await post(id, cache.id, 'nar', body, API_TOKEN);
    const anonymous = await post(id, cache.id, 'nar', body, null);
    const unknownLease = await post('lease-nobody-holds', cache.id, 'nar', body);
    const otherCache = await post(id, 's3-zstd', 'nar', body);

    expect(otherAgent.status).toBe(403);
    expect(otherAgent.body.error?.message).toMatch(/agent agent-b does not hold lease/);
    expect(apiToken.status).toBe(403);
    expect(anonymous.status).toBe(401);
    expect(unknownLease.status).toBe(404);
    expect(otherCache.status).toBe(403);
    expect(otherCache.body.error?.message).toMatch(/may not push to cache "s3-zstd"/);
  });

  it('takes no path description from the agent, and only the cache’s compression', async () => {
    const withNarHash = await post(id, cache.id, 'narinfo', { ...body, narHash: body.fileHash });
    const xz = await post(id, cache.id, 'nar', { ...body, compression: 'xz' });
    const badHash = await post(id, cache.id, 'nar', { ...body, fileHash: 'md5:abc' });

    expect(withNarHash.status).toBe(400);
    expect(xz.status).toBe(409);
    expect(xz.body.error?.message).toMatch(/stores zstd NARs/);
    expect(badHash.status).toBe(400);
  });

  it('a presigned URL uploads exactly its NAR: tampered, moved, resized, expired or unsigned writes are refused', async () => {
    const nar = await post(id, cache.id, 'nar', body);
    expect(nar.status).toBe(200);
    const url = nar.body.url!;
    const headers = nar.body.headers!;
    const put = (to: string, h = headers, bytes = Buffer.alloc(100, 7)) =>
      fetch(to, { method: 'PUT', headers: h, body: new Uint8Array(bytes) }).then(async (r) => ({
        status: r.status,
        text: await r.text(),
      }));

    const tampered = await put(
      url.replace(/X-Amz-Signature=([0-9a-f])/, (_, c: string) => `X-Amz-Signature=${c === 'a' ? 'b' : 'a'}`),
    );
    const moved = await put(url.replace('/nar/1111', '/nar/2222'));
    const resized = await put(url, { ...headers, 'content-length': '101' }, Buffer.alloc(101, 7));
    const unsigned = await put(`${s3.bucketUrl}/guarded/${storePathHash(built.mid)}.narinfo`, {});
    s3.advanceClock(301_000);
    const expired = await put(url);
    s3.advanceClock(-301_000);

    const answers = { tampered, moved, resized, unsigned, expired };
    expect(Object.values(answers).map((a) => a.status)).toEqual([403, 403, 403, 403, 403]);
    for (const a of [tampered, moved, resized]) expect(a.text).toContain('<Code>SignatureDoesNotMatch</Code>');
    expect(unsigned.text).toContain('<Code>AccessDenied</Code><Message>Access Denied</Message>');
    expect(expired.text).toContain('<Code>AccessDenied</Code><Message>Request has expired</Message>');
    expect(await put(url)).toMatchObject({ status: 200 });
  });
});

describe('failures', () => {
  it('an upload S3 refuses fails the push with the path and S3’s answer', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-late', 'zstd', 'late');
    const id = await lease(cache, [built.leaf]);
    // Ten minutes on: the coordinator's signed requests still pass, the five-minute URLs it mints do not.
    s3.advanceClock(600_000);
    try {
      await expect(push(id, cache, [built.leaf])).rejects.toThrow(
        new RegExp(
          `uploading the NAR of ${built.leaf} \\(\\d+ bytes\\) failed: HTTP 403 AccessDenied: Request has expired`,
        ),
      );
    } finally {
      s3.advanceClock(-600_000);
    }
    expect(await bucketNarInfo('late', built.leaf)).toBeUndefined();
  });

  it('S3 failing on the coordinator’s side is reported with the cache, the key and S3’s code, never a secret', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-nobucket', 'zstd', '', 'no-such-bucket');
    const id = await lease(cache, [built.leaf]);

    const error = await push(id, cache, [built.leaf]).then(
      () => undefined,
      (e: Error) => e,
    );

    expect(error?.message).toMatch(
      /HTTP 502: S3 cache s3-nobucket: .*s3:\/\/no-such-bucket\/nix-cache-info failed: NoSuchBucket/,
    );
    expect(error?.message).not.toContain(s3.key.secretAccessKey);
  });

  it('a cancelled push stops before uploading anything', async () => {
    const built = await buildClosure();
    const cache = s3Cache('s3-cancel', 'zstd', 'cancel');
    const id = await lease(cache, [built.top]);
    const putsBefore = narPuts();

    await expect(push(id, cache, [built.top], { stopped: () => true })).rejects.toThrow(/push cancelled/);

    expect(narPuts()).toBe(putsBefore);
  });

  it('the lease’s closure comes from the coordinator’s cache, and leaves out what it does not hold', async () => {
    const built = await buildClosure();
    await builtIn.pushFromLocalStore([built.mid]);

    expect(await leaseClosure(builtIn, [built.top])).toEqual(new Set());
    expect(await leaseClosure(builtIn, [built.mid])).toEqual(new Set([built.mid, built.leaf]));
  });
});
