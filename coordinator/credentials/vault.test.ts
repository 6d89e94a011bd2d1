import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { VaultStandIn } from '../../test/stand-ins/vault.js';
import { Credentials, credentialsSchema } from './credentials.js';
import { credentialsFailure } from './test-support.js';

const TOKEN = 'hvs.CAESIJtokenofthetestsuite0123456789';
const SECRET = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY';
const PATH = 'secret/data/eka-ci/s3-cache';

let vault: VaultStandIn;
let address: string;
let dir: string;
const opened: Credentials[] = [];

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-vault-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});
beforeEach(async () => {
  vault = new VaultStandIn();
  address = await vault.start();
  vault.addToken(TOKEN, { ttlSeconds: 0 });
  vault.putSecret(PATH, { AWS_ACCESS_KEY_ID: 'AKIDEXAMPLE', AWS_SECRET_ACCESS_KEY: SECRET });
});
afterEach(async () => {
  for (const c of opened.splice(0)) c.close();
  await vault.stop();
});

function vaultCredentials(table: Record<string, unknown> = {}, env: NodeJS.ProcessEnv = { VAULT_TOKEN: TOKEN }) {
  const spec = credentialsSchema.parse({ vault: { address, secret_path: PATH, ...table } });
  const c = Credentials.compile('caches.prod-s3.credentials', spec, {
    source: 'test.toml',
    env,
    baseDir: dir,
    now: vault.now,
  });
  opened.push(c);
  return c;
}

const failure = (p: Promise<unknown>): Promise<string> => credentialsFailure(p, [TOKEN, SECRET]);

describe('the vault source (KV v2 over HTTP)', () => {
  it("reads the secret's keys with the token from VAULT_TOKEN and the namespace", async () => {
    vault.addToken('hvs.namespaced-token-0123456789', { ttlSeconds: 0, namespace: 'production' });
    const c = vaultCredentials({ namespace: 'production' }, { VAULT_TOKEN: 'hvs.namespaced-token-0123456789' });
    expect(c.description).toBe(`vault ${address} (namespace production) ${PATH}`);
    expect(Object.fromEntries(await c.values())).toEqual({
      AWS_ACCESS_KEY_ID: 'AKIDEXAMPLE',
      AWS_SECRET_ACCESS_KEY: SECRET,
    });
    const read = vault.requests.find((r) => r.path === `/v1/${PATH}`);
    expect(read).toEqual({
      method: 'GET',
      path: `/v1/${PATH}`,
      token: 'hvs.namespaced-token-0123456789',
      namespace: 'production',
    });
  });

  it('reads a path without /data/ from the default mount secret/, as `vault kv get secret/PATH` does', async () => {
    const c = vaultCredentials({ secret_path: 'eka-ci/s3-cache' });
    expect((await c.values()).get('AWS_ACCESS_KEY_ID')).toBe('AKIDEXAMPLE');
  });

  it('takes the token from token_env or token_file', async () => {
    expect((await vaultCredentials({ token_env: 'MY_VAULT' }, { MY_VAULT: TOKEN }).values()).size).toBe(2);
    await writeFile(join(dir, 'token'), `${TOKEN}\n`);
    expect((await vaultCredentials({ token_file: 'token' }, {}).values()).size).toBe(2);
  });

  it('refuses to compile without a token, naming the variable', () => {
    expect(() => vaultCredentials({}, {})).toThrow(
      `caches.prod-s3.credentials: vault ${address} ${PATH}: VAULT_TOKEN is not set`,
    );
  });

  it('says permission denied for a wrong token, never quoting it', async () => {
    const message = await failure(vaultCredentials({}, { VAULT_TOKEN: `${TOKEN}-wrong` }).values());
    expect(message).toContain(`caches.prod-s3.credentials: vault ${address} ${PATH}:`);
    expect(message).toContain('permission denied (HTTP 403): wrong or expired token');
    expect(message).not.toContain(`${TOKEN}-wrong`);
  });

  it('says secret not found, with the /data/ hint, for a missing secret', async () => {
    const message = await failure(vaultCredentials({ secret_path: 'secret/data/eka-ci/absent' }).values());
    expect(message).toContain('secret not found (HTTP 404)');
    expect(message).toContain('a KV v2 path needs /data/ after the mount');
  });

  it('says the version is deleted when the secret was deleted', async () => {
    vault.deleteSecret(PATH);
    expect(await failure(vaultCredentials().values())).toContain('secret not found');
  });

  it('picks up a new version once the refresh interval has passed, and not before', async () => {
    const c = vaultCredentials({ refresh_seconds: 60 });
    expect((await c.values()).get('AWS_SECRET_ACCESS_KEY')).toBe(SECRET);
    vault.putSecret(PATH, { AWS_ACCESS_KEY_ID: 'AKIDEXAMPLE', AWS_SECRET_ACCESS_KEY: 'rotated-secret-value' });
    vault.advance(59_000);
    expect((await c.values()).get('AWS_SECRET_ACCESS_KEY')).toBe(SECRET);
    vault.advance(1_000);
    expect((await c.values()).get('AWS_SECRET_ACCESS_KEY')).toBe('rotated-secret-value');
  });

  it('renews a renewable token before its TTL runs out, and keeps reading past the original expiry', async () => {
    vault.addToken('hvs.short-lived-renewable-token', { ttlSeconds: 600, renewable: true });
    const c = vaultCredentials({ refresh_seconds: 300 }, { VAULT_TOKEN: 'hvs.short-lived-renewable-token' });
    await c.values();
    const firstExpiry = vault.tokenExpiresAt('hvs.short-lived-renewable-token')!;
    vault.advance(450_000); // past two thirds of the TTL, and past the refresh interval
    await c.values();
    expect(vault.renewals).toBe(1);
    expect(vault.tokenExpiresAt('hvs.short-lived-renewable-token')).toBeGreaterThan(firstExpiry);
    vault.advance(300_000); // beyond the original expiry
    expect((await c.values()).get('AWS_ACCESS_KEY_ID')).toBe('AKIDEXAMPLE');
  });

  it('fails clearly when a token that cannot be renewed has expired', async () => {
    vault.addToken('hvs.not-renewable-token-000', { ttlSeconds: 120, renewable: false });
    const c = vaultCredentials({ refresh_seconds: 60 }, { VAULT_TOKEN: 'hvs.not-renewable-token-000' });
    await c.values();
    vault.advance(180_000);
    const message = await failure(c.values());
    expect(message).toContain('the token in VAULT_TOKEN has expired and cannot be renewed: give a new one');
    expect(vault.renewals).toBe(0);
  });

  it('says permission denied when the token expired early at Vault (revoked)', async () => {
    vault.addToken('hvs.revoked-later-token-00', { ttlSeconds: 0 });
    const c = vaultCredentials({ refresh_seconds: 60 }, { VAULT_TOKEN: 'hvs.revoked-later-token-00' });
    await c.values();
    vault.revokeToken('hvs.revoked-later-token-00');
    vault.advance(60_000);
    expect(await failure(c.values())).toContain('permission denied');
  });

  it("uses a token file's new token once an agent has rotated it", async () => {
    await writeFile(join(dir, 'sink'), 'hvs.first-token-of-the-agent0\n');
    vault.addToken('hvs.first-token-of-the-agent0', { ttlSeconds: 0 });
    const c = vaultCredentials({ token_file: join(dir, 'sink'), refresh_seconds: 60 }, {});
    await c.values();
    vault.revokeToken('hvs.first-token-of-the-agent0');
    vault.addToken('hvs.second-token-of-the-agent', { ttlSeconds: 0 });
    await writeFile(join(dir, 'sink'), 'hvs.second-token-of-the-agent\n');
    vault.advance(60_000);
    expect((await c.values()).get('AWS_ACCESS_KEY_ID')).toBe('AKIDEXAMPLE');
    expect(vault.requests.at(-1)?.token).toBe('hvs.second-token-of-the-agent');
  });

  it('names the connection failure when Vault does not answer', async () => {
    const c = vaultCredentials();
    await vault.stop();
    expect(await failure(c.values())).toMatch(/looking up the token failed: ECONNREFUSED/);
  });
});
