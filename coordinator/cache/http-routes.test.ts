import { request } from 'node:http';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { NO_SUBSTITUTERS, runNix, runNixChecked } from '../../common/nix/cli.js';
import { BinaryCache } from './binary-cache.js';
import { cacheRouter, tokenAuthenticator, uploadToken } from './http-routes.js';
import { fingerprint } from '../../common/nix/narinfo.js';
import { generateSigningKey, signFingerprint } from './signing-key.js';
import { NIX, TempDirs, buildTrivial, inFreshStore, nixEnv, serveUnderCache, type TestServer } from './test-support.js';

const TOKEN = 'agent-token-0123456789';
const temp = new TempDirs();
const coordinatorKey = generateSigningKey('coordinator-http-1');
let work: string;
let env: NodeJS.ProcessEnv;
let netrc: string;
let cache: BinaryCache;
let server: TestServer;

beforeAll(async () => {
  work = await temp.make();
  env = nixEnv(work);
  netrc = await netrcWith(TOKEN);
  cache = new BinaryCache({ dir: await temp.make(), secretKey: coordinatorKey.secretKey, logger: silentLogger() });
  server = await serveUnderCache(cacheRouter(cache, { authenticateUpload: tokenAuthenticator((t) => t === TOKEN) }));
});
afterAll(async () => {
  await server?.close();
  await temp.removeAll();
});

async function netrcWith(password: string): Promise<string> {
  const file = join(work, `netrc-${password.length}-${Math.random()}`);
  await writeFile(file, `machine 127.0.0.1\nlogin agent\npassword ${password}\n`, { mode: 0o600 });
  return file;
}

/** What an agent runs to upload its outputs: `nix copy --to http://…` with its own (untrusted) key. */
async function agentCopy(paths: string[], netrcFile: string | undefined, url = server.url) {
  const agentKey = join(work, 'agent.sec');
  await writeFile(agentKey, generateSigningKey('agent-1').secretKey);
  const auth = netrcFile === undefined ? [] : ['--option', 'netrc-file', netrcFile];
  return runNix(
    'nix',
    [...NIX, 'copy', '--to', `${url}?secret-key=${agentKey}`, ...auth, ...NO_SUBSTITUTERS, ...paths],
    {
      env,
    },
  );
}

function narInfoFile(storePath: string): string {
  return join(cache.dir, `${storePath.slice('/nix/store/'.length, '/nix/store/'.length + 32)}.narinfo`);
}

interface RawResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

/** A request sent exactly as written: fetch() would normalise `..` segments away before they reach the server. */
function raw(method: string, path: string, headers: Record<string, string> = {}, body?: Buffer): Promise<RawResponse> {
  const { port } = new URL(server.url);
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
  it('takes nix copy --to http://…/cache from an agent with the token and stores it under the coordinator signature', async () => {
    const built = await buildTrivial(work, env, 1);

    const r = await agentCopy([built.out], netrc);

    expect(r.stderr).not.toMatch(/error/);
    expect(r.code).toBe(0);
    const info = await cache.narInfo(built.out);
    expect(info).toBeDefined();
    expect(info?.sigs).toEqual([signFingerprint(coordinatorKey.secretKey, fingerprint(info!))]);
    expect(await cache.hasPaths([built.out, ...built.deps])).toEqual(new Set([built.out, ...built.deps]));
  });

  it('lets a separate store substitute uploaded paths over HTTP, trusting only the coordinator key', async () => {
    const built = await buildTrivial(work, env, 2);
    expect((await agentCopy([built.out], netrc)).code).toBe(0);
    const empty = await temp.make();

    const r = await inFreshStore(empty, env, [
      'nix-store',
      '-r',
      built.out,
      ...['--option', 'substituters', server.url, '--option', 'trusted-public-keys', cache.publicKey],
    ]);

    expect(r.stderr).not.toMatch(/error|not signed/);
    expect(r.stdout.trim()).toBe(built.out);
    const untrusting = await inFreshStore(await temp.make(), env, [
      'nix-store',
      '-r',
      built.out,
      ...['--option', 'substituters', server.url, '--option', 'trusted-public-keys', generateSigningKey('x').publicKey],
    ]);
    expect(untrusting.code).not.toBe(0);
  });

  it('answers 401 to uploads without a token or with a wrong one, and writes nothing', async () => {
    const built = await buildTrivial(work, env);
    const narsBefore = await readdir(join(cache.dir, 'nar'));

    const anonymous = await agentCopy([built.out], undefined);
    const wrong = await agentCopy([built.out], await netrcWith('not-the-token'));

    for (const r of [anonymous, wrong]) {
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/401/);
    }
    expect(await cache.hasPaths([built.out])).toEqual(new Set());
    expect(await readdir(join(cache.dir, 'nar'))).toEqual(narsBefore);
    const put = await raw('PUT', `/cache/log/${built.drv.slice('/nix/store/'.length)}`, {}, Buffer.from('x'));
    expect(put.status).toBe(401);
    expect(put.headers['www-authenticate']).toMatch(/^Basic /);
  });

  it('serves narinfo as text/x-nix-narinfo and answers HEAD on a NAR with its length and no body', async () => {
    const built = await buildTrivial(work, env);
    await cache.pushFromLocalStore([built.out]);
    const info = (await cache.narInfo(built.out))!;

    const narinfo = await raw('GET', `/cache/${narInfoFile(built.out).split('/').pop()}`);
    const head = await raw('HEAD', `/cache/${info.url}`);
    const cacheInfo = await raw('GET', '/cache/nix-cache-info');

    expect(narinfo.status).toBe(200);
    expect(narinfo.headers['content-type']).toBe('text/x-nix-narinfo');
    expect(narinfo.body).toBe(await readFile(narInfoFile(built.out), 'utf8'));
    expect(head.status).toBe(200);
    expect(head.headers['content-length']).toBe(String(info.fileSize));
    expect(head.body).toBe('');
    expect(cacheInfo.body).toMatch(/^StoreDir: \/nix\/store\n/);
    expect((await raw('GET', `/cache/${'0'.repeat(32)}.narinfo`)).status).toBe(404);
  });

  it('stores build logs from nix store copy-log and serves them under log/<drv>', async () => {
    const built = await buildTrivial(work, env);
    const drvName = built.drv.slice('/nix/store/'.length);

    await runNixChecked(
      'nix',
      [...NIX, 'store', 'copy-log', '--to', server.url, '--option', 'netrc-file', netrc, built.drv],
      {
        env,
      },
    );

    const log = await raw('GET', `/cache/log/${drvName}`);
    expect(log.status).toBe(200);
    expect(log.headers['content-type']).toBe('text/plain; charset=utf-8');
    expect(log.body).toContain(`built ${built.nonce}`);
  });

  it('accepts the token as a Bearer token as well as a Basic password', async () => {
    const drvName = (await buildTrivial(work, env)).drv.slice('/nix/store/'.length);

    const put = await raw(
      'PUT',
      `/cache/log/${drvName}`,
      { Authorization: `Bearer ${TOKEN}` },
      Buffer.from('bearer log'),
    );

    expect(put.status).toBe(204);
    expect((await raw('GET', `/cache/log/${drvName}`)).body).toBe('bearer log');
    expect(uploadToken(`Basic ${Buffer.from(`anyone:${TOKEN}`).toString('base64')}`)).toBe(TOKEN);
    expect(uploadToken('Basic bm9wYXNzd29yZA==')).toBeUndefined();
    expect(uploadToken(undefined)).toBeUndefined();
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
    const name = narInfoFile(built.out).split('/').pop() ?? '';

    const r = await raw(
      'PUT',
      `/cache/${name}`,
      { Authorization: `Bearer ${TOKEN}` },
      await readFile(join(other.dir, name)),
    );

    expect(r.status).toBe(400);
    expect(r.body).toMatch(/was not uploaded/);
    expect(await cache.hasPaths([built.out])).toEqual(new Set());
  });

  it('answers 413 to a NAR over the size limit, announced or streamed, and keeps no partial file', async () => {
    const small = await serveUnderCache(
      cacheRouter(cache, { authenticateUpload: tokenAuthenticator((t) => t === TOKEN), limits: { nar: 10 } }),
    );
    const { port } = new URL(small.url);
    const nar = `/cache/nar/${'1'.repeat(52)}.nar`;
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
      expect(await put({ Authorization: `Bearer ${TOKEN}`, 'Content-Length': '100000' })).toBe(413);
      expect(await put({ Authorization: `Bearer ${TOKEN}`, 'Transfer-Encoding': 'chunked' })).toBe(413);
    } finally {
      await small.close();
    }
    const left = await readdir(join(cache.dir, 'nar'));
    expect(left.filter((n) => n.startsWith('.') || nar.endsWith(n))).toEqual([]);
  });

  it('lets an empty agent store build a .drv pushed with derivation: true and upload the result', async () => {
    const built = await buildTrivial(work, env, 2);
    await cache.pushFromLocalStore([built.drv], { derivation: true });
    const subst = ['--option', 'substituters', server.url, '--option', 'trusted-public-keys', cache.publicKey];
    const script = [
      `nix-store -r ${built.drv} ${subst.map((a) => `'${a}'`).join(' ')}`,
      `nix ${NIX.map((a) => `'${a}'`).join(' ')} copy --to ${server.url} --option netrc-file ${netrc} ${built.out}`,
    ].join(' && ');
    const upload = new Set(await cache.hasPaths([built.out, ...built.deps]));
    expect(upload).toEqual(new Set());

    const r = await inFreshStore(await temp.make(), env, ['sh', '-c', script]);

    expect(r.stderr).not.toMatch(/error/);
    expect(r.code).toBe(0);
    expect(await cache.hasPaths([built.out, ...built.deps])).toEqual(new Set([built.out, ...built.deps]));
  });
});
