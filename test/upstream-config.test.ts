import { generateKeyPairSync } from 'node:crypto';
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseToml, stringify as stringifyToml } from 'smol-toml';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError } from '../common/errors.js';
import { compileCoordinatorConfig, loadCoordinatorConfig } from '../coordinator/config.js';
import { RepoConfigError } from '../coordinator/repo-config/errors.js';
import { compileRepoConfig, loadRepoConfig } from '../coordinator/repo-config/repo-config.js';
import { makeTree, temp } from '../coordinator/repo-config/test-support.js';

/**
 * A user moving from upstream eka-ci (ekala-project/eka-ci) keeps their files: test/fixtures/upstream holds an
 * `ekaci.toml` and a `.ekaci/config.json` written as upstream documents them, using every key upstream has. Each
 * key either compiles into the option that carries its meaning here, or stops the start (the repository's check) with
 * a message naming the key and saying what to write instead.
 */

const FIXTURES = join(dirname(fileURLToPath(import.meta.url)), 'fixtures', 'upstream');

// Caches and credential sources compile AWS SDK clients, which warn on every Node older than their next target.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';

const KEY = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({
  type: 'pkcs1',
  format: 'pem',
}) as string;
const KEY_FRAGMENT = KEY.split('\n')[5]!;
const WEBHOOK_SECRET = 'webhook-secret-for-the-upstream-fixture';

/** Every key of upstream's ekaci.toml (its docs and its ConfigFile struct); the two fixtures use them all. */
const UPSTREAM_TOML_KEYS = [
  'db_path',
  'logs_dir',
  'require_approval',
  'merge_queue_require_approval',
  'build_no_output_timeout_seconds',
  'build_max_duration_seconds',
  'graph_lru_capacity',
  'default_merge_method',
  'web.address',
  'web.port',
  'web.allowed_origins',
  'web.static_dir',
  'web.bundle_path',
  'unix.socket_path',
  'oauth.client_id',
  'oauth.client_secret',
  'oauth.redirect_url',
  'oauth.jwt_secret',
  'security.webhook_secret',
  'security.allow_insecure_webhooks',
  'security.allow_private_cache_hosts',
  'security.max_hook_timeout_seconds',
  'security.audit_hooks',
  'github_apps.id',
  'github_apps.credentials',
  'github_apps.permissions.allow_all',
  'github_apps.permissions.allowed_repos',
  'github_apps.permissions.allowed_branches',
  'caches.id',
  'caches.cache_type',
  'caches.destination',
  'caches.credentials',
  'caches.permissions.allow_all',
  'caches.permissions.allowed_repos',
  'caches.permissions.allowed_branches',
  'gitea_instances.domain',
  'gitea_instances.token',
  'gitlab_instances.domain',
  'gitlab_instances.token',
];

/** Parts of the fixture that other work of issue 15 adds (caches, credential sources, hooks): tested further down. */
const ISSUE_15_APPS = ['from-vault', 'from-secrets-manager', 'from-instance-metadata', 'from-aws-profile'];
const ISSUE_15_SECURITY_KEYS = ['allow_private_cache_hosts', 'max_hook_timeout_seconds', 'audit_hooks'];

let dir: string;
let credentialsDir: string;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-upstream-'));
  credentialsDir = join(dir, 'credentials');
  await mkdir(credentialsDir);
  await writeFile(join(dir, 'github-app.json'), JSON.stringify({ GITHUB_APP_ID: '1001', GITHUB_APP_PRIVATE_KEY: KEY }));
  await writeFile(join(dir, 'github-app.pem'), KEY);
  await writeFile(
    join(credentialsDir, 'github-app'),
    JSON.stringify({ GITHUB_APP_ID: '3003', GITHUB_APP_PRIVATE_KEY: KEY }),
  );
  await writeFile(
    join(dir, 'cache-credentials'),
    'AWS_ACCESS_KEY_ID=AKIAFIXTURE\nAWS_SECRET_ACCESS_KEY=fixture-secret\n',
  );
  await writeFile(join(credentialsDir, 's3-cache-creds'), 'AWS_ACCESS_KEY_ID=AKIASYSTEMD\nAWS_SECRET_ACCESS_KEY=x\n');
  env = {
    UPSTREAM_APP_ID: '2002',
    UPSTREAM_APP_KEY: KEY,
    CREDENTIALS_DIRECTORY: credentialsDir,
    VAULT_TOKEN: 'vault-token-for-tests',
    AWS_ACCESS_KEY_ID: 'AKIAENVIRONMENT',
    AWS_SECRET_ACCESS_KEY: 'environment-secret-key',
    CACHIX_AUTH_TOKEN: 'cachix-token-for-tests',
    ATTIC_TOKEN: 'attic-token-for-tests',
    AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: 'true',
  };
});

afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
  await temp.removeAll();
});

/** A fixture copied next to the credential files, so its relative paths resolve to them. */
async function fixtureFile(name: string): Promise<string> {
  const file = join(dir, name);
  await copyFile(join(FIXTURES, name), file);
  return file;
}

/** The fixture without the parts other work of issue 15 adds, written as TOML beside the credential files. */
async function fixtureWithoutIssue15(): Promise<string> {
  const raw = parseToml(await readFile(join(FIXTURES, 'ekaci.toml'), 'utf8')) as Record<string, unknown>;
  delete raw.caches;
  raw.github_apps = (raw.github_apps as Array<{ id: string }>).filter((a) => !ISSUE_15_APPS.includes(a.id));
  const security = raw.security as Record<string, unknown>;
  for (const key of ISSUE_15_SECURITY_KEYS) delete security[key];
  const file = join(dir, 'ekaci-core.toml');
  await writeFile(file, stringifyToml(raw));
  return file;
}

function configError(raw: unknown, extraEnv: NodeJS.ProcessEnv = {}): ConfigError {
  try {
    compileCoordinatorConfig(raw, 'ekaci.toml', { ...env, ...extraEnv }, dir);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as Error).message).not.toContain(KEY_FRAGMENT);
    return err as ConfigError;
  }
  throw new Error('the configuration compiled');
}

/** Dotted key paths of a TOML document, arrays of tables flattened (`github_apps.id`); credential tables kept whole. */
function keyPaths(value: unknown, prefix = ''): string[] {
  if (Array.isArray(value)) return value.flatMap((v) => keyPaths(v, prefix));
  if (typeof value !== 'object' || value === null) return [];
  return Object.entries(value).flatMap(([k, v]) => {
    const path = prefix ? `${prefix}.${k}` : k;
    return k === 'credentials' ? [path] : [path, ...keyPaths(v, path)];
  });
}

const OAUTH = {
  client_id: 'Iv1.0123456789abcdef',
  client_secret: 'oauth-client-secret-for-tests',
  redirect_url: 'https://ci.example.org/auth/callback',
  jwt_secret: 'a-session-signing-secret-of-40-characters',
};

describe("upstream eka-ci's ekaci.toml", () => {
  it('is covered key by key by the two fixtures', async () => {
    const used = new Set<string>();
    for (const name of ['ekaci.toml', 'ekaci-errors.toml']) {
      for (const k of keyPaths(parseToml(await readFile(join(FIXTURES, name), 'utf8')))) used.add(k);
    }
    expect(UPSTREAM_TOML_KEYS.filter((k) => !used.has(k))).toEqual([]);
  });

  it('compiles every key eka-ci shares with upstream into the option that carries its meaning', async () => {
    const o = loadCoordinatorConfig(await fixtureWithoutIssue15(), env);
    expect(o.noOutputTimeoutSeconds).toBe(1800);
    expect(o.maxDurationSeconds).toBe(7200);
    expect(o.graphLruCapacity).toBe(250_000);
    // Top-level require_approval is [security] require_approval here: outside authors wait for approval.
    expect(o.security.requireApproval).toBe(true);
    expect(o.web).toMatchObject({
      address: '0.0.0.0',
      port: 3030,
      // allowed_origins is cors_origins; upstream accepted an origin written with a trailing slash.
      corsOrigins: ['https://dash.example.org', 'http://localhost:5173'],
    });
    expect(o.oauth).toMatchObject({
      clientId: OAUTH.client_id,
      clientSecret: OAUTH.client_secret,
      redirectUrl: OAUTH.redirect_url,
      jwtSecret: OAUTH.jwt_secret,
    });
    expect(o.security).toMatchObject({ webhookSecret: WEBHOOK_SECRET, allowInsecureWebhooks: false });
    const everywhere = { allowAll: true, allowedRepos: [], allowedBranches: undefined };
    expect(o.githubApps).toMatchObject([
      {
        id: 'from-file',
        credentials: { appId: 1001, privateKey: KEY },
        permissions: { allowAll: false, allowedRepos: ['acme/*'], allowedBranches: ['main', 'release/*'] },
        apiUrl: 'https://api.github.com',
      },
      { id: 'from-env', credentials: { appId: 2002, privateKey: KEY }, permissions: everywhere },
      { id: 'from-key-file', credentials: { appId: 2002, privateKey: KEY }, permissions: everywhere },
      { id: 'from-systemd', credentials: { appId: 3003, privateKey: KEY }, permissions: everywhere },
    ]);
  });

  it('refuses the keys that cannot keep their meaning, all in one start-up error naming each', async () => {
    let error: unknown;
    try {
      loadCoordinatorConfig(await fixtureFile('ekaci-errors.toml'), env);
    } catch (err) {
      error = err;
    }
    expect(error).toBeInstanceOf(ConfigError);
    const lines = (error as Error).message.split('\n');
    const file = join(dir, 'ekaci-errors.toml');
    expect(lines.map((l) => l.slice(0, l.indexOf(': ', file.length + 2)))).toEqual(
      [
        'db_path',
        'logs_dir',
        'merge_queue_require_approval',
        'default_merge_method',
        'gitea_instances',
        'gitlab_instances',
        'unix',
        'web.static_dir',
        'web.bundle_path',
        'oauth.redirect_url',
      ].map((key) => `${file}: ${key}`),
    );
    for (const secret of ['oauth-client-secret-for-tests', 'gitea-token-for-tests', 'gitlab-token-for-tests']) {
      expect((error as Error).message).not.toContain(secret);
    }
  });

  it.each([
    [{ db_path: '/var/lib/ekaci/sqlite.db' }, 'ekaci.toml: db_path: ', 'set data_dir = "/var/lib/ekaci" instead'],
    [{ db_path: 'state/sqlite.db', data_dir: '/srv/ekaci' }, 'ekaci.toml: db_path: ', 'set data_dir instead'],
    [{ logs_dir: '/var/log/ekaci' }, 'ekaci.toml: logs_dir: ', 'build logs go to <data_dir>/logs'],
    [{ merge_queue_require_approval: true }, 'ekaci.toml: merge_queue_require_approval: ', 'remove the key'],
    [{ default_merge_method: 'squash' }, 'ekaci.toml: default_merge_method: ', '"@eka-ci merge squash"'],
    [{ web: { static_dir: '/srv/ui' } }, 'ekaci.toml: web.static_dir: ', 'served by the coordinator'],
    [{ web: { bundle_path: '/srv/ui' } }, 'ekaci.toml: web.bundle_path: ', 'served by the coordinator'],
    [{ unix: { socket_path: '/run/ekaci.socket' } }, 'ekaci.toml: unix: ', 'api_tokens'],
    [{ gitea_instances: [{ domain: 'g.example.org', token: 't' }] }, 'ekaci.toml: gitea_instances: ', 'GitHub only'],
    [{ gitlab_instances: [{ domain: 'g.example.org', token: 't' }] }, 'ekaci.toml: gitlab_instances: ', 'GitHub only'],
    [
      { oauth: { ...OAUTH, redirect_url: 'https://ci.example.org/github/auth/callback' } },
      'ekaci.toml: oauth.redirect_url: ',
      'set redirect_url = "https://ci.example.org/auth/callback"',
    ],
    [
      { require_approval: true, security: { require_approval: false } },
      'ekaci.toml: require_approval: set twice',
      'keep security.require_approval',
    ],
    [
      { web: { allowed_origins: ['https://a.example.org'], cors_origins: ['https://b.example.org'] } },
      'ekaci.toml: web.allowed_origins: set twice',
      'keep web.cors_origins',
    ],
    // Upstream's permissions default to allow_all = true; here an app that names no repository is a mistake.
    [
      { github_apps: [{ id: 'main' }], security: { webhook_secret: WEBHOOK_SECRET } },
      'ekaci.toml: github_apps.0.permissions: ',
      'list allowed_repos, or set allow_all = true',
    ],
    // Upstream generated a session key when jwt_secret was missing; its README's example is too short to sign with.
    [{ oauth: { ...OAUTH, jwt_secret: undefined } }, 'ekaci.toml: oauth.jwt_secret: ', 'jwt_secret_file'],
    [{ oauth: { ...OAUTH, jwt_secret: 'your-jwt-secret' } }, 'ekaci.toml: oauth.jwt_secret: ', 'at least 32'],
  ])('refuses %j, naming the key and what to write instead', (raw, starts, advice) => {
    const message = configError(raw).message;
    expect(message.startsWith(starts)).toBe(true);
    expect(message).toContain(advice);
  });

  it("refuses upstream's EKA_CI_* environment overrides, saying where the setting goes", () => {
    const message = configError({}, { EKA_CI_CONFIG_FILE: '/etc/ekaci.toml', EKA_CI_REQUIRE_APPROVAL: 'true' }).message;
    expect(message.split('\n')).toEqual([
      expect.stringMatching(/^environment: EKA_CI_CONFIG_FILE: .*ekaci-coordinator --config FILE$/),
      expect.stringMatching(/^environment: EKA_CI_REQUIRE_APPROVAL: .*set the key in the configuration file/),
    ]);
  });

  it("reads upstream's EKACI_ALLOW_INSECURE_WEBHOOKS and EKACI_WEB_ALLOWED_ORIGINS over the file", () => {
    const o = compileCoordinatorConfig(
      { web: { allowed_origins: ['https://file.example.org'] }, security: { allow_insecure_webhooks: false } },
      'ekaci.toml',
      { EKACI_ALLOW_INSECURE_WEBHOOKS: 'yes', EKACI_WEB_ALLOWED_ORIGINS: 'https://a.example.org/, http://b:5173' },
      dir,
    );
    expect(o.security.allowInsecureWebhooks).toBe(true);
    expect(o.web.corsOrigins).toEqual(['https://a.example.org', 'http://b:5173']);
    const off = compileCoordinatorConfig({}, 'ekaci.toml', { EKACI_ALLOW_INSECURE_WEBHOOKS: '0' }, dir);
    expect(off.security.allowInsecureWebhooks).toBe(false);
  });

  it('keeps keys upstream and eka-ci agree on when they are written with their defaults', () => {
    const o = compileCoordinatorConfig(
      { merge_queue_require_approval: false, default_merge_method: 'merge', require_approval: false },
      'ekaci.toml',
      {},
      dir,
    );
    expect(o.security.requireApproval).toBe(false);
  });
});

// Keys of the rest of issue 15: binary caches, every credential source, hooks.
describe("upstream eka-ci's ekaci.toml: caches, credential sources and hooks", () => {
  it('loads the whole fixture', async () => {
    const o = loadCoordinatorConfig(await fixtureFile('ekaci.toml'), env);
    expect(o.githubApps.map((a) => a.id)).toEqual([
      'from-file',
      'from-env',
      'from-key-file',
      'from-systemd',
      ...ISSUE_15_APPS,
    ]);
    expect(o.security).toMatchObject({ allowPrivateCacheHosts: true });
    expect(o.hooks).toMatchObject({ maxTimeoutSeconds: 600, audit: false });
  });

  it("compiles upstream's caches: nix-copy to s3:// is an S3 cache, with its region, endpoint and profile", async () => {
    const o = loadCoordinatorConfig(await fixtureFile('ekaci.toml'), env);
    const byId = new Map(o.caches.map((c) => [c.id, c]));
    expect([...byId.keys()]).toEqual([
      'production-s3',
      'minio',
      'public-cachix',
      'attic',
      'http-cache',
      'from-vault',
      'from-secrets-manager',
      'from-systemd',
      'from-instance-metadata',
      'from-aws-profile',
    ]);
    expect(byId.get('production-s3')).toMatchObject({
      type: 's3',
      s3: { bucket: 'nix-cache-bucket', prefix: 'ci', region: 'us-east-1' },
      permissions: { allowAll: false, allowedRepos: ['acme/*'], allowedBranches: ['main', 'release/*'] },
    });
    expect(byId.get('minio')).toMatchObject({
      type: 's3',
      s3: { bucket: 'internal-cache', prefix: 'nix', region: 'us-west-2', endpoint: 'https://minio.example.org' },
      permissions: { allowAll: false, allowedRepos: ['acme/backend'] },
    });
    expect(byId.get('from-aws-profile')).toMatchObject({ type: 's3', s3: { profile: 'production' } });
    expect(byId.get('public-cachix')).toMatchObject({ type: 'cachix', destination: 'acme-public' });
    expect(byId.get('attic')).toMatchObject({ type: 'attic', destination: 'https://attic.example.org/acme' });
    expect(byId.get('http-cache')).toMatchObject({ type: 'nix-copy', destination: 'https://cache.example.org' });
  });

  it("reads each cache's credentials from the source upstream names", async () => {
    const o = loadCoordinatorConfig(await fixtureFile('ekaci.toml'), env);
    const values = async (id: string) =>
      Object.fromEntries(await o.caches.find((c) => c.id === id)!.credentials.values());
    expect(await values('production-s3')).toEqual({
      AWS_ACCESS_KEY_ID: 'AKIAENVIRONMENT',
      AWS_SECRET_ACCESS_KEY: 'environment-secret-key',
    });
    expect(await values('minio')).toEqual({
      AWS_ACCESS_KEY_ID: 'AKIAFIXTURE',
      AWS_SECRET_ACCESS_KEY: 'fixture-secret',
    });
    expect(await values('public-cachix')).toEqual({ CACHIX_AUTH_TOKEN: 'cachix-token-for-tests' });
    expect(await values('attic')).toEqual({ ATTIC_TOKEN: 'attic-token-for-tests' });
    expect(await values('http-cache')).toEqual({});
    expect(await values('from-systemd')).toEqual({ AWS_ACCESS_KEY_ID: 'AKIASYSTEMD', AWS_SECRET_ACCESS_KEY: 'x' });
    for (const c of o.caches) c.credentials.close();
  });

  it("reads upstream's EKACI_ALLOW_PRIVATE_CACHE_HOSTS", () => {
    const o = compileCoordinatorConfig({}, 'ekaci.toml', { EKACI_ALLOW_PRIVATE_CACHE_HOSTS: '1' }, dir);
    expect(o.security.allowPrivateCacheHosts).toBe(true);
  });
});

describe("upstream eka-ci's .ekaci/config.json", () => {
  it('compiles every key into the job and check options that carry its meaning', async () => {
    const checkout = await makeTree({
      '.ekaci/config.json': await readFile(join(FIXTURES, 'config.json'), 'utf8'),
      'ci/default.nix': '{ pkgs = {}; formatting = {}; }',
      'docs/index.md': 'docs',
    });
    const config = await loadRepoConfig(checkout);
    expect(config?.source).toBe('.ekaci/config.json');
    const [job, ...others] = config!.jobs;
    expect(others).toEqual([]);
    expect(job).toEqual({
      name: 'packages',
      kind: 'file',
      file: join(checkout, 'ci', 'default.nix'),
      relativeFile: 'ci/default.nix',
      attrPath: ['pkgs'],
      systems: undefined,
      allowEvalFailures: true,
      caches: ['production-s3', 'public-cachix'],
      sizeCheck: { maxIncreasePercent: 12.5, baseBranch: 'release/24.05' },
    });
    expect(config!.checks).toEqual([
      {
        name: 'nixfmt',
        command: 'nixfmt --check ci/*.nix',
        // With one job, shell is an attribute of its file.
        shell: { attrPath: ['formatting'], job },
        allowNetwork: false,
        roBind: ['docs', 'ci'],
        timeoutSeconds: undefined,
        systems: undefined,
      },
      {
        name: 'unit-tests',
        command: './run-tests',
        shell: undefined,
        allowNetwork: true,
        roBind: [],
        timeoutSeconds: undefined,
        systems: undefined,
      },
    ]);
  });

  it("reads upstream's allow-eval-failures spelling", async () => {
    const checkout = await makeTree({ 'default.nix': '{}' });
    const on = await compileRepoConfig(
      { jobs: { a: { file: 'default.nix', 'allow-eval-failures': true } } },
      '.ekaci/config.json',
      checkout,
    );
    expect(on.jobs[0]?.allowEvalFailures).toBe(true);
  });

  it('refuses the keys that mean nothing here, one line each naming the key and what to write instead', async () => {
    const checkout = await makeTree({
      '.ekaci/config.json': await readFile(join(FIXTURES, 'config-errors.json'), 'utf8'),
      'default.nix': '{}',
    });
    const error = await loadRepoConfig(checkout).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(RepoConfigError);
    const problems = (error as RepoConfigError).problems;
    expect(problems.map((p) => p.slice(0, p.indexOf(': ')))).toEqual([
      'jobs.packages.allow-eval-failures',
      'jobs.packages.post_build_hooks',
      'jobs.packages.fod_post_build_hooks',
      'flake',
      'package_change_summary',
      'rebuild_impact',
    ]);
    expect(problems[0]).toContain('keep allow_eval_failures');
    expect(problems[1]).toContain('[[hooks]] entry whose permissions name this repository');
    expect(problems[2]).toContain('[[hooks]]');
    expect(problems[3]).toContain('"flake": {"outputs": ["checks", "packages"]}');
    expect(problems[4]).toContain('remove it');
    expect(problems[5]).toContain('remove it');
    expect((error as Error).message.split('\n').every((l) => l.startsWith('.ekaci/config.json: '))).toBe(true);
  });

  it('refuses shell_nix where it would mean a shell.nix attribute or a flake devShell of a file job', async () => {
    const checkout = await makeTree({ 'default.nix': '{}', 'flake.nix': '{ outputs = _: {}; }' });
    const compile = (check: Record<string, unknown>, jobs: Record<string, unknown> = { a: { file: 'default.nix' } }) =>
      compileRepoConfig({ jobs, checks: { fmt: { command: 'fmt', ...check } } }, '.ekaci/config.json', checkout);
    await expect(compile({ shell: 'formatting', shell_nix: true })).rejects.toThrow(
      /^\.ekaci\/config\.json: check fmt: shell_nix: .*add a job whose file is shell\.nix .*"attr_path": "formatting"/,
    );
    await expect(compile({ shell: 'formatting', shell_nix: false })).rejects.toThrow(
      ".ekaci/config.json: check fmt: shell_nix: false means a flake's devShells, but job a is a file job",
    );
    // Where upstream and eka-ci agree, it is accepted: no shell, or a flake job's devShells.
    await expect(compile({ shell_nix: false })).resolves.toBeDefined();
    const flake = await compile({ shell: 'formatting', shell_nix: false }, { f: { flake: { outputs: ['checks'] } } });
    expect(flake.checks[0]?.shell).toMatchObject({ attrPath: ['formatting'], job: { name: 'f', kind: 'flake' } });
  });

  it("asks for the job of a check's shell when upstream's file has several jobs", async () => {
    const checkout = await makeTree({ 'a.nix': '{}', 'b.nix': '{}' });
    const error = await compileRepoConfig(
      { jobs: { a: { file: 'a.nix' }, b: { file: 'b.nix' } }, checks: { fmt: { shell: 'formatting', command: 'x' } } },
      '.ekaci/config.json',
      checkout,
    ).catch((e: unknown) => e);
    expect((error as Error).message).toContain(
      'check fmt: shell formatting needs the job whose file or flake it is in',
    );
  });
});
