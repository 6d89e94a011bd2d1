import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { ConfigError } from '../../common/errors.js';
import { silentLogger } from '../../common/logging.js';
import { generateSigningKey } from '../cache/signing-key.js';
import { compileCoordinatorConfig } from '../config.js';
import { type Db, openDatabase } from '../db/database.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import { RunStore } from '../github/run-store.js';
import { type CacheOptions, checkCacheHosts, isPrivateAddress } from './cache-config.js';
import { CachePushService, pushSummaryLines } from './push-service.js';

let dir: string;
let db: Db;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-caches-'));
  db = openDatabase(join(dir, 'ekaci.sqlite'));
});

afterEach(() => {
  db.close();
  rmSync(dir, { recursive: true, force: true });
});

const key = generateSigningKey('ekaci-caches-test-1');

function caches(toml: Array<Record<string, unknown>>, security: Record<string, unknown> = {}): CacheOptions[] {
  return compileCoordinatorConfig(
    { caches: toml, security: { allow_private_cache_hosts: true, ...security } },
    'test.toml',
    { CACHE_USER: 'alice', CACHE_PASSWORD: 'cache-password-1' },
    dir,
  ).caches;
}

describe('[[caches]] configuration', () => {
  it('compiles every cache type, reads the signing key and keeps secrets out of JSON', () => {
    writeFileSync(join(dir, 'cache.sec'), `${key.secretKey}\n`);
    const c = caches([
      {
        id: 'bucket',
        cache_type: 's3',
        destination: 's3://nix-cache/ci/x86?region=eu-west-1',
        endpoint: 'http://127.0.0.1:9000',
        signing_key_file: 'cache.sec',
        permissions: { allowed_repos: ['org/*'] },
      },
      {
        id: 'upstream-style',
        cache_type: 'nix-copy',
        destination: 's3://other-cache?region=us-west-2&endpoint=minio.internal:9000&scheme=http',
        permissions: { allow_all: true },
      },
      {
        id: 'web',
        cache_type: 'http',
        destination: 'http://127.0.0.1:8081',
        credentials: { env: { vars: ['CACHE_USER', 'CACHE_PASSWORD'] } },
        permissions: { allow_all: true },
      },
      { id: 'ssh', cache_type: 'nix-copy', destination: 'ssh-ng://builder@10.0.0.5', permissions: { allow_all: true } },
      {
        id: 'at',
        cache_type: 'attic',
        destination: 'https://attic.example.org/team',
        permissions: { allow_all: true },
      },
      { id: 'cx', cache_type: 'cachix', destination: 'my-cache', compression: 'xz', permissions: { allow_all: true } },
    ]);
    expect(c.map((x) => [x.id, x.type])).toEqual([
      ['bucket', 's3'],
      ['upstream-style', 's3'],
      ['web', 'http'],
      ['ssh', 'nix-copy'],
      ['at', 'attic'],
      ['cx', 'cachix'],
    ]);
    expect(c[0]!.s3).toEqual({
      bucket: 'nix-cache',
      prefix: 'ci/x86',
      region: 'eu-west-1',
      endpoint: 'http://127.0.0.1:9000',
      forcePathStyle: true,
      profile: undefined,
    });
    expect(c[1]!.s3).toMatchObject({
      bucket: 'other-cache',
      region: 'us-west-2',
      endpoint: 'http://minio.internal:9000',
    });
    expect(c[0]!.signingKey).toBe(key.secretKey);
    expect(JSON.stringify(c)).not.toContain(key.secretKey.split(':')[1]);
    expect(c[5]!.compression).toBe('xz');
    expect(c[0]!.compression).toBe('zstd');
  });

  it('refuses what cannot work, naming the cache and the key', () => {
    const bad = (entry: Record<string, unknown>, security?: Record<string, unknown>) => () =>
      caches([{ id: 'c', permissions: { allow_all: true }, ...entry }], security);
    expect(bad({ cache_type: 's3', destination: 'https://bucket' })).toThrow(
      /caches\.c: cache_type "s3" needs destination = "s3:\/\/BUCKET/,
    );
    expect(bad({ cache_type: 'cachix', destination: 's3://b' })).toThrow(
      /an s3:\/\/ destination is for cache_type "s3"/,
    );
    expect(bad({ cache_type: 'nix-copy', destination: 'not a uri' })).toThrow(/a store URI such as ssh-ng/);
    expect(bad({ cache_type: 'attic', destination: 'https://attic.example.org' })).toThrow(/cache name/);
    expect(bad({ cache_type: 'rsync', destination: 'x' })).toThrow(ConfigError);
    expect(bad({ cache_type: 'http', destination: 'http://x.org', signing_key: 'nope' })).toThrow(
      /caches\.c: signing_key: .*not a Nix binary-cache secret key/,
    );
    expect(bad({ cache_type: 'http', destination: 'http://x.org', permissions: {} })).toThrow(/allows no repository/);
    for (const host of ['http://127.0.0.1:1', 'http://localhost/', 'http://169.254.169.254/', 'http://[::1]/']) {
      expect(bad({ cache_type: 'http', destination: host }, { allow_private_cache_hosts: false })).toThrow(
        /is a loopback, private or link-local host \(allow with \[security\] allow_private_cache_hosts\)/,
      );
    }
    expect(
      bad({ cache_type: 'nix-copy', destination: 'ssh-ng://ci@192.168.1.9' }, { allow_private_cache_hosts: false }),
    ).toThrow(/192\.168\.1\.9 is a loopback, private/);
    expect(
      bad(
        { cache_type: 's3', destination: 's3://b-1/x', endpoint: 'http://10.1.2.3' },
        { allow_private_cache_hosts: false },
      ),
    ).toThrow(/10\.1\.2\.3/);
  });

  it('refuses a host name that resolves to a private address, unless allowed', async () => {
    // /etc/hosts here maps "vm" to 127.0.0.1: a name that looks public but is not.
    const [c] = caches([
      { id: 'named', cache_type: 'http', destination: 'http://vm:8080', permissions: { allow_all: true } },
    ]);
    await expect(checkCacheHosts([c!], false)).rejects.toThrow(
      'caches.named: vm resolves to 127.0.0.1, a loopback, private or link-local address',
    );
    await expect(checkCacheHosts([c!], true)).resolves.toBeUndefined();
    expect(
      ['10.0.0.1', '172.31.0.1', '192.168.0.1', 'fe80::1', 'fd00::1', '::ffff:127.0.0.1'].map(isPrivateAddress),
    ).toEqual([true, true, true, true, true, true]);
    expect(['8.8.8.8', '2606:4700::1111', '172.32.0.1'].map(isPrivateAddress)).toEqual([false, false, false]);
  });
});

describe('which builds push where', () => {
  const evaluation = (commit: string, jobCaches: Record<string, string[]>): CommitEvaluation => ({
    commit,
    jobs: Object.entries(jobCaches).map(([name, list]) => ({
      name,
      allowEvalFailures: false,
      maxIncreasePercent: undefined,
      attrs: [],
      seconds: 0,
      caches: list,
    })),
  });

  async function service() {
    const configured = caches([
      {
        id: 'main-only',
        cache_type: 'http',
        destination: 'http://127.0.0.1:1',
        credentials: { env: { vars: ['CACHE_USER', 'CACHE_PASSWORD'] } },
        permissions: { allowed_repos: ['org/*'], allowed_branches: ['main', 'release-*'] },
      },
      {
        id: 'bucket',
        cache_type: 's3',
        destination: 's3://nix-cache',
        endpoint: 'http://127.0.0.1:9',
        permissions: { allowed_repos: ['org/app'] },
      },
    ]);
    const s = new CachePushService(
      db,
      { caches: configured, untrustedPushRepos: ['org/open'], allowPrivateHosts: true },
      silentLogger(),
    );
    await s.start();
    return s;
  }

  it('allows, refuses and reports per run, repository, branch and trust', async () => {
    const s = await service();
    const results: string[] = [];
    s.on('result', (cache: string, result: string) => results.push(`${cache}:${result}`));
    const runs = new RunStore(db);
    const run = (repo: string, branch: string, untrusted = false) =>
      runs.run(
        runs.createRun({
          repo,
          installationId: 1,
          kind: 'pull_request',
          prNumber: 1,
          baseSha: 'b'.repeat(40),
          headSha: 'h'.repeat(40),
          baseCloneUrl: 'x',
          headCloneUrl: 'x',
          branch,
          untrusted,
        }),
      )!;
    const drv = (n: string) => `/nix/store/${n.repeat(32)}-${n}.drv`;
    const root = (n: string, job = 'pkgs') => ({
      side: 'head' as const,
      drvPath: drv(n),
      attr: `${job}.${n}`,
      system: 'x86_64-linux',
    });
    const head = evaluation('h', { pkgs: ['main-only', 'bucket', 'ghost'], tools: ['main-only'] });
    // The base decides: the head added 'tools' caches and 'ghost' to itself; the base's pkgs has two caches.
    const base = evaluation('b', { pkgs: ['main-only', 'bucket', 'ghost'] });

    const onMain = run('org/app', 'main');
    s.planRun(onMain, [root('a'), root('t', 'tools'), { ...root('z'), side: 'base' }], head, base);
    expect(s.pushesFor(drv('a'), 'http://coordinator:8080').map((p) => [p.cacheId, p.type, p.destination])).toEqual([
      ['bucket', 's3', 'http://coordinator:8080'],
      ['main-only', 'http', 'http://127.0.0.1:1'],
    ]);
    // Credentials go with the push that needs them; an s3 push gets none (presigned URLs instead).
    const pushes = s.pushesFor(drv('a'), '');
    expect(pushes.find((p) => p.cacheId === 'main-only')!.env).toEqual({
      CACHE_USER: 'alice',
      CACHE_PASSWORD: 'cache-password-1',
    });
    expect(pushes.find((p) => p.cacheId === 'bucket')!.env).toEqual({});
    expect(s.pushesFor(drv('t'), '')).toEqual([]); // tools has no caches in the base
    expect(s.pushesFor(drv('z'), '')).toEqual([]); // base roots are not pushed

    const feature = run('org/lib', 'feature-x');
    s.planRun(feature, [root('b')], head, base);
    expect(s.pushesFor(drv('b'), '')).toEqual([]);
    const fork = run('org/app', 'main', true);
    s.planRun(fork, [root('c')], head, base);
    expect(s.pushesFor(drv('c'), '')).toEqual([]);
    const allowedFork = run('org/open', 'release-1', true);
    s.planRun(allowedFork, [root('d')], head, base);
    expect(s.pushesFor(drv('d'), '').map((p) => p.cacheId)).toEqual(['main-only']);

    const why = (runId: number) => s.runPushes(runId).map((p) => `${p.attr} ${p.cacheId} ${p.state}: ${p.message}`);
    expect(why(feature.id)).toEqual([
      'pkgs.b bucket refused: cache "bucket" does not allow repository org/lib',
      'pkgs.b ghost refused: cache "ghost" is not configured on this server',
      'pkgs.b main-only refused: cache "main-only" does not allow branch feature-x of org/lib',
    ]);
    expect(why(fork.id)).toContain(
      'pkgs.c bucket refused: a pull request from a fork or an outside contributor does not push to cache "bucket"',
    );

    // The agent's report: pushed once, never asked for again; a failure is kept with its error.
    s.record(drv('a'), [
      { cacheId: 'bucket', ok: true, error: '', attempts: 1, paths: 3 },
      {
        cacheId: 'main-only',
        ok: false,
        error: 'nix copy failed (exit 1): connection refused\nmore',
        attempts: 3,
        paths: 0,
      },
    ]);
    expect(s.pushesFor(drv('a'), '').map((p) => p.cacheId)).toEqual(['main-only']);
    expect(pushSummaryLines(s.runPushes(onMain.id))).toEqual([
      '- cache `bucket`: 1 pushed',
      '- cache `ghost`: 0 pushed, 1 refused',
      '  - `pkgs.a` refused: cache "ghost" is not configured on this server',
      '- cache `main-only`: 0 pushed, 1 failed',
      '  - `pkgs.a` failed after 3 attempts: nix copy failed (exit 1): connection refused',
    ]);
    expect(results).toContain('bucket:pushed');
    expect(results).toContain('main-only:failed');
    expect(results.filter((r) => r.endsWith(':refused')).length).toBeGreaterThanOrEqual(5);

    // A finished run asks for nothing more.
    runs.setRunState(onMain.id, 'done');
    expect(s.pushesFor(drv('a'), '')).toEqual([]);
    s.stop();
  });

  it('reports an attribute whose name holds backticks and newlines on its own line, as code', () => {
    const attr = 'pkgs.`a`\n## all pushed\n[x](https://example.invalid)';
    const push = { attr, drvPath: `/nix/store/${'a'.repeat(32)}-a.drv`, cacheId: 'bucket', attempts: 3, paths: 1 };
    const lines = pushSummaryLines([
      { ...push, state: 'refused', message: 'cache "bucket" refuses `a`\n# and this' },
      { ...push, state: 'failed', message: 'nix copy failed: <b>no</b>' },
    ]);
    expect(lines).toEqual([
      '- cache `bucket`: 0 pushed, 1 failed, 1 refused',
      '  - ``pkgs.`a` ## all pushed [x](https://example.invalid)`` refused: cache "bucket" refuses \\`a\\`',
      '  - ``pkgs.`a` ## all pushed [x](https://example.invalid)`` failed after 3 attempts: nix copy failed: \\<b\\>no\\</b\\>',
    ]);
  });

  it('finds the job of an attribute when one job name is a prefix of another', async () => {
    const s = await service();
    const runs = new RunStore(db);
    const run = runs.run(
      runs.createRun({
        repo: 'org/app',
        installationId: 1,
        kind: 'push',
        headSha: 'h'.repeat(40),
        baseCloneUrl: 'x',
        headCloneUrl: 'x',
        branch: 'main',
      }),
    )!;
    const drv = `/nix/store/${'e'.repeat(32)}-tool.drv`;
    const head = evaluation('h', { pkgs: ['main-only'], 'pkgs.extra': ['bucket'] });
    s.planRun(run, [{ side: 'head', drvPath: drv, attr: 'pkgs.extra.tool', system: 'x86_64-linux' }], head, undefined);
    expect(s.pushesFor(drv, '').map((p) => p.cacheId)).toEqual(['bucket']);
    s.stop();
  });

  it('fails the start with the cache named when its credentials cannot be read', async () => {
    const [c] = caches([
      {
        id: 'broken',
        cache_type: 'http',
        destination: 'http://127.0.0.1:1',
        credentials: { file: { path: 'missing-credentials' } },
        permissions: { allow_all: true },
      },
    ]);
    const s = new CachePushService(
      db,
      { caches: [c!], untrustedPushRepos: [], allowPrivateHosts: true },
      silentLogger(),
    );
    await expect(s.start()).rejects.toThrow(/caches\.broken\.credentials/);
  });
});
