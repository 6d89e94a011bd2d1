import { generateKeyPairSync } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ConfigError, IllegalStateError } from '../../common/errors.js';
import { silentLogger } from '../../common/logging.js';
import { startGitHubStandIn, type GitHubStandIn } from '../../test/support/github-standin.js';
import { VaultStandIn } from '../../test/stand-ins/vault.js';
import { compileCoordinatorConfig, resolveGitHubAppCredentials } from '../config.js';
import { GitHubAppClient } from './app-client.js';
import { AppCredentialSource, credentialsSchema } from './credentials.js';

const TOKEN = 'hvs.github-app-reader-token-0000';
const PATH = 'secret/data/eka-ci/github-app';
const WEBHOOK_SECRET = 'a-webhook-secret-of-some-length';
const OTHER_KEY = generateKeyPairSync('rsa', {
  modulusLength: 2048,
  privateKeyEncoding: { type: 'pkcs1', format: 'pem' },
  publicKeyEncoding: { type: 'spki', format: 'pem' },
}).privateKey;

let github: GitHubStandIn;
let vault: VaultStandIn;
let address: string;
let dir: string;
const sources: AppCredentialSource[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-app-credentials-'));
  github = await startGitHubStandIn();
  github.addInstallation(11, 'nixos');
  github.addRepo({ owner: 'nixos', name: 'nixpkgs', installationId: 11 });
});
afterAll(async () => {
  await github.close();
  await rm(dir, { recursive: true, force: true });
});
beforeEach(async () => {
  vault = new VaultStandIn();
  address = await vault.start();
  vault.addToken(TOKEN, { ttlSeconds: 0 });
  vault.putSecret(PATH, { GITHUB_APP_ID: String(github.appId), GITHUB_APP_PRIVATE_KEY: github.privateKey });
});
afterEach(async () => {
  for (const s of sources.splice(0)) s.close();
  await vault.stop();
  github.invalid.splice(0);
});

function vaultApp(id = 'main') {
  return {
    id,
    credentials: { vault: { address, secret_path: PATH, refresh_seconds: 60 } },
    permissions: { allow_all: true },
  };
}

function source(raw: unknown, env: NodeJS.ProcessEnv = { VAULT_TOKEN: TOKEN }): AppCredentialSource {
  const s = AppCredentialSource.compile('main', credentialsSchema.parse(raw), {
    source: 'test.toml',
    env,
    baseDir: dir,
    now: vault.now,
  });
  sources.push(s);
  return s;
}

function client(s: AppCredentialSource): GitHubAppClient {
  return new GitHubAppClient({
    id: 'main',
    credentials: s.credentials,
    credentialSource: s,
    apiUrl: github.url,
    logger: silentLogger(),
    retry: { backoffBaseMs: 5, backoffCapMs: 20 },
  });
}

describe('GitHub App credentials from any source', () => {
  it('compiles an app whose credentials are in Vault without reading them, and reads them at start', async () => {
    const options = compileCoordinatorConfig(
      { github_apps: [vaultApp()], security: { webhook_secret: WEBHOOK_SECRET } },
      'test.toml',
      { VAULT_TOKEN: TOKEN },
      dir,
    );
    const app = options.githubApps[0]!;
    expect(vault.requests).toEqual([]);
    expect(() => app.credentials.appId).toThrow(IllegalStateError);
    expect(JSON.stringify(options)).not.toContain('BEGIN');
    await resolveGitHubAppCredentials(options.githubApps);
    expect(app.credentials).toEqual({ appId: github.appId, privateKey: github.privateKey });
    expect(JSON.stringify(app.credentials)).toBe(`{"appId":${github.appId},"privateKey":"[redacted]"}`);
    app.credentialSource?.close();
  });

  it('fails the start with a ConfigError naming the file, the app and the source when Vault refuses', async () => {
    const options = compileCoordinatorConfig(
      { github_apps: [vaultApp('prod')], security: { webhook_secret: WEBHOOK_SECRET } },
      'test.toml',
      { VAULT_TOKEN: 'hvs.not-a-token-vault-knows' },
      dir,
    );
    const error = await resolveGitHubAppCredentials(options.githubApps).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ConfigError);
    expect((error as Error).message).toContain(
      `test.toml: github_apps.prod.credentials: GitHub App prod: vault ${address} ${PATH}: `,
    );
    expect((error as Error).message).toContain('permission denied');
    expect((error as Error).message).not.toContain('hvs.not-a-token');
  });

  it('checks what Vault holds as it checks any source: the id and the key', async () => {
    vault.putSecret(PATH, { GITHUB_APP_ID: 'abc', GITHUB_APP_PRIVATE_KEY: github.privateKey });
    await expect(source({ vault: { address, secret_path: PATH } }).current()).rejects.toMatchObject({
      code: 'EKACI_ERR_GITHUB_CREDENTIALS',
      message: `GitHub App main: vault ${address} ${PATH}: GITHUB_APP_ID is not a GitHub App id (a positive integer)`,
    });
  });

  it('refuses sources that hold no app credentials', () => {
    expect(() => source('none')).toThrow('GitHub App main: none gives no app id and private key');
  });

  it('mints JWTs with a key rotated in Vault, once the refresh interval has passed', async () => {
    vault.putSecret(PATH, { GITHUB_APP_ID: String(github.appId), GITHUB_APP_PRIVATE_KEY: OTHER_KEY });
    const s = source({ vault: { address, secret_path: PATH, refresh_seconds: 60 } });
    const app = client(s);
    await expect(app.installationFor('nixos', 'nixpkgs')).rejects.toMatchObject({ status: 401 });
    vault.putSecret(PATH, { GITHUB_APP_ID: String(github.appId), GITHUB_APP_PRIVATE_KEY: github.privateKey });
    vault.advance(60_000);
    expect(await app.installationFor('nixos', 'nixpkgs')).toBe(11);
  });

  it('mints JWTs with a rotated key file the next time it needs one', async () => {
    const keyFile = join(dir, 'app.pem');
    await writeFile(keyFile, OTHER_KEY);
    const s = source(
      { 'github-app-key-file': { app_id_env: 'APP_ID', key_file: keyFile } },
      { APP_ID: String(github.appId) },
    );
    expect(s.resolveSync().appId).toBe(github.appId);
    const app = client(s);
    await expect(app.installationFor('nixos', 'nixpkgs')).rejects.toMatchObject({ status: 401 });
    await writeFile(keyFile, github.privateKey);
    expect(await app.installationFor('nixos', 'nixpkgs')).toBe(11);
    expect((await app.octokit(11)).request).toBeDefined();
  });
});
