import { mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { redact } from '../../common/redaction.js';
import { Credentials, CredentialsError, credentialsSchema, type CredentialContext } from './credentials.js';

const SECRET = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-credentials-local-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

function ctx(env: NodeJS.ProcessEnv = {}): CredentialContext {
  return { source: 'test.toml', env, baseDir: dir };
}

function compile(raw: unknown, env: NodeJS.ProcessEnv = {}): Credentials {
  return Credentials.compile('caches.c.credentials', credentialsSchema.parse(raw), ctx(env));
}

async function failure(p: Promise<unknown> | (() => unknown)): Promise<CredentialsError> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (err) {
    expect(err).toBeInstanceOf(CredentialsError);
    expect((err as CredentialsError).code).toBe('EKACI_ERR_CREDENTIALS');
    expect((err as Error).message).not.toContain(SECRET);
    return err as CredentialsError;
  }
  throw new Error('expected a CredentialsError');
}

describe('the credentials table', () => {
  it('takes exactly one source, and upstream\'s "instance-metadata" and "none" strings', () => {
    expect(credentialsSchema.parse('instance-metadata')).toEqual({ 'instance-metadata': { provider: 'aws' } });
    expect(credentialsSchema.parse('none')).toEqual({ none: {} });
    const two = credentialsSchema.safeParse({ env: { vars: ['A'] }, none: {} });
    expect(two.success).toBe(false);
    expect(two.error?.issues[0]?.message).toMatch(/^exactly one of env, file, .* or none$/);
    const unknown = credentialsSchema.safeParse({ vault: { address: 'https://v', secret_path: 'x', token: 't' } });
    expect(unknown.error?.issues[0]).toMatchObject({ path: ['vault'], code: 'unrecognized_keys', keys: ['token'] });
  });

  it("keeps upstream's table shapes for every source", () => {
    const shapes = [
      { env: { vars: ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'] } },
      { file: { path: '/etc/eka-ci/cache-credentials' } },
      { 'systemd-credential': { name: 's3-cache-creds' } },
      { 'github-app-key-file': { app_id_env: 'GITHUB_APP_ID', key_file: '/etc/eka-ci/key.pem' } },
      {
        vault: {
          address: 'https://vault:8200',
          secret_path: 'secret/data/x',
          token_env: 'VAULT_TOKEN',
          namespace: 'p',
        },
      },
      { 'aws-secrets-manager': { secret_name: 'eka-ci/s3', region: 'us-east-1' } },
      { 'instance-metadata': {} },
      { 'aws-profile': { profile: 'production' } },
      { 'cachix-token': { env_var: 'CACHIX_AUTH_TOKEN' } },
      { none: {} },
    ];
    for (const shape of shapes) expect(credentialsSchema.safeParse(shape).success, JSON.stringify(shape)).toBe(true);
  });
});

describe('local credential sources', () => {
  it('env: each listed variable under its own name, read on every use', async () => {
    const env: NodeJS.ProcessEnv = { AWS_ACCESS_KEY_ID: 'AKIDEXAMPLE', AWS_SECRET_ACCESS_KEY: SECRET };
    const c = compile({ env: { vars: ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY'] } }, env);
    expect(c.description).toBe('environment variables AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY');
    expect(Object.fromEntries(await c.values())).toEqual(env);
    env.AWS_SECRET_ACCESS_KEY = `${SECRET}-2`;
    expect((await c.values()).get('AWS_SECRET_ACCESS_KEY')).toBe(`${SECRET}-2`);
  });

  it('env: names the missing variable, where it was looked for and the table', async () => {
    const c = compile({ env: { vars: ['A_KEY', 'B_KEY'] } }, { A_KEY: SECRET });
    expect((await failure(c.values())).message).toBe(
      'caches.c.credentials: environment variables A_KEY and B_KEY: B_KEY is missing or empty',
    );
  });

  it('file: KEY=VALUE lines or JSON, relative to the configuration, read again when the file is replaced', async () => {
    const path = join(dir, 'cache.env');
    await writeFile(path, `# cache\nAWS_ACCESS_KEY_ID=AKID1\nAWS_SECRET_ACCESS_KEY="${SECRET}"\n`);
    const c = compile({ file: { path: 'cache.env' } });
    expect(c.description).toBe(`credentials file ${path}`);
    expect(Object.fromEntries(await c.values())).toEqual({ AWS_ACCESS_KEY_ID: 'AKID1', AWS_SECRET_ACCESS_KEY: SECRET });
    // Rotated the way tools do it: a new file renamed over the old one.
    await writeFile(
      `${path}.new`,
      JSON.stringify({ AWS_ACCESS_KEY_ID: 'AKID2', AWS_SECRET_ACCESS_KEY: 'rotated-secret' }),
    );
    await rename(`${path}.new`, path);
    expect(Object.fromEntries(await c.values())).toEqual({
      AWS_ACCESS_KEY_ID: 'AKID2',
      AWS_SECRET_ACCESS_KEY: 'rotated-secret',
    });
  });

  it('file: sees a rewrite in place of the same length', async () => {
    const path = join(dir, 'same-size.env');
    await writeFile(path, 'TOKEN=aaaaaaaa\n');
    const c = compile({ file: { path } });
    expect(c.valuesSync().get('TOKEN')).toBe('aaaaaaaa');
    await writeFile(path, 'TOKEN=bbbbbbbb\n');
    expect(c.valuesSync().get('TOKEN')).toBe('bbbbbbbb');
  });

  it('file: names the unreadable file and the malformed line, never the content', async () => {
    const missing = compile({ file: { path: 'absent.env' } });
    expect((await failure(missing.values())).message).toContain(
      `credentials file ${join(dir, 'absent.env')}: cannot read`,
    );
    await writeFile(join(dir, 'bad.env'), `A=1\n${SECRET}\n`);
    expect((await failure(compile({ file: { path: 'bad.env' } }).values())).message).toContain(
      'line 2 is not KEY=VALUE',
    );
  });

  it('systemd-credential: $CREDENTIALS_DIRECTORY/NAME, and LoadCredential= explained when it is not set', async () => {
    await writeFile(join(dir, 's3-creds'), `AWS_ACCESS_KEY_ID=AKID\nAWS_SECRET_ACCESS_KEY=${SECRET}\n`);
    const c = compile({ 'systemd-credential': { name: 's3-creds' } }, { CREDENTIALS_DIRECTORY: dir });
    expect((await c.values()).get('AWS_SECRET_ACCESS_KEY')).toBe(SECRET);
    const e = await failure(() => compile({ 'systemd-credential': { name: 's3-creds' } }));
    expect(e.message).toContain('caches.c.credentials: systemd credential s3-creds: CREDENTIALS_DIRECTORY is not set');
  });

  it('cachix-token: the variable as CACHIX_AUTH_TOKEN; none: nothing', async () => {
    const c = compile({ 'cachix-token': { env_var: 'MY_CACHIX' } }, { MY_CACHIX: SECRET });
    expect(Object.fromEntries(await c.values())).toEqual({ CACHIX_AUTH_TOKEN: SECRET });
    expect((await compile('none').values()).size).toBe(0);
  });

  it('github-app-key-file: GITHUB_APP_ID from the variable and the .pem as GITHUB_APP_PRIVATE_KEY', async () => {
    await writeFile(
      join(dir, 'app.pem'),
      `-----BEGIN RSA PRIVATE KEY-----\n${SECRET}\n-----END RSA PRIVATE KEY-----\n`,
    );
    const c = compile({ 'github-app-key-file': { app_id_env: 'APP', key_file: 'app.pem' } }, { APP: '42' });
    const values = await c.values();
    expect(values.get('GITHUB_APP_ID')).toBe('42');
    expect(values.get('GITHUB_APP_PRIVATE_KEY')).toContain(SECRET);
  });

  it('registers every value it reads for redaction, so no log line can carry one', async () => {
    const rotated = 'freshly-rotated-value-0042';
    const env: NodeJS.ProcessEnv = { CACHE_TOKEN: 'first-value-of-the-token' };
    const c = compile({ env: { vars: ['CACHE_TOKEN'] } }, env);
    expect(redact('token first-value-of-the-token')).toBe('token first-value-of-the-token');
    await c.values();
    env.CACHE_TOKEN = rotated;
    await c.values();
    expect(redact(`old first-value-of-the-token, new ${rotated}`)).toBe('old [redacted], new [redacted]');
  });
});
