import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { request } from 'node:http';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../../common/nix/cli.js';
import { isFixedOutput, parseDerivation } from '../../common/nix/derivation.js';
import { AccessControl } from '../access/access-control.js';
import { TokenStore } from '../access/token-store.js';
import { AuditLog } from '../audit-log.js';
import { openDatabase } from '../db/database.js';
import { BinaryCache } from './binary-cache.js';
import { checkFixedOutput } from './fixed-output.js';
import { checkContentAddressed } from './content-addressed.js';
import {
  type CacheRouterOptions,
  type UploadLease,
  LEASE_HEADER,
  NARINFO_BYTES_HEADER,
  cacheRouter,
} from './http-routes.js';
import { fingerprint, nixBase32, serializeNarInfo } from '../../common/nix/narinfo.js';
import { generateSigningKey, signFingerprint } from './signing-key.js';
import {
  TempDirs,
  buildTrivial,
  inFreshStore,
  nixEnv,
  realiseFromCache,
  serveUnderCache,
  type TestServer,
} from './test-support.js';

const TOKEN = 'agent-token-0123456789';
const OTHER_TOKEN = 'other-agent-token-987654321';
const API_TOKEN = 'api-token-0123456789abcdef';
const temp = new TempDirs();
const coordinatorKey = generateSigningKey('coordinator-http-1');
let work: string;
let env: NodeJS.ProcessEnv;
let cache: BinaryCache;
let server: TestServer;
/** Leases as the coordinator would hold them: uploads name one of these. */
const leases = new Map<string, UploadLease>();
/** Store paths (or drv paths) the tests declare private. */
const privatePaths = new Set<string>();

function access(publicReads: boolean): AccessControl {
  const db = openDatabase(':memory:');
  const audit = new AuditLog(db);
  return new AccessControl(
    new TokenStore(db, audit, [
      { name: 'agent-a', token: TOKEN },
      { name: 'agent-b', token: OTHER_TOKEN },
    ]),
    new TokenStore(db, audit, [{ name: 'dashboard', token: API_TOKEN }], 'api'),
    { publicReads },
  );
}

function routerOptions(publicReads = true, extra: Partial<CacheRouterOptions> = {}): CacheRouterOptions {
  return {
    access: access(publicReads),
    lease: (id) => leases.get(id),
    visibility: (p) => ([...privatePaths].some((x) => x.startsWith(p) || p.startsWith(x)) ? 'private' : 'public'),
    checkUpload: (lease, storePath, url, compression) =>
      checkFixedOutput(lease, storePath, cache.dir, url, compression),
    checkContentAddressed: (info) => checkContentAddressed(info, cache.dir),
    ...extra,
  };
}

beforeAll(async () => {
  work = await temp.make();
  env = nixEnv(work);
  cache = new BinaryCache({ dir: await temp.make(), secretKey: coordinatorKey.secretKey, logger: silentLogger() });
  server = await serveUnderCache(cacheRouter(cache, routerOptions()));
});
afterAll(async () => {
  await server?.close();
  await temp.removeAll();
});

/** A lease of `drv` held by agent-a (or `agentId`), with the derivation's output paths. */
async function lease(drv: string, agentId = 'agent-a'): Promise<string> {
  const outs = (await runNixChecked('nix-store', ['--query', '--outputs', drv], { env })).split('\n').filter(Boolean);
  const id = `lease-${Math.random().toString(36).slice(2)}`;
  const fixedOutput = isFixedOutput(parseDerivation(await readFile(drv, 'utf8'), drv));
  leases.set(id, { agentId, drvPath: drv, outputPaths: outs, fixedOutput });
  return id;
}

function narInfoName(storePath: string): string {
  return `${storePath.slice('/nix/store/'.length, '/nix/store/'.length + 32)}.narinfo`;
}

interface Upload {
  nar: RawResponse;
  narinfo: RawResponse;
}

/** How an agent sends a path: NAR then narinfo, or both in one request (protocol 1.6). */
type UploadForm = 'two requests' | 'one request';
const FORMS: UploadForm[] = ['two requests', 'one request'];

/**
 * What an eka-ci agent sends for one path (agent/nix/cache-upload.ts): its NAR, then its narinfo, both naming the
 * lease, or the two in one request. `tamper` changes the narinfo before it is sent. In one request, `nar` and
 * `narinfo` are the same answer.
 */
async function upload(
  path: string,
  leaseId: string | undefined,
  token = TOKEN,
  tamper: (info: Parameters<typeof serializeNarInfo>[0]) => void = () => {},
  form: UploadForm = 'two requests',
): Promise<Upload> {
  const nar = execFileSync('nix-store', ['--dump', path], { env, maxBuffer: 64 * 1024 ** 2 });
  const hash = `sha256:${nixBase32(createHash('sha256').update(nar).digest())}`;
  const refs = (await runNixChecked('nix-store', ['-q', '--references', path], { env })).split('\n').filter(Boolean);
  const url = `nar/${hash.slice('sha256:'.length)}.nar`;
  const info = {
    storePath: path,
    url,
    compression: 'none',
    fileHash: hash,
    fileSize: nar.length,
    narHash: hash,
    narSize: nar.length,
    references: refs,
    sigs: [],
  };
  tamper(info);
  const headers: Record<string, string> = { Authorization: `Bearer ${token}` };
  if (leaseId !== undefined) headers[LEASE_HEADER] = leaseId;
  const text = Buffer.from(serializeNarInfo(info));
  if (form === 'one request') {
    headers[NARINFO_BYTES_HEADER] = String(text.length);
    const r = await raw('PUT', `/cache/${narInfoName(path)}`, headers, Buffer.concat([text, nar]));
    return { nar: r, narinfo: r };
  }
  const narResponse = await raw('PUT', `/cache/${url}`, headers, nar);
  const narinfo = await raw('PUT', `/cache/${narInfoName(path)}`, headers, text);
  return { nar: narResponse, narinfo };
}

interface RawResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** A request sent exactly as written: fetch() would normalise `..` segments away before they reach the server. */
function raw(
  method: string,
  path: string,
  headers: Record<string, string> = {},
  body?: Buffer,
  url = server.url,
): Promise<RawResponse> {
  const { port } = new URL(url);
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method, path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () =>
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString() }),
      );
    });
    req.on('error', reject);
    req.end(body);
  });
}

describe('binary cache over HTTP', () => {
  describe.each(FORMS)('uploads in %s', (form) => {
    it('stores the outputs of a lease its agent holds, under the coordinator signature only', async () => {
      const built = await buildTrivial(work, env, 1);
      await cache.pushFromLocalStore(built.deps);
      const id = await lease(built.drv);

      const r = await upload(built.out, id, TOKEN, undefined, form);

      expect(r.nar.status).toBe(204);
      expect(r.narinfo.status).toBe(204);
      const info = await cache.narInfo(built.out);
      expect(info?.sigs).toEqual([signFingerprint(coordinatorKey.secretKey, fingerprint(info!))]);
    });

    it('lets a separate store substitute uploaded paths over HTTP, trusting only the coordinator key', async () => {
      const built = await buildTrivial(work, env, 2);
      await cache.pushFromLocalStore(built.deps);
      expect((await upload(built.out, await lease(built.drv), TOKEN, undefined, form)).narinfo.status).toBe(204);

      const r = await realiseFromCache(await temp.make(), env, built.out, {
        url: server.url,
        publicKey: cache.publicKey,
      });

      expect(r.stderr).not.toMatch(/error|not signed/);
      expect(r.stdout.trim()).toBe(built.out);
      const untrusting = await realiseFromCache(await temp.make(), env, built.out, {
        url: server.url,
        publicKey: generateSigningKey('x').publicKey,
      });
      expect(untrusting.code).not.toBe(0);
    });

    it('answers 401 to uploads without a token or with a wrong one, and writes nothing', async () => {
      const built = await buildTrivial(work, env);
      const narsBefore = await readdir(join(cache.dir, 'nar'));
      const id = await lease(built.drv);

      const anonymous = await raw('PUT', `/cache/log/${built.drv.slice('/nix/store/'.length)}`, {}, Buffer.from('x'));
      const wrong = await upload(built.out, id, 'not-the-token-at-all', undefined, form);

      expect(anonymous.status).toBe(401);
      expect(anonymous.headers['www-authenticate']).toMatch(/^Basic /);
      expect([wrong.nar.status, wrong.narinfo.status]).toEqual([401, 401]);
      expect(await cache.hasPaths([built.out])).toEqual(new Set());
      expect(await readdir(join(cache.dir, 'nar'))).toEqual(narsBefore);
    });

    it('refuses with 403 an upload for a lease the token does not hold, for no lease, or for a path the lease does not build', async () => {
      const built = await buildTrivial(work, env);
      const other = await buildTrivial(work, env);
      const narsBefore = await readdir(join(cache.dir, 'nar'));
      const theirs = await lease(built.drv, 'agent-b');
      const mine = await lease(other.drv);
      leases.set('closed', { agentId: 'agent-a', drvPath: built.drv, outputPaths: [built.out], fixedOutput: false });
      leases.delete('closed');

      const impostor = await upload(built.out, theirs, TOKEN, undefined, form);
      const noLease = await upload(built.out, undefined, TOKEN, undefined, form);
      const closedLease = await upload(built.out, 'closed', TOKEN, undefined, form);
      const wrongPath = await upload(built.out, mine, TOKEN, undefined, form);
      const wrongLog = await raw(
        'PUT',
        `/cache/log/${built.drv.slice('/nix/store/'.length)}`,
        { Authorization: `Bearer ${TOKEN}`, [LEASE_HEADER]: mine },
        Buffer.from('forged log'),
      );

      for (const r of [impostor, noLease, closedLease]) expect([r.nar.status, r.narinfo.status]).toEqual([403, 403]);
      expect(wrongPath.narinfo.status).toBe(403);
      expect(wrongPath.narinfo.body).toContain(`has no output ${built.out}`);
      // In one request, who may publish the path is asked before its NAR is stored.
      if (form === 'one request') expect(await readdir(join(cache.dir, 'nar'))).toEqual(narsBefore);
      expect(wrongLog.status).toBe(403);
      expect(await cache.hasPaths([built.out])).toEqual(new Set());
      expect((await raw('GET', `/cache/log/${built.drv.slice('/nix/store/'.length)}`)).status).toBe(404);
    });

    it('refuses a narinfo whose NarHash or NarSize does not match the uploaded NAR, compressed or not', async () => {
      const built = await buildTrivial(work, env);
      const id = await lease(built.drv);
      const forged = await upload(
        built.out,
        id,
        TOKEN,
        (info) => {
          info.narSize += 1;
          info.fileSize = info.narSize - 1;
        },
        form,
      );
      expect(forged.narinfo.status).toBe(400);
      expect(forged.narinfo.body).toMatch(/do not match/);

      // An xz NAR: the coordinator decompresses it to check what the narinfo claims.
      const nar = execFileSync('nix-store', ['--dump', built.out], { env });
      const xz = execFileSync('xz', ['-c'], { input: nar });
      const fileHash = `sha256:${nixBase32(createHash('sha256').update(xz).digest())}`;
      const narHash = `sha256:${nixBase32(createHash('sha256').update(nar).digest())}`;
      const url = `nar/${fileHash.slice('sha256:'.length)}.nar.xz`;
      const headers = { Authorization: `Bearer ${TOKEN}`, [LEASE_HEADER]: id };
      expect((await raw('PUT', `/cache/${url}`, headers, xz)).status).toBe(204);
      const info = {
        storePath: built.out,
        url,
        compression: 'xz',
        fileHash,
        fileSize: xz.length,
        narHash,
        narSize: nar.length,
        references: [],
        sigs: [],
      };
      const lying = { ...info, narHash: `sha256:${nixBase32(createHash('sha256').update('other').digest())}` };
      const refused = await raw(
        'PUT',
        `/cache/${narInfoName(built.out)}`,
        headers,
        Buffer.from(serializeNarInfo(lying)),
      );
      expect(refused.status).toBe(400);
      expect(await cache.hasPaths([built.out])).toEqual(new Set());
      const accepted = await raw(
        'PUT',
        `/cache/${narInfoName(built.out)}`,
        headers,
        Buffer.from(serializeNarInfo(info)),
      );
      expect(accepted.status).toBe(204);
      expect((await cache.narInfo(built.out))?.narHash).toBe(narHash);
    });

    it('checks the output of a fixed-output derivation against the hash it declares', async () => {
      const content = `fixed ${Math.random()}\n`;
      const sha = createHash('sha256').update(content).digest('hex');
      const file = join(work, `fod-${sha.slice(0, 8)}.nix`);
      await writeFile(
        file,
        `derivation { name = "ekaci-fod-${sha.slice(0, 8)}"; system = builtins.currentSystem; builder = "/bin/sh";
        args = [ "-c" "printf '%s' '${content.trimEnd()}\n' > $out" ];
        outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "${sha}"; }`,
      );
      const drv = (await runNixChecked('nix-instantiate', [file, ...NO_SUBSTITUTERS], { env })).trim();
      const out = (await runNixChecked('nix-store', ['-r', drv, ...NO_SUBSTITUTERS], { env })).trim();
      // A different file under the fetcher's output path: what an agent holding the lease could try to publish.
      const impostorFile = join(await temp.make(), 'x');
      await writeFile(impostorFile, 'not what was declared\n');
      const impostorNar = execFileSync('nix-store', ['--dump', impostorFile]);
      const hash = `sha256:${nixBase32(createHash('sha256').update(impostorNar).digest())}`;
      const id = await lease(drv);
      const headers = { Authorization: `Bearer ${TOKEN}`, [LEASE_HEADER]: id };
      const url = `nar/${hash.slice('sha256:'.length)}.nar`;
      expect((await raw('PUT', `/cache/${url}`, headers, impostorNar)).status).toBe(204);
      const forged = serializeNarInfo({
        storePath: out,
        url,
        compression: 'none',
        fileHash: hash,
        fileSize: impostorNar.length,
        narHash: hash,
        narSize: impostorNar.length,
        references: [],
        sigs: [],
      });

      const refused = await raw('PUT', `/cache/${narInfoName(out)}`, headers, Buffer.from(forged));
      const genuine = await upload(out, id, TOKEN, undefined, form);

      expect(refused.status).toBe(400);
      expect(refused.body).toContain('does not have the sha256 hash');
      expect(genuine.narinfo.status).toBe(204);
    });
  });

  it('takes narinfo and NAR in one request only when the parts add up, and stores nothing otherwise', async () => {
    const built = await buildTrivial(work, env);
    const id = await lease(built.drv);
    const nar = execFileSync('nix-store', ['--dump', built.out], { env });
    const hash = `sha256:${nixBase32(createHash('sha256').update(nar).digest())}`;
    const text = Buffer.from(
      serializeNarInfo({
        storePath: built.out,
        url: `nar/${hash.slice('sha256:'.length)}.nar`,
        compression: 'none',
        fileHash: hash,
        fileSize: nar.length,
        narHash: hash,
        narSize: nar.length,
        references: [],
        sigs: [],
      }),
    );
    const auth = { Authorization: `Bearer ${TOKEN}`, [LEASE_HEADER]: id };
    const name = `/cache/${narInfoName(built.out)}`;
    const send = (bytes: string, body: Buffer, extra: Record<string, string> = {}, url = server.url) =>
      raw('PUT', name, { ...auth, [NARINFO_BYTES_HEADER]: bytes, ...extra }, body, url);
    const narsBefore = await readdir(join(cache.dir, 'nar'));

    const beyond = await send(String(text.length + nar.length + 1), Buffer.concat([text, nar]));
    const notANumber = await send('many', Buffer.concat([text, nar]));
    const cutShort = await send(String(text.length), text.subarray(0, 10), { 'Transfer-Encoding': 'chunked' });
    const wrongNar = await send(String(text.length), Buffer.concat([text, Buffer.from('not the NAR')]));
    const misSplit = await send(String(text.length - 5), Buffer.concat([text, nar]));
    const small = await serveUnderCache(cacheRouter(cache, routerOptions(true, { limits: { nar: 10, narinfo: 64 } })));
    let overLimits: RawResponse[];
    try {
      overLimits = [
        await send(String(text.length), Buffer.concat([text, nar]), {}, small.url),
        await send(String(text.length), Buffer.concat([text, nar]), { 'Transfer-Encoding': 'chunked' }, small.url),
      ];
    } finally {
      await small.close();
    }

    expect([beyond.status, notANumber.status]).toEqual([400, 400]);
    expect(beyond.body).toContain(NARINFO_BYTES_HEADER);
    expect(cutShort.status).toBe(400);
    expect(cutShort.body).toMatch(/ended after 10 bytes/);
    expect(wrongNar.status).toBe(400);
    expect(wrongNar.body).toMatch(/content hashes to/);
    expect(misSplit.status).toBe(400);
    expect(overLimits.map((r) => r.status)).toEqual([413, 413]);
    expect(await cache.hasPaths([built.out])).toEqual(new Set());
    expect(await readdir(join(cache.dir, 'nar'))).toEqual(narsBefore);

    const whole = await send(String(text.length), Buffer.concat([text, nar]));
    expect(whole.status).toBe(204);
    const stored = (await cache.narInfo(built.out))!;
    expect(stored.sigs).toEqual([signFingerprint(coordinatorKey.secretKey, fingerprint(stored))]);
    expect(await readFile(join(cache.dir, stored.url))).toEqual(nar);
  });

  it('serves narinfo as text/x-nix-narinfo and answers HEAD on a NAR with its length and no body', async () => {
    const built = await buildTrivial(work, env);
    await cache.pushFromLocalStore([built.out]);
    const info = (await cache.narInfo(built.out))!;

    const narinfo = await raw('GET', `/cache/${narInfoName(built.out)}`);
    const head = await raw('HEAD', `/cache/${info.url}`);
    const cacheInfo = await raw('GET', '/cache/nix-cache-info');

    expect(narinfo.status).toBe(200);
    expect(narinfo.headers['content-type']).toBe('text/x-nix-narinfo');
    expect(narinfo.body).toBe(await readFile(join(cache.dir, narInfoName(built.out)), 'utf8'));
    expect(head.status).toBe(200);
    expect(head.headers['content-length']).toBe(String(info.fileSize));
    expect(head.body).toBe('');
    expect(cacheInfo.body).toMatch(/^StoreDir: \/nix\/store\n/);
    expect((await raw('GET', `/cache/${'0'.repeat(32)}.narinfo`)).status).toBe(404);
  });

  it('stores the build log of a leased derivation and serves it under log/<drv>', async () => {
    const built = await buildTrivial(work, env);
    const drvName = built.drv.slice('/nix/store/'.length);
    const id = await lease(built.drv);

    const put = await raw(
      'PUT',
      `/cache/log/${drvName}`,
      { Authorization: `Basic ${Buffer.from(`ekaci:${TOKEN}`).toString('base64')}`, [LEASE_HEADER]: id },
      Buffer.from(`built ${built.nonce}\n`),
    );

    expect(put.status).toBe(204);
    const log = await raw('GET', `/cache/log/${drvName}`);
    expect(log.status).toBe(200);
    expect(log.headers['content-type']).toBe('text/plain; charset=utf-8');
    expect(log.body).toContain(`built ${built.nonce}`);
  });

  it('serves private outputs and logs only with a credential, and nothing anonymous when not public', async () => {
    const built = await buildTrivial(work, env);
    await cache.pushFromLocalStore([built.out]);
    const name = `/cache/${narInfoName(built.out)}`;
    const closed = await serveUnderCache(cacheRouter(cache, routerOptions(false)));
    try {
      expect((await raw('GET', name, {}, undefined, closed.url)).status).toBe(401);
      expect((await raw('GET', '/cache/nix-cache-info', {}, undefined, closed.url)).status).toBe(401);
      for (const token of [TOKEN, API_TOKEN]) {
        const r = await raw('GET', name, { Authorization: `Bearer ${token}` }, undefined, closed.url);
        expect(r.status).toBe(200);
      }
    } finally {
      await closed.close();
    }
    expect((await raw('GET', name)).status).toBe(200);
    privatePaths.add(built.out);
    expect((await raw('GET', name)).status).toBe(401);
    expect((await raw('GET', name, { Authorization: `Bearer ${API_TOKEN}` })).status).toBe(200);
  });

  it.each([
    ['GET', '/cache/..%2f..%2f..%2fetc%2fpasswd'],
    ['GET', '/cache/nar/..%2f..%2fnix-cache-info'],
    ['GET', '/cache/%2fetc%2fpasswd'],
    ['PUT', '/cache/nar/..%2f..%2fescaped.nar'],
    ['PUT', '/cache/log/..%2f..%2f..%2ftmp%2fescaped'],
  ])('rejects %s %s, which leaves the cache directory, with 400', async (method, path) => {
    const r = await raw(
      method,
      path,
      { Authorization: `Bearer ${TOKEN}` },
      method === 'PUT' ? Buffer.from('x') : undefined,
    );

    expect(r.status).toBe(400);
  });

  it('refuses a narinfo whose NAR was never uploaded with 400 and stores nothing', async () => {
    const built = await buildTrivial(work, env);
    const other = new BinaryCache({
      dir: await temp.make(),
      secretKey: coordinatorKey.secretKey,
      logger: silentLogger(),
    });
    await other.pushFromLocalStore([built.out]);
    const name = narInfoName(built.out);

    const r = await raw(
      'PUT',
      `/cache/${name}`,
      { Authorization: `Bearer ${TOKEN}`, [LEASE_HEADER]: await lease(built.drv) },
      await readFile(join(other.dir, name)),
    );

    expect(r.status).toBe(400);
    expect(r.body).toMatch(/was not uploaded/);
    expect(await cache.hasPaths([built.out])).toEqual(new Set());
  });

  it('answers 413 to a NAR over the size limit, announced or streamed, and keeps no partial file', async () => {
    const small = await serveUnderCache(cacheRouter(cache, routerOptions(true, { limits: { nar: 10 } })));
    const { port } = new URL(small.url);
    const nar = `/cache/nar/${'1'.repeat(52)}.nar`;
    const built = await buildTrivial(work, env);
    const id = await lease(built.drv);
    const put = (headers: Record<string, string>) =>
      new Promise<number>((resolve, reject) => {
        const req = request({ host: '127.0.0.1', port, method: 'PUT', path: nar, headers }, (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        req.on('error', reject);
        req.end(Buffer.alloc(100_000));
      });
    try {
      const auth = { Authorization: `Bearer ${TOKEN}`, [LEASE_HEADER]: id };
      expect(await put({ ...auth, 'Content-Length': '100000' })).toBe(413);
      expect(await put({ ...auth, 'Transfer-Encoding': 'chunked' })).toBe(413);
    } finally {
      await small.close();
    }
    const left = await readdir(join(cache.dir, 'nar'));
    expect(left.filter((n) => n.startsWith('.') || nar.endsWith(n))).toEqual([]);
  });

  it('lets an empty agent store build a .drv pushed with derivation: true', async () => {
    const built = await buildTrivial(work, env, 2);
    await cache.pushFromLocalStore([built.drv], { derivation: true });
    const subst = ['--option', 'substituters', server.url, '--option', 'trusted-public-keys', cache.publicKey];

    const r = await inFreshStore(await temp.make(), env, ['nix-store', '-r', built.drv, ...subst]);

    expect(r.stderr).not.toMatch(/error/);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(built.out);
  });

  it('takes the .drv closure an API token uploads with nix copy, and nothing that is not content-addressed', async () => {
    const dir = await temp.make();
    const nonce = Math.random().toString(36).slice(2);
    await writeFile(join(dir, 'builder.sh'), `echo ${nonce} > $out\n`);
    await writeFile(
      join(dir, 'default.nix'),
      `let dep = derivation { name = "ca-dep-${nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
         args = [ ./builder.sh ]; };
       in derivation { name = "ca-top-${nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
         args = [ "-c" "echo \${dep} > $out" ]; }`,
    );
    const drv = (
      await runNixChecked('nix-instantiate', [join(dir, 'default.nix'), ...NO_SUBSTITUTERS], { env })
    ).trim();
    const closure = (await runNixChecked('nix-store', ['-qR', drv], { env })).split('\n').filter(Boolean);
    expect(closure).toHaveLength(3); // the source, the dependency's .drv, the top .drv
    const netrc = join(dir, 'netrc');
    await writeFile(netrc, `machine 127.0.0.1 login ekaci password ${API_TOKEN}\n`);
    await runNixChecked(
      'nix',
      [
        ...['--extra-experimental-features', 'nix-command', 'copy', '--derivation', '--to', server.url],
        ...['--option', 'netrc-file', netrc, ...NO_SUBSTITUTERS, drv],
      ],
      { env },
    );
    expect(await cache.hasPaths(closure)).toEqual(new Set(closure));

    // An output is not content-addressed: its path says nothing of its content. Refused, and not stored.
    const built = await buildTrivial(work, env);
    const output = await upload(built.out, undefined, API_TOKEN);
    expect(output.narinfo.status).toBe(403);
    expect(output.narinfo.body).toMatch(/is not content-addressed/);
    expect(await cache.hasPaths([built.out])).toEqual(new Set());
    // A .drv under another path than its content's, or claiming another content hash.
    const other = built.drv;
    expect(await cache.hasPaths([other])).toEqual(new Set());
    const forged = await upload(built.drv, undefined, API_TOKEN, (info) => {
      info.ca = `text:sha256:${nixBase32(createHash('sha256').update('something else').digest())}`;
    });
    expect(forged.narinfo.status).toBe(400);
    expect(forged.narinfo.body).toMatch(/does not have the hash its CA says/);
    // The top .drv's own narinfo, true in every field, but under the path of another .drv.
    const info = (await cache.narInfo(drv))!;
    const moved = await raw(
      'PUT',
      `/cache/${narInfoName(other)}`,
      { Authorization: `Bearer ${API_TOKEN}` },
      Buffer.from(serializeNarInfo({ ...info, storePath: other, sigs: [] })),
    );
    expect(moved.status).toBe(400);
    expect(moved.body).toMatch(/is not the store path of its content/);
    expect(await cache.hasPaths([other])).toEqual(new Set());
    // Logs come from agents holding the lease, never from a client.
    const log = await raw(
      'PUT',
      `/cache/log/${drv.slice('/nix/store/'.length)}`,
      {
        Authorization: `Bearer ${API_TOKEN}`,
      },
      Buffer.from('x'),
    );
    expect(log.status).toBe(403);
  });
});
