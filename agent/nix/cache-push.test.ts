import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { runNix } from '../../common/nix/cli.js';
import { Outcome, type CachePush } from '../../common/proto/ekaci/agent/v1/agent.js';
import { Build } from '../jobs/build.js';
import { LogSpool } from '../logs/spool.js';
import { testAssign } from '../testing/assign.js';
import { shellDerivation } from '../testing/derivations.js';
import { CacheUploader } from './cache-upload.js';
import { StorePool } from './store-pool.js';
import { closeServer, listenOnLoopback } from '../../test/stand-ins/loopback.js';

// The agent's own environment holds secrets of its own: a push command must never see them.
const CANARY = 'EKACI_TEST_AGENT_SECRET';
const CANARY_VALUE = 'agent-secret-value-that-must-not-leak';

let dir: string;
let spool: LogSpool;
let pool: StorePool;
let stubs: string;
const savedPath = process.env.PATH;

beforeAll(() => {
  process.env[CANARY] = CANARY_VALUE;
});

afterAll(() => {
  delete process.env[CANARY];
});

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-push-'));
  spool = new LogSpool(join(dir, 'spool'));
  spool.prepare();
  pool = new StorePool(silentLogger());
  stubs = join(dir, 'bin');
  mkdirSync(stubs);
  process.env.PATH = `${stubs}:${savedPath}`;
});

afterEach(async () => {
  process.env.PATH = savedPath;
  await pool.closeAll();
  rmSync(dir, { recursive: true, force: true });
});

/** A binary-cache key pair made by Nix itself. */
async function generateSigningKey(name: string): Promise<{ secretKey: string; publicKey: string }> {
  const [secret, pub] = [join(dir, `${name}.sec`), join(dir, `${name}.pub`)];
  const r = await runNix('nix-store', ['--generate-binary-cache-key', name, secret, pub]);
  expect(r.code, r.stderr).toBe(0);
  return { secretKey: readFileSync(secret, 'utf8').trim(), publicKey: readFileSync(pub, 'utf8').trim() };
}

function push(p: Partial<CachePush> & Pick<CachePush, 'cacheId' | 'type' | 'destination'>): CachePush {
  return { compression: 'zstd', env: {}, secretKey: '', attempts: 1, timeoutSeconds: 0, ...p };
}

/** Builds a fresh one-output derivation with `pushes`; the built-in cache is a file:// directory. */
async function buildWith(pushes: CachePush[]) {
  const drv = await shellDerivation(`echo pushed-${Math.random()} > $out`);
  const a = testAssign(`lease-${Math.random().toString(36).slice(2)}`, drv, { pushes });
  const log = spool.open(a.leaseId);
  const context = {
    cacheUrl: `file://${join(dir, 'builtin')}`,
    cachePublicKey: '',
    netrcPath: spool.netrcPath,
    pool,
    uploader: new CacheUploader('secret'),
    spool,
    token: 'agent-token',
  };
  const result = await new Build(a, context, log, silentLogger()).run();
  expect(result.error).toBe('');
  expect(result.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
  const out = result.outputs[0]!.path;
  return { result, out };
}

/** A stand-in for a CLI (attic, cachix): records its arguments, environment and attic config, then runs `tail`. */
function stub(name: string, tail = 'exit 0'): string {
  const record = join(dir, `${name}.record`);
  writeFileSync(
    join(stubs, name),
    `#!/bin/sh\n{ echo "ARGS: $*"; env | sort; echo "CONFIG:"; cat "$XDG_CONFIG_HOME/attic/config.toml" 2>/dev/null; } > ${record}\n${tail}\n`,
  );
  chmodSync(join(stubs, name), 0o755);
  return record;
}

const substituteOptions = (publicKey: string) => [
  '--option',
  'require-sigs',
  'true',
  '--option',
  'trusted-public-keys',
  publicKey,
  '--option',
  'narinfo-cache-negative-ttl',
  '0',
  '--option',
  'narinfo-cache-positive-ttl',
  '0',
];

describe('pushes to the operator’s caches after a build', () => {
  it('copies the outputs to a file:// store signed with the cache’s key, which a fresh store substitutes from', async () => {
    const key = await generateSigningKey('ekaci-test-copy-1');
    const dest = join(dir, 'copy-cache');
    const { result, out } = await buildWith([
      push({ cacheId: 'files', type: 'nix-copy', destination: `file://${dest}`, secretKey: key.secretKey }),
    ]);
    expect(result.pushes).toEqual([{ cacheId: 'files', ok: true, error: '', attempts: 1, paths: 1 }]);
    const narinfo = readFileSync(join(dest, `${out.slice(11, 43)}.narinfo`), 'utf8');
    expect(narinfo).toContain('Compression: zstd');
    expect(narinfo).toMatch(/^Sig: ekaci-test-copy-1:/m);
    const copyFrom = (store: string, publicKey: string) =>
      runNix('nix', [
        ...['--extra-experimental-features', 'nix-command', 'copy', '--from', `file://${dest}`, '--to', store, out],
        ...substituteOptions(publicKey),
      ]);
    const copied = await copyFrom(join(dir, 'fresh-store'), key.publicKey);
    expect(copied.code, copied.stderr).toBe(0);
    const wrongKey = await copyFrom(join(dir, 'other-store'), (await generateSigningKey('someone-else-1')).publicKey);
    expect(wrongKey.code).not.toBe(0);
    expect(wrongKey.stderr).toContain('lacks a valid signature');
  });

  it('uploads to an HTTP binary cache that takes PUT, with the cache’s credentials, and Nix substitutes from it', async () => {
    const key = await generateSigningKey('ekaci-test-http-1');
    const cache = await httpCache('pusher', 'pass-word-1234');
    try {
      const { result, out } = await buildWith([
        push({
          cacheId: 'web',
          type: 'http',
          destination: cache.url,
          secretKey: key.secretKey,
          env: { HTTP_USERNAME: 'pusher', HTTP_PASSWORD: 'pass-word-1234' },
        }),
      ]);
      expect(result.pushes?.[0]).toMatchObject({ cacheId: 'web', ok: true, attempts: 1 });
      expect(cache.unauthorised).toBe(0);
      const hash = out.slice(11, 43);
      expect(cache.puts).toContain(`/${hash}.narinfo`);
      expect(cache.puts.some((p) => /^\/nar\/[a-z0-9]{52}\.nar\.zst$/.test(p))).toBe(true);
      const store = join(dir, 'http-store');
      const r = await runNix('nix-store', [
        '--store',
        store,
        '--realise',
        out,
        '--option',
        'substituters',
        cache.url,
        ...substituteOptions(key.publicKey),
      ]);
      expect(r.code).toBe(0);
    } finally {
      await cache.close();
    }
  });

  it('runs attic and cachix with the credentials for that command only, never the agent’s environment', async () => {
    const attic = stub('attic');
    const cachix = stub('cachix');
    const key = await generateSigningKey('ekaci-test-cachix-1');
    const { result, out } = await buildWith([
      push({
        cacheId: 'team-attic',
        type: 'attic',
        destination: 'https://attic.example.org/prefix/team',
        env: { ATTIC_TOKEN: 'attic-token-value-1' },
      }),
      push({
        cacheId: 'oss',
        type: 'cachix',
        destination: 'my-oss-cache',
        env: { CACHIX_AUTH_TOKEN: 'cachix-token-value-1' },
        secretKey: key.secretKey,
      }),
    ]);
    expect(result.pushes?.map((p) => [p.cacheId, p.ok])).toEqual([
      ['team-attic', true],
      ['oss', true],
    ]);
    const a = readFileSync(attic, 'utf8');
    expect(a).toContain(`ARGS: push ekaci:team ${out}`);
    expect(a).toContain('endpoint = "https://attic.example.org/prefix/"');
    expect(a).toContain('token = "attic-token-value-1"');
    const c = readFileSync(cachix, 'utf8');
    expect(c).toContain(`ARGS: push my-oss-cache ${out}`);
    expect(c).toContain('CACHIX_AUTH_TOKEN=cachix-token-value-1');
    expect(c).toContain(`CACHIX_SIGNING_KEY=${key.secretKey.split(':')[1]}`);
    // Neither saw the agent's own secrets, nor each other's.
    for (const text of [a, c]) expect(text).not.toContain(CANARY_VALUE);
    expect(a).not.toContain('cachix-token-value-1');
    expect(c).not.toContain('attic-token-value-1');
    // Their private home (with attic's token file) is gone once they ended.
    const home = /^HOME=(.*)$/m.exec(a)![1]!;
    expect(existsSync(home)).toBe(false);
    expect(dirname(home)).toContain(join(dir, 'spool'));
  });

  it('retries a push to a cache that is down, then reports it; the build still succeeds', async () => {
    const closed = await httpCache('u', 'p');
    await closed.close();
    const { result } = await buildWith([push({ cacheId: 'down', type: 'http', destination: closed.url, attempts: 2 })]);
    const [r] = result.pushes!;
    expect(r).toMatchObject({ cacheId: 'down', ok: false, attempts: 2 });
    expect(r!.error).toMatch(/nix copy failed \(exit 1\)/);
  });

  it('stops a push command at its timeout and says so; a missing tool is named', async () => {
    stub('cachix', 'exec /bin/sleep 30');
    const { result } = await buildWith([
      push({ cacheId: 'slow', type: 'cachix', destination: 'slow-cache', timeoutSeconds: 1 }),
      push({ cacheId: 'absent', type: 'attic', destination: 'https://attic.example.org/x' }),
    ]);
    expect(result.pushes?.[0]?.error).toMatch(/cachix push failed \(timed out after 1 s\)/);
    expect(result.pushes?.[1]?.error).toBe('attic is not installed on this agent (not on PATH)');
  });
});

/** A Nix HTTP binary cache that stores what is PUT (with Basic auth) and serves it back to anyone. */
async function httpCache(user: string, password: string) {
  const root = mkdtempSync(join(dir, 'http-cache-'));
  const files = new Map<string, Buffer>([['/nix-cache-info', Buffer.from('StoreDir: /nix/store\n')]]);
  const state = { puts: [] as string[], unauthorised: 0 };
  const expected = `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;
  const server: Server = createServer((req: IncomingMessage, res) => {
    const path = new URL(req.url ?? '/', 'http://x').pathname;
    if (req.method === 'PUT') {
      if (req.headers.authorization !== expected) {
        state.unauthorised++;
        res.writeHead(401, { 'www-authenticate': 'Basic realm="cache"' }).end();
        return;
      }
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        files.set(path, Buffer.concat(chunks));
        state.puts.push(path);
        res.writeHead(201).end();
      });
      return;
    }
    const body = files.get(path);
    if (!body) return void res.writeHead(404).end();
    res.writeHead(200, { 'content-length': body.length });
    res.end(req.method === 'HEAD' ? undefined : body);
  });
  const url = await listenOnLoopback(server);
  return {
    url,
    root,
    get puts() {
      return state.puts;
    },
    get unauthorised() {
      return state.unauthorised;
    },
    close: () => closeServer(server),
  };
}
