import { generateKeyPairSync } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConfigError } from '../common/errors.js';
import { policyFor } from './eval/eval-options.js';
import { generateSigningKey } from './cache/signing-key.js';
import { compileCoordinatorConfig, loadCoordinatorConfig } from './config.js';

const KEY = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({
  type: 'pkcs1',
  format: 'pem',
}) as string;
const KEY_FRAGMENT = KEY.split('\n')[5]!;
const SECRET = 'a-webhook-secret-of-some-length';
const APP_ENV = { GITHUB_APP_ID: '1001', GITHUB_APP_PRIVATE_KEY: KEY };

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-config-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Compiles TOML text written to a file in a temporary directory, so relative paths resolve against it. */
async function load(toml: string, env: NodeJS.ProcessEnv = {}) {
  const file = join(dir, `coordinator-${Math.random().toString(36).slice(2)}.toml`);
  await writeFile(file, toml);
  return loadCoordinatorConfig(file, env);
}

function configError(raw: unknown, env: NodeJS.ProcessEnv = APP_ENV): ConfigError {
  try {
    compileCoordinatorConfig(raw, 'test.toml', env, dir);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as Error).message).not.toContain(KEY_FRAGMENT);
    return err as ConfigError;
  }
  throw new Error('the configuration compiled');
}

const app = (extra: Record<string, unknown> = {}) => ({
  id: 'main',
  permissions: { allowed_repos: ['my-org/*'] },
  ...extra,
});

describe('coordinator configuration', () => {
  it('compiles no GitHub App, no secret and the GitHub defaults from an empty file', () => {
    const o = compileCoordinatorConfig({}, 'empty', {}, dir);
    expect(o.githubApps).toEqual([]);
    expect(o.security).toEqual({
      webhookSecret: undefined,
      allowInsecureWebhooks: false,
      requireApproval: false,
      approvedUsers: [],
      allowUnsandboxedUntrustedBuilds: false,
      untrustedCheckNetworkRepos: [],
      untrustedCachePushRepos: [],
      allowPrivateCacheHosts: false,
    });
    expect(o.checks).toEqual({ maxLogBytes: 4 * 1024 ** 2, timeoutSeconds: 1_800 });
    expect(o.web.public).toBe(true);
    expect(o.helloTimeoutMs).toBe(10_000);
    expect(o.evaluation).toMatchObject({ sandbox: true, store: 'auto', allowImportFromDerivation: false, rules: [] });
    expect(o.github).toEqual({ buildDraftPullRequests: false, checkRunUpdateIntervalMs: 5_000 });
  });

  it('compiles a GitHub App, its permissions, the security and github tables', async () => {
    const o = await load(
      `
      [[github_apps]]
      id = "main"
      api_url = "https://ghe.example.com/api/v3/"
      credentials = { env = { vars = ["MY_APP_ID", "MY_APP_KEY"] } }
      permissions = { allow_all = false, allowed_repos = ["org/*"], allowed_branches = ["main", "release-*"] }

      [security]
      webhook_secret = "${SECRET}"
      require_approval = true
      approved_users = ["alice"]

      [github]
      build_draft_pull_requests = true
      check_run_update_interval_seconds = 2.5
      `,
      { MY_APP_ID: '77', MY_APP_KEY: KEY },
    );
    expect(o.githubApps).toEqual([
      {
        id: 'main',
        credentials: { appId: 77, privateKey: KEY },
        permissions: { allowAll: false, allowedRepos: ['org/*'], allowedBranches: ['main', 'release-*'] },
        apiUrl: 'https://ghe.example.com/api/v3',
      },
    ]);
    expect(o.security).toEqual({
      webhookSecret: SECRET,
      allowInsecureWebhooks: false,
      requireApproval: true,
      approvedUsers: ['alice'],
      allowUnsandboxedUntrustedBuilds: false,
      untrustedCheckNetworkRepos: [],
      untrustedCachePushRepos: [],
      allowPrivateCacheHosts: false,
    });
    expect(o.github).toEqual({ buildDraftPullRequests: true, checkRunUpdateIntervalMs: 2_500 });
  });

  it('means every branch when allowed_branches is left out, and refuses an empty list naming the key', () => {
    const o = compileCoordinatorConfig({ github_apps: [app()], security: { webhook_secret: SECRET } }, 't', APP_ENV);
    expect(o.githubApps[0]?.permissions.allowedBranches).toBeUndefined();
    const e = configError({ github_apps: [app({ permissions: { allowed_repos: ['x/*'], allowed_branches: [] } })] });
    expect(e.message).toMatch(/github_apps\.0\.permissions\.allowed_branches: an empty list allows no branch/);
  });

  it('compiles the evaluation policy: limits, and what each repository may fetch', () => {
    const o = compileCoordinatorConfig(
      {
        evaluation: {
          workers: 3,
          max_memory_mib: 512,
          attr_timeout_seconds: 30,
          repositories: [{ repos: ['acme/*'], allowed_uris: ['https://example.com/'] }],
        },
      },
      't',
      {},
    );
    expect(o.evaluation).toMatchObject({ workers: 3, maxMemoryMiB: 512, attrTimeoutSeconds: 30 });
    expect(policyFor(o.evaluation, 'acme/pkgs')).toEqual({
      allowedUris: ['https://example.com/'],
      allowImportFromDerivation: false,
    });
    expect(policyFor(o.evaluation, 'other/pkgs')).toEqual({ allowedUris: [], allowImportFromDerivation: false });
    expect(() => compileCoordinatorConfig({ evaluation: { sandbox: 'yes' } }, 't', {})).toThrow(/evaluation\.sandbox/);
  });

  it('compiles [rebuild] max_rebuild_count: no limit by default, a whole number, errors naming the key', async () => {
    expect(compileCoordinatorConfig({}, 't', {}).rebuild).toEqual({ maxRebuildCount: 0 });
    expect((await load('[rebuild]\nmax_rebuild_count = 5000\n')).rebuild).toEqual({ maxRebuildCount: 5000 });
    for (const bad of [-1, 1.5, 'many']) {
      expect(() => compileCoordinatorConfig({ rebuild: { max_rebuild_count: bad } }, 't.toml', {})).toThrow(
        /^t\.toml: rebuild\.max_rebuild_count: /,
      );
    }
    expect(() => compileCoordinatorConfig({ rebuild: { skip_paths: ['doc/**'] } }, 't.toml', {})).toThrow(
      /^t\.toml: rebuild\.skip_paths: /,
    );
  });

  it('reads GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY when an app names no credentials', () => {
    const o = compileCoordinatorConfig({ github_apps: [app()], security: { webhook_secret: SECRET } }, 't', APP_ENV);
    expect(o.githubApps[0]?.credentials).toEqual({ appId: 1001, privateKey: KEY });
    expect(o.githubApps[0]?.apiUrl).toBe('https://api.github.com');
  });

  it('reads a credentials file relative to the configuration file', async () => {
    await writeFile(join(dir, 'app.json'), JSON.stringify({ GITHUB_APP_ID: '5', GITHUB_APP_PRIVATE_KEY: KEY }));
    const o = await load(
      `[[github_apps]]\nid = "f"\ncredentials = { file = { path = "app.json" } }\n` +
        `permissions = { allow_all = true }\n[security]\nwebhook_secret = "${SECRET}"\n`,
    );
    expect(o.githubApps[0]?.credentials.appId).toBe(5);
  });

  it('reads a systemd credential from $CREDENTIALS_DIRECTORY', async () => {
    await writeFile(join(dir, 'gh'), `GITHUB_APP_ID=6\nGITHUB_APP_PRIVATE_KEY="${KEY}"\n`);
    const o = await load(
      `[[github_apps]]\nid = "s"\ncredentials = { systemd-credential = { name = "gh" } }\n` +
        `permissions = { allow_all = true }\n[security]\nwebhook_secret = "${SECRET}"\n`,
      { CREDENTIALS_DIRECTORY: dir },
    );
    expect(o.githubApps[0]?.credentials.appId).toBe(6);
  });

  it("reads an app id variable and GitHub's .pem download", async () => {
    await writeFile(join(dir, 'app.pem'), KEY);
    const o = await load(
      `[[github_apps]]\nid = "k"\ncredentials = { github-app-key-file = { app_id_env = "K_ID", key_file = "app.pem" } }\n` +
        `permissions = { allow_all = true }\n[security]\nwebhook_secret = "${SECRET}"\n`,
      { K_ID: '8' },
    );
    expect(o.githubApps[0]?.credentials).toEqual({ appId: 8, privateKey: KEY });
  });

  it('names the app and the source when its credentials cannot be read, and never the key', () => {
    const e = configError({ github_apps: [app({ credentials: { file: { path: 'missing.env' } } })] });
    expect(e.message).toContain('test.toml: github_apps.main.credentials: GitHub App main: credentials file');
    expect(e.message).toContain('missing.env: cannot read');
    const swapped = configError({ github_apps: [app()] }, { GITHUB_APP_ID: KEY, GITHUB_APP_PRIVATE_KEY: KEY });
    expect(swapped.message).toContain('GITHUB_APP_ID is not a GitHub App id');
  });

  it('refuses two credential sources for one app, and none', () => {
    const both = { env: {}, file: { path: 'x' } };
    expect(configError({ github_apps: [app({ credentials: both })] }).message).toContain(
      'github_apps.0.credentials: exactly one of env, file, systemd-credential or github-app-key-file',
    );
    expect(configError({ github_apps: [app({ credentials: {} })] }).message).toContain('exactly one of');
  });

  it('refuses GitHub Apps without a webhook secret, unless insecure webhooks are allowed', () => {
    const e = configError({ github_apps: [app()] });
    expect(e.message).toContain('GitHub Apps are configured but no webhook secret is');
    expect(e.message).toContain('GITHUB_WEBHOOK_SECRET');
    const insecure = { github_apps: [app()], security: { allow_insecure_webhooks: true } };
    expect(compileCoordinatorConfig(insecure, 't', APP_ENV).security.webhookSecret).toBeUndefined();
  });

  it('takes the webhook secret from GITHUB_WEBHOOK_SECRET', () => {
    const o = compileCoordinatorConfig({ github_apps: [app()] }, 't', { ...APP_ENV, GITHUB_WEBHOOK_SECRET: SECRET });
    expect(o.security.webhookSecret).toBe(SECRET);
  });

  it('refuses a webhook secret short enough to guess', () => {
    expect(configError({ security: { webhook_secret: 'short' } }).message).toContain('security.webhook_secret');
    expect(configError({}, { GITHUB_WEBHOOK_SECRET: 'short' }).message).toContain('GITHUB_WEBHOOK_SECRET');
  });

  it('refuses an app that serves no repository, and repository globs that are not OWNER/NAME', () => {
    const none = configError({ github_apps: [app({ permissions: {} })], security: { webhook_secret: SECRET } });
    expect(none.message).toContain('allows no repository');
    const bare = configError({ github_apps: [app({ permissions: { allowed_repos: ['my-org'] } })] });
    expect(bare.message).toContain('github_apps.0.permissions.allowed_repos.0: a repository glob is OWNER/NAME');
  });

  it('refuses two apps with one id', () => {
    expect(configError({ github_apps: [app(), app()] }).message).toContain('two apps share an id');
  });

  it.each([
    [{ github_apps: [app({ private_key: 'x' })] }, 'test.toml: github_apps.0.private_key: Unrecognized key'],
    [
      { github_apps: [app({ credentials: { env: { var: [] } } })] },
      'test.toml: github_apps.0.credentials.env.var: Unrecognized key',
    ],
    [
      { github_apps: [app({ permissions: { allow: true } })] },
      'test.toml: github_apps.0.permissions.allow: Unrecognized key',
    ],
    [{ security: { webhook_secrets: SECRET } }, 'test.toml: security.webhook_secrets: Unrecognized key'],
    [{ github: { build_drafts: true } }, 'test.toml: github.build_drafts: Unrecognized key'],
  ])('names an unknown key: %j', (raw, message) => {
    expect(configError(raw).message).toContain(message);
  });

  it('keeps secrets out of the options serialised as JSON', () => {
    const o = compileCoordinatorConfig({ github_apps: [app()], security: { webhook_secret: SECRET } }, 't', APP_ENV);
    const json = JSON.stringify(o);
    expect(json).not.toContain(SECRET);
    expect(json).not.toContain(KEY_FRAGMENT);
    expect(o.security.webhookSecret).toBe(SECRET);
  });

  describe('secrets as files and systemd credentials', () => {
    const NIX_KEY = generateSigningKey('ci.example.org-1');

    it('reads tokens, the webhook secret and the signing key from $CREDENTIALS_DIRECTORY', async () => {
      const creds = join(dir, 'credentials-ok');
      await mkdir(creds, { recursive: true });
      await writeFile(join(creds, 'agent-token-mac'), 'a-mac-agent-token-of-length\n');
      await writeFile(join(creds, 'api-token-dash'), 'a-dashboard-token-of-length');
      await writeFile(join(creds, 'webhook-secret'), `${SECRET}\n`);
      await writeFile(join(creds, 'cache-key'), NIX_KEY.secretKey);
      const o = compileCoordinatorConfig(
        {
          agent_tokens: [{ name: 'mac', token_credential: 'agent-token-mac' }],
          api_tokens: [{ name: 'dash', token_credential: 'api-token-dash' }],
          github_apps: [app()],
          security: { webhook_secret_credential: 'webhook-secret' },
          cache: { secret_key_credential: 'cache-key' },
        },
        't',
        { ...APP_ENV, CREDENTIALS_DIRECTORY: creds },
        dir,
      );
      expect(o.agentTokens).toEqual([{ name: 'mac', token: 'a-mac-agent-token-of-length' }]);
      expect(o.apiTokens).toEqual([{ name: 'dash', token: 'a-dashboard-token-of-length' }]);
      expect(o.security.webhookSecret).toBe(SECRET);
      expect(o.cache.secretKey).toBe(NIX_KEY.secretKey);
      const json = JSON.stringify(o);
      expect(json).not.toContain(NIX_KEY.secretKey.split(':')[1]);
      expect(json).not.toContain(SECRET);
    });

    it('reads the webhook secret and the signing key from files relative to the configuration', async () => {
      await writeFile(join(dir, 'hook.secret'), SECRET);
      await writeFile(join(dir, 'cache.sec'), NIX_KEY.secretKey);
      const o = await load(
        `[security]\nwebhook_secret_file = "hook.secret"\n[cache]\nsecret_key_file = "${join(dir, 'cache.sec')}"\n`,
      );
      expect(o.security.webhookSecret).toBe(SECRET);
      expect(o.cache.secretKey).toBe(NIX_KEY.secretKey);
      expect(compileCoordinatorConfig({}, 't', {}, dir).cache.secretKey).toBeUndefined();
    });

    it.each([
      [
        { security: { webhook_secret: SECRET, webhook_secret_file: 'hook.secret' } },
        {},
        'test.toml: security.webhook_secret: give one of webhook_secret and webhook_secret_file, not both',
      ],
      [
        { agent_tokens: [{ name: 'mac', token_credential: 'agent-token-mac' }] },
        {},
        'test.toml: agent_tokens.mac.token: CREDENTIALS_DIRECTORY is not set',
      ],
      [
        { cache: { secret_key_credential: '../cache-key' } },
        { CREDENTIALS_DIRECTORY: '/run/credentials/x' },
        'test.toml: cache.secret_key: credential name "../cache-key" is not a plain file name',
      ],
      [{ security: { webhook_secret_file: 'absent' } }, {}, `test.toml: security.webhook_secret: cannot read`],
      [{ cache: { secret_key_file: 'empty' } }, {}, `empty is empty`],
      [{ cache: { secret_key_file: 'hook.secret' } }, {}, 'cache.secret_key: the configured key is not a Nix'],
      [{ security: { webhook_secret_file: 'short' } }, {}, 'test.toml: security.webhook_secret: shorter than 16'],
    ])('names the secret and the problem, never the value: %j', async (raw, env, message) => {
      await writeFile(join(dir, 'empty'), '\n');
      await writeFile(join(dir, 'short'), 'short');
      await writeFile(join(dir, 'hook.secret'), SECRET);
      const e = configError(raw, env);
      expect(e.message).toContain(message);
      expect(e.message).not.toContain(SECRET);
    });
  });
});
