import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { InstanceMetadataStandIn } from '../../test/stand-ins/instance-metadata.js';
import { Credentials, credentialsSchema } from './credentials.js';
import { credentialsFailure } from './test-support.js';

let imds: InstanceMetadataStandIn;
let endpoint: string;
const opened: Credentials[] = [];

beforeEach(async () => {
  imds = new InstanceMetadataStandIn();
  endpoint = await imds.start();
});
afterEach(async () => {
  for (const c of opened.splice(0)) c.close();
  await imds.stop();
});

function metadata(table: Record<string, unknown> = {}): Credentials {
  const spec = credentialsSchema.parse({ 'instance-metadata': { endpoint, ...table } });
  const c = Credentials.compile('caches.s3.credentials', spec, { source: 't', env: {}, baseDir: '/', now: imds.now });
  opened.push(c);
  return c;
}

const failure = (p: Promise<unknown>): Promise<string> => credentialsFailure(p, [imds.roleCredentials.SecretAccessKey]);

describe('the instance-metadata source', () => {
  describe('on AWS (IMDSv2)', () => {
    it("gives the role's keys, asking for a session token first and sending it with every GET", async () => {
      const c = metadata();
      expect(c.description).toBe(`aws instance metadata ${endpoint}`);
      expect(Object.fromEntries(await c.values())).toEqual({
        AWS_ACCESS_KEY_ID: imds.roleCredentials.AccessKeyId,
        AWS_SECRET_ACCESS_KEY: imds.roleCredentials.SecretAccessKey,
        AWS_SESSION_TOKEN: imds.roleCredentials.Token,
      });
      expect(c.expiresAt).toEqual(new Date(imds.roleCredentials.Expiration));
      const [put, ...gets] = imds.requests;
      expect(put).toMatchObject({ method: 'PUT', path: '/latest/api/token' });
      expect(gets.map((r) => r.path)).toEqual([
        '/latest/meta-data/iam/security-credentials/',
        '/latest/meta-data/iam/security-credentials/ekaci-role',
      ]);
      for (const get of gets) expect(get.imdsToken).toBeTruthy();
    });

    it('is a stand-in that refuses IMDSv1 (a GET without the session token)', async () => {
      const response = await fetch(`${endpoint}/latest/meta-data/iam/security-credentials/ekaci-role`);
      expect(response.status).toBe(401);
    });

    it('fetches rotated credentials five minutes before the old ones expire, and not before', async () => {
      const c = metadata();
      const first = (await c.values()).get('AWS_ACCESS_KEY_ID');
      const expiresAt = Date.parse(imds.roleCredentials.Expiration);
      imds.rotate();
      imds.advance(expiresAt - imds.now() - 5 * 60_000 - 1);
      expect((await c.values()).get('AWS_ACCESS_KEY_ID')).toBe(first);
      imds.advance(1);
      expect((await c.values()).get('AWS_ACCESS_KEY_ID')).toBe(imds.roleCredentials.AccessKeyId);
      expect((await c.values()).get('AWS_ACCESS_KEY_ID')).not.toBe(first);
    });

    it('asks for a new session token when the old one is refused', async () => {
      const c = metadata({ role: 'ekaci-role' });
      await c.values();
      imds.expireSessions();
      c.invalidate();
      expect((await c.values()).get('AWS_ACCESS_KEY_ID')).toBe(imds.roleCredentials.AccessKeyId);
      expect(imds.requests.filter((r) => r.path === '/latest/api/token')).toHaveLength(2);
    });

    it('says so when the instance has no role', async () => {
      imds.role = undefined;
      expect(await failure(metadata().values())).toBe(
        `caches.s3.credentials: aws instance metadata ${endpoint}: GET /latest/meta-data/iam/security-credentials/: ` +
          'HTTP 404: the instance has no IAM role attached',
      );
    });

    it('names the refusal of the session token request', async () => {
      const c = metadata({ endpoint: `${endpoint}/nowhere` });
      expect(await failure(c.values())).toContain('PUT /latest/api/token: HTTP 404 (IMDSv2 is required');
    });

    it('names the connection failure when nothing answers', async () => {
      const c = metadata();
      await imds.stop();
      expect(await failure(c.values())).toMatch(/PUT \/latest\/api\/token failed: ECONNREFUSED/);
    });
  });

  describe('on GCP', () => {
    it("gives the service account's access token, asked with Metadata-Flavor: Google", async () => {
      const c = metadata({ provider: 'gcp' });
      expect(Object.fromEntries(await c.values())).toEqual({ ACCESS_TOKEN: imds.accessToken });
      expect(c.expiresAt).toEqual(new Date(imds.now() + 3_599_000));
      const plain = await fetch(`${endpoint}/computeMetadata/v1/instance/service-accounts/default/token`);
      expect(plain.status).toBe(403);
    });

    it('names a service account the instance does not have', async () => {
      expect(await failure(metadata({ provider: 'gcp', service_account: 'builder' }).values())).toContain(
        'HTTP 404: no service account builder on this instance',
      );
    });
  });

  describe('on Azure', () => {
    it("gives the managed identity's token for the resource, asked with Metadata: true", async () => {
      const c = metadata({ provider: 'azure', resource: 'https://vault.azure.net' });
      expect(Object.fromEntries(await c.values())).toEqual({ ACCESS_TOKEN: imds.accessToken });
      expect(c.expiresAt).toEqual(new Date(Math.floor(imds.now() / 1000) * 1000 + 3_599_000));
      const plain = await fetch(`${endpoint}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=x`);
      expect(plain.status).toBe(400);
    });

    it('fetches a new token before the old one expires', async () => {
      const c = metadata({ provider: 'azure' });
      const first = (await c.values()).get('ACCESS_TOKEN');
      imds.rotate();
      imds.advance(3_599_000 - 5 * 60_000);
      expect((await c.values()).get('ACCESS_TOKEN')).not.toBe(first);
    });
  });
});
