import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import { runNix } from '../common/nix/cli.js';
import { storePathHash } from '../common/nix/store-path.js';
import { generateSigningKey } from '../coordinator/cache/signing-key.js';
import { type S3StandIn, startS3StandIn } from './stand-ins/s3-server.js';
import { FakeGitHub, INSTALLATION, completedChecks, deliver, startGitHubCoordinator } from './support/github-app.js';
import { webhookExamples } from './support/github-standin.js';
import { tempDir } from './support/nix-project.js';

const FIXTURE = join(import.meta.dirname, 'fixtures', 'cache-push');
const REPO = 'acme/cached';

/**
 * A pull request whose job names four caches (in the base's configuration): an S3 bucket the agent fills through
 * presigned URLs, a file:// store `nix copy` fills, a cache whose permissions refuse the branch, and an id the
 * server does not know. The head names a fifth cache of its own, which the base's policy ignores.
 */
describe('pushing builds to the operator’s caches', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;
  let s3: S3StandIn;
  let dir: string;
  let repo: ReturnType<FakeGitHub['pullRequest']>;
  const key = generateSigningKey('ekaci-cache-push-test-1');
  const bucketKey = generateSigningKey('ekaci-bucket-test-1');

  beforeAll(async () => {
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';
    github = await FakeGitHub.start();
    s3 = await startS3StandIn('nix-cache');
    dir = tempDir('ekaci-cache-push-');
    repo = github.pullRequest(REPO, FIXTURE, { number: 3 });
    github.api.setPermission(REPO, 'alice', 'write');
    const s3Credentials = join(dir, 's3.env');
    writeFileSync(
      s3Credentials,
      `AWS_ACCESS_KEY_ID=${s3.key.accessKeyId}\nAWS_SECRET_ACCESS_KEY=${s3.key.secretAccessKey}\n`,
      { mode: 0o600 },
    );
    system = await startGitHubCoordinator(github, join(dir, 'data'), {
      security: { allow_private_cache_hosts: true },
      caches: [
        {
          id: 'bucket',
          cache_type: 's3',
          destination: `s3://${s3.bucket}?region=${s3.region}`,
          endpoint: s3.endpoint,
          credentials: { file: { path: s3Credentials } },
          signing_key: bucketKey.secretKey,
          permissions: { allowed_repos: ['acme/*'] },
        },
        {
          id: 'files',
          cache_type: 'nix-copy',
          destination: `file://${join(dir, 'files')}`,
          signing_key: key.secretKey,
          compression: 'xz',
          permissions: { allowed_repos: ['acme/cached'], allowed_branches: ['main'] },
        },
        {
          id: 'main-only',
          cache_type: 'http',
          destination: 'http://127.0.0.1:9',
          permissions: { allowed_repos: ['acme/*'], allowed_branches: ['release-*'] },
        },
        {
          id: 'head-added',
          cache_type: 'nix-copy',
          destination: `file://${join(dir, 'head-added')}`,
          permissions: { allow_all: true },
        },
      ],
    });
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
    await s3?.close();
  });

  it('pushes what the base allows, says in the summary what was refused and why, and any Nix substitutes it', async () => {
    expect((await deliver(system, 'pull_request', repo.payload('opened'))).status).toBe(202);
    const checks = await completedChecks(github, REPO, repo.head, 3);
    const summary = checks['eka-ci / summary']!.output.summary;
    expect(summary).toContain('**Caches**');
    expect(summary).toContain('- cache `bucket`: 2 pushed, 1 not pushed');
    expect(summary).toContain('- cache `files`: 2 pushed, 1 not pushed');
    expect(summary).toContain('- cache `main-only`: 0 pushed, 3 refused');
    expect(summary).toContain('  - `pkgs.tool` refused: cache "main-only" does not allow branch main of acme/cached');
    expect(summary).toContain('  - `pkgs.dep` refused: cache "not-configured" is not configured on this server');
    expect(summary).not.toContain('head-added');
    expect(existsSync(join(dir, 'head-added'))).toBe(false);

    const head = system.coordinator.evaluations.load(REPO, repo.head)!.jobs[0]!;
    const outOf = (attr: string) =>
      system.coordinator.store.outputsOf(head.attrs.find((a) => a.attr === attr)!.drvPath!)[0]!.path;
    const tool = outOf('tool');
    const dep = outOf('dep');
    // nix copy took the closure, signed with the cache's key, compressed as configured.
    for (const path of [tool, dep]) {
      const narinfo = readFileSync(join(dir, 'files', `${storePathHash(path)}.narinfo`), 'utf8');
      expect(narinfo).toMatch(/^Sig: ekaci-cache-push-test-1:/m);
      expect(narinfo).toContain('Compression: xz');
    }
    // The bucket has the same closure; every write to it was signed (the stand-in checks SigV4 and refuses the rest).
    expect(s3.requests.filter((r) => r.status >= 400 && r.method === 'PUT')).toEqual([]);
    expect(s3.requests.some((r) => r.method === 'PUT' && /\/nar\/[a-z0-9]{52}\.nar\.zst$/.test(r.path))).toBe(true);
    const store = join(dir, 'fresh-store');
    const realised = await realiseFrom(s3.bucketUrl, bucketKey.publicKey, store, tool);
    expect(realised.code, realised.stderr).toBe(0);
    expect(existsSync(join(store, tool.slice(1)))).toBe(true);
    expect(existsSync(join(store, dep.slice(1)))).toBe(true);
    // And its build log, where `nix log --store` looks (written in the background once the push is recorded).
    const toolDrv = head.attrs.find((a) => a.attr === 'tool')!.drvPath!;
    const logUrl = `${s3.bucketUrl}/log/${toolDrv.slice('/nix/store/'.length)}`;
    let status = 0;
    for (let i = 0; i < 300 && status !== 200; i++) {
      if (i > 0) await new Promise((resolve) => setTimeout(resolve, 100));
      status = (await fetch(logUrl)).status;
    }
    expect(status).toBe(200);

    const metrics = await (await fetch(`http://127.0.0.1:${system.coordinator.httpPort}/metrics`)).text();
    expect(metrics).toMatch(/ekaci_cache_pushes_total\{cache="bucket",result="pushed"\} 2/);
    expect(metrics).toMatch(/ekaci_cache_pushes_total\{cache="files",result="pushed"\} 2/);
    expect(metrics).toMatch(/ekaci_cache_pushes_total\{cache="main-only",result="refused"\} 3/);
  });

  it('refuses an outside contributor’s pull request, then pushes from the built-in cache when it lands on main', async () => {
    const outside = github.pullRequest('acme/outside', FIXTURE, { number: 4, author: 'mallory', association: 'NONE' });
    github.api.setPermission('acme/outside', 'mallory', 'read');
    expect((await deliver(system, 'pull_request', outside.payload('opened'))).status).toBe(202);
    const checks = await completedChecks(github, 'acme/outside', outside.head, 3);
    const refused = checks['eka-ci / summary']!.output.summary;
    expect(refused).toContain('- cache `bucket`: 0 pushed, 3 refused');
    expect(refused).toContain(
      '  - `pkgs.tool` refused: a pull request from a fork or an outside contributor does not push to cache "bucket"',
    );
    const attrs = system.coordinator.evaluations.load('acme/outside', outside.head)!.jobs[0]!.attrs;
    const tool = system.coordinator.store.outputsOf(attrs.find((a) => a.attr === 'tool')!.drvPath!)[0]!.path;
    expect(existsSync(join(dir, 'head-added', `${storePathHash(tool)}.narinfo`))).toBe(false);

    // Merged as it was: the push to main builds nothing (every output is in the built-in cache already) and pushes
    // the outputs from there, since no agent holds them. A push's own configuration is the policy (it is on main):
    // the cache the head added now counts.
    const before = s3.requests.length;
    const payload = {
      ...webhookExamples('push')[0]!,
      ref: 'refs/heads/main',
      before: outside.base,
      after: outside.head,
      deleted: false,
      repository: { full_name: 'acme/outside', clone_url: outside.cloneUrl, default_branch: 'main' },
      installation: { id: INSTALLATION },
    };
    expect((await deliver(system, 'push', payload)).status).toBe(202);
    const summary = await github.api.waitFor(() => {
      const run = github.api.checkRuns('acme/outside', outside.head).find((r) => r.name === 'eka-ci / summary');
      const text = run?.output.summary ?? '';
      return /cache `bucket`: 2 pushed/.test(text) && text;
    }, 'the push run’s summary');
    expect(summary).toContain('- cache `head-added`: 2 pushed, 1 not pushed');
    expect(summary).toContain('  - `pkgs.tool` refused: cache "files" does not allow repository acme/outside');
    expect(readFileSync(join(dir, 'head-added', `${storePathHash(tool)}.narinfo`), 'utf8')).toContain(
      `StorePath: ${tool}`,
    );
    expect(s3.requests.slice(before).filter((r) => r.method === 'PUT' && r.status >= 400)).toEqual([]);
    const realised = await realiseFrom(s3.bucketUrl, bucketKey.publicKey, join(dir, 'fresh-store-2'), tool);
    expect(realised.code, realised.stderr).toBe(0);
  });
});

/** Realises `path` in a fresh chroot store from one binary cache, trusting `publicKey` only. */
function realiseFrom(substituter: string, publicKey: string, store: string, path: string) {
  return runNix('nix-store', [
    '--store',
    store,
    '--realise',
    path,
    '--option',
    'substituters',
    substituter,
    '--option',
    'trusted-public-keys',
    publicKey,
    '--option',
    'require-sigs',
    'true',
    '--option',
    'narinfo-cache-negative-ttl',
    '0',
  ]);
}
