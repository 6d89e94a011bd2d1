import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GetSecretValueCommand, SecretsManagerClient } from '@aws-sdk/client-secrets-manager';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { InstanceMetadataStandIn } from '../../test/stand-ins/instance-metadata.js';
import { SecretsManagerStandIn } from '../../test/stand-ins/secrets-manager.js';
import { awsCredentialProvider, Credentials, credentialsSchema } from './credentials.js';
import { credentialsFailure } from './test-support.js';

// SDK 3.1178 warns on Node 20 about its future releases; the versions are pinned.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED = 'true';

const AKID = 'AKIDEXAMPLE';
const AWS_SECRET = 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY';
const PEM_LIKE = 'MIIEpAIBAAKCAQEA-the-stored-private-key';

let sm: SecretsManagerStandIn;
let endpoint: string;
let dir: string;
let clock: number;
const opened: Credentials[] = [];
const now = (): number => clock;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-aws-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});
beforeEach(async () => {
  clock = Date.parse('2026-06-01T00:00:00Z');
  sm = new SecretsManagerStandIn('eu-west-1');
  endpoint = await sm.start();
  sm.addKey(AKID, AWS_SECRET);
  sm.putSecret('eka-ci/github-app', JSON.stringify({ GITHUB_APP_ID: '123', GITHUB_APP_PRIVATE_KEY: PEM_LIKE }));
});
afterEach(async () => {
  for (const c of opened.splice(0)) c.close();
  await sm.stop();
});

function compile(raw: unknown, env: NodeJS.ProcessEnv): Credentials {
  const c = Credentials.compile('github_apps.main.credentials', credentialsSchema.parse(raw), {
    source: 'test.toml',
    env,
    baseDir: dir,
    now,
  });
  opened.push(c);
  return c;
}

function secretsManager(table: Record<string, unknown> = {}, env: NodeJS.ProcessEnv = {}): Credentials {
  return compile(
    { 'aws-secrets-manager': { secret_name: 'eka-ci/github-app', region: 'eu-west-1', endpoint, ...table } },
    { AWS_ACCESS_KEY_ID: AKID, AWS_SECRET_ACCESS_KEY: AWS_SECRET, ...env },
  );
}

const failure = (p: Promise<unknown>): Promise<string> => credentialsFailure(p, [AWS_SECRET, PEM_LIKE]);

describe('the aws-secrets-manager source', () => {
  it("reads the SecretString's JSON keys through a SigV4-signed GetSecretValue", async () => {
    const c = secretsManager();
    expect(c.description).toBe(`aws-secrets-manager secret eka-ci/github-app in eu-west-1 at ${endpoint}`);
    expect(Object.fromEntries(await c.values())).toEqual({ GITHUB_APP_ID: '123', GITHUB_APP_PRIVATE_KEY: PEM_LIKE });
    expect(sm.requests).toEqual([{ target: 'secretsmanager.GetSecretValue', accessKeyId: AKID, outcome: '200' }]);
  });

  it('gives a SecretString that is not a JSON object as one value named after the secret', async () => {
    sm.putSecret('cachix-token', 'eyJhbGciOiJIUzI1NiJ9.plain-token');
    const c = secretsManager({ secret_name: 'cachix-token' });
    expect(Object.fromEntries(await c.values())).toEqual({ 'cachix-token': 'eyJhbGciOiJIUzI1NiJ9.plain-token' });
  });

  it('is refused when the request is signed with the wrong secret key', async () => {
    const c = secretsManager({}, { AWS_SECRET_ACCESS_KEY: 'not-the-secret-key-0000000000000000000000' });
    const message = await failure(c.values());
    expect(message).toContain('github_apps.main.credentials: aws-secrets-manager secret eka-ci/github-app');
    expect(message).toContain('AWS refused the request: InvalidSignatureException (HTTP 400)');
    expect(message).not.toContain('not-the-secret-key');
    expect(sm.requests.map((r) => r.outcome)).toEqual(['InvalidSignatureException']);
  });

  it('is refused for an access key AWS does not know', async () => {
    const c = secretsManager({}, { AWS_ACCESS_KEY_ID: 'AKIDUNKNOWN' });
    expect(await failure(c.values())).toContain('UnrecognizedClientException');
  });

  it('is refused with ExpiredTokenException when the session has ended', async () => {
    sm.addKey('ASIASESSION', AWS_SECRET, 'session-token-of-the-role-000');
    const env = { AWS_ACCESS_KEY_ID: 'ASIASESSION', AWS_SESSION_TOKEN: 'session-token-of-the-role-000' };
    expect((await secretsManager({}, env).values()).get('GITHUB_APP_ID')).toBe('123');
    sm.expireSession('ASIASESSION');
    expect(await failure(secretsManager({}, env).values())).toContain('ExpiredTokenException');
  });

  it('says secret not found for a missing secret (ResourceNotFoundException)', async () => {
    const message = await failure(secretsManager({ secret_name: 'eka-ci/absent' }).values());
    expect(message).toContain('aws-secrets-manager secret eka-ci/absent in eu-west-1');
    expect(message).toContain('secret not found (ResourceNotFoundException (HTTP 400)');
  });

  it('picks up a rotated secret after the refresh interval, and not before', async () => {
    const c = secretsManager({ refresh_seconds: 120 });
    await c.values();
    sm.putSecret('eka-ci/github-app', JSON.stringify({ GITHUB_APP_ID: '124', GITHUB_APP_PRIVATE_KEY: 'rotated-key' }));
    clock += 119_000;
    expect((await c.values()).get('GITHUB_APP_ID')).toBe('123');
    expect(sm.requests).toHaveLength(1);
    clock += 1_000;
    expect((await c.values()).get('GITHUB_APP_ID')).toBe('124');
  });

  it('needs a region: the table or AWS_REGION', () => {
    const spec = credentialsSchema.parse({ 'aws-secrets-manager': { secret_name: 'x' } });
    const compileWith = (env: NodeJS.ProcessEnv) => Credentials.compile('w', spec, { source: 't', env, baseDir: dir });
    expect(() => compileWith({})).toThrow('w: aws-secrets-manager secret x in (no region): no region');
    expect(compileWith({ AWS_REGION: 'eu-central-1' }).description).toBe(
      'aws-secrets-manager secret x in eu-central-1',
    );
  });
});

describe('the aws-profile source', () => {
  it("reads a profile's keys from the shared credentials file, and again after it changes", async () => {
    const file = join(dir, 'credentials');
    await writeFile(
      file,
      `[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = x\n\n[production]\naws_access_key_id = AKIDPROD\naws_secret_access_key = ${AWS_SECRET}\n`,
    );
    const env = { AWS_SHARED_CREDENTIALS_FILE: file, AWS_CONFIG_FILE: join(dir, 'absent-config') };
    const c = compile({ 'aws-profile': { profile: 'production' } }, env);
    expect(c.description).toBe('aws-profile production');
    expect(Object.fromEntries(await c.values())).toEqual({
      AWS_ACCESS_KEY_ID: 'AKIDPROD',
      AWS_SECRET_ACCESS_KEY: AWS_SECRET,
    });
    await writeFile(
      file,
      `[production]\naws_access_key_id = AKIDPROD2\naws_secret_access_key = rotated-profile-key\naws_session_token = tok-0123456789\n`,
    );
    clock += 60_000;
    expect(Object.fromEntries(await c.values())).toEqual({
      AWS_ACCESS_KEY_ID: 'AKIDPROD2',
      AWS_SECRET_ACCESS_KEY: 'rotated-profile-key',
      AWS_SESSION_TOKEN: 'tok-0123456789',
    });
  });

  it('names the profile it cannot find', async () => {
    const env = { AWS_SHARED_CREDENTIALS_FILE: join(dir, 'none'), AWS_CONFIG_FILE: join(dir, 'none') };
    const message = await failure(compile({ 'aws-profile': { profile: 'staging' } }, env).values());
    expect(message).toContain("aws-profile staging: cannot get the profile's credentials");
  });
});

describe('awsCredentialProvider', () => {
  it("signs AWS requests with an instance role's rotating session credentials", async () => {
    const imds = new InstanceMetadataStandIn();
    const imdsUrl = await imds.start();
    try {
      const role = compile({ 'instance-metadata': { endpoint: imdsUrl } }, {});
      const provider = awsCredentialProvider(role);
      const first = await provider();
      expect(first).toMatchObject({
        accessKeyId: imds.roleCredentials.AccessKeyId,
        sessionToken: imds.roleCredentials.Token,
      });
      expect(first.expiration).toEqual(new Date(imds.roleCredentials.Expiration));
      sm.addKey(first.accessKeyId, first.secretAccessKey, first.sessionToken);
      const client = new SecretsManagerClient({ region: 'eu-west-1', endpoint, credentials: provider, maxAttempts: 1 });
      const answer = await client.send(new GetSecretValueCommand({ SecretId: 'eka-ci/github-app' }));
      expect(answer.VersionId).toBeDefined();
      client.destroy();
    } finally {
      await imds.stop();
    }
  });

  it('names what is missing when the values are not AWS keys', async () => {
    const c = compile({ env: { vars: ['AWS_ACCESS_KEY_ID'] } }, { AWS_ACCESS_KEY_ID: AKID });
    const e = await awsCredentialProvider(c)().catch((err: unknown) => err);
    expect((e as Error).message).toBe(
      'environment variable AWS_ACCESS_KEY_ID: no AWS_SECRET_ACCESS_KEY among the values (AWS credentials need both keys)',
    );
  });
});
