import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { VaultStandIn } from '../test/stand-ins/vault.js';
import { Sessions } from './access/sessions.js';
import { compileCoordinatorConfig, resolveOAuthSecrets } from './config.js';

const JWT = 'a-session-signing-secret-of-32-chars-or-more';
const CLIENT = 'github-oauth-client-secret-1';
const PATH = 'secret/data/ekaci/oauth';

let dir: string;
let vault: VaultStandIn;
let address: string;

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-oauth-'));
  vault = new VaultStandIn();
  address = await vault.start();
  vault.addToken('hvs.oauth-reader', { ttlSeconds: 0 });
});

afterEach(async () => {
  await vault.stop();
  rmSync(dir, { recursive: true, force: true });
});

function oauth(credentials: unknown, env: NodeJS.ProcessEnv = {}) {
  return compileCoordinatorConfig(
    { oauth: { client_id: 'Iv1.abc', redirect_url: 'https://ci.example.org/auth/callback', credentials } },
    'test.toml',
    env,
    dir,
  ).oauth!;
}

describe('[oauth] secrets from a credential source', () => {
  it('reads both secrets from a local source when the configuration is compiled', () => {
    writeFileSync(join(dir, 'oauth.env'), `OAUTH_CLIENT_SECRET=${CLIENT}\nOAUTH_JWT_SECRET=${JWT}\n`);
    const o = oauth({ file: { path: 'oauth.env' } });
    expect([o.clientSecret, o.jwtSecret]).toEqual([CLIENT, JWT]);
    expect(JSON.stringify(o)).not.toContain(CLIENT);
    writeFileSync(join(dir, 'short.env'), `OAUTH_CLIENT_SECRET=${CLIENT}\nOAUTH_JWT_SECRET=too-short\n`);
    expect(() => oauth({ file: { path: 'short.env' } })).toThrow('test.toml: oauth.jwt_secret: at least 32 characters');
    writeFileSync(join(dir, 'half.env'), `OAUTH_CLIENT_SECRET=${CLIENT}\n`);
    expect(() => oauth({ file: { path: 'half.env' } })).toThrow(
      /test\.toml: oauth\.credentials: .*half\.env.* has no OAUTH_JWT_SECRET \(for jwt_secret\)/,
    );
  });

  it('reads a Vault secret when the coordinator starts, and stops the start on a wrong token', async () => {
    vault.putSecret(PATH, { OAUTH_CLIENT_SECRET: CLIENT, OAUTH_JWT_SECRET: JWT });
    const source = { vault: { address, secret_path: PATH } };
    const o = oauth(source, { VAULT_TOKEN: 'hvs.oauth-reader' });
    // Nothing is read while the configuration compiles; a session cannot be signed before the start reads it.
    expect([o.clientSecret, o.jwtSecret]).toEqual(['', '']);
    const sessions = new Sessions(() => o.jwtSecret, 3600);
    expect(() => sessions.issue('alice')).toThrow('the session secret is not read yet');
    await resolveOAuthSecrets(o, 'test.toml');
    expect([o.clientSecret, o.jwtSecret]).toEqual([CLIENT, JWT]);
    expect(sessions.verify(sessions.issue('alice'))?.login).toBe('alice');

    const wrong = oauth(source, { VAULT_TOKEN: 'hvs.not-a-token' });
    await expect(resolveOAuthSecrets(wrong, 'test.toml')).rejects.toThrow(
      /^test\.toml: oauth\.credentials: .*permission denied/,
    );
  });
});
