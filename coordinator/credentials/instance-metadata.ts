/**
 * The cloud instance's own identity, from its metadata service (requests made here with fetch, so the endpoint is
 * configurable; the AWS SDK's provider reads it from the environment only):
 *
 * - aws (EC2, IMDSv2 only): `PUT /latest/api/token` for a session token, then
 *   `GET /latest/meta-data/iam/security-credentials/[ROLE]` with `X-aws-ec2-metadata-token` →
 *   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, expiring at the role credentials' `Expiration`.
 *   There is no fallback to IMDSv1 (requests without the token).
 * - gcp: `GET /computeMetadata/v1/instance/service-accounts/ACCOUNT/token` with `Metadata-Flavor: Google` →
 *   ACCESS_TOKEN (an OAuth access token for the service account).
 * - azure: `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=R` with `Metadata: true` →
 *   ACCESS_TOKEN (a managed identity's token for the resource).
 */
import type { InstanceMetadataSpec } from './schema.js';
import { isObject, jsonBody, request, type Reading, type Source, type SourceContext } from './source.js';

const DEFAULT_ENDPOINTS = {
  aws: 'http://169.254.169.254',
  gcp: 'http://metadata.google.internal',
  azure: 'http://169.254.169.254',
};
// The IMDSv2 session token's lifetime (seconds): AWS's maximum, six hours. It is fetched again when a request with it
// is refused or it runs out.
const IMDS_TOKEN_TTL_S = 21_600;
const AZURE_DEFAULT_RESOURCE = 'https://management.azure.com/';
const AZURE_API_VERSION = '2018-02-01';

export function instanceMetadataSource(
  spec: InstanceMetadataSpec,
  ctx: SourceContext,
  describe: (d: string) => void,
): Source {
  const endpoint = (spec.endpoint ?? DEFAULT_ENDPOINTS[spec.provider]).replace(/\/+$/, '');
  const description = `${spec.provider} instance metadata ${endpoint}`;
  describe(description);
  const read =
    spec.provider === 'aws'
      ? awsReader(endpoint, spec.role, ctx)
      : spec.provider === 'gcp'
        ? gcpReader(endpoint, spec.service_account ?? 'default', ctx)
        : azureReader(endpoint, spec.resource ?? AZURE_DEFAULT_RESOURCE, ctx);
  return { description, synchronous: false, read };
}

function awsReader(endpoint: string, role: string | undefined, ctx: SourceContext): () => Promise<Reading> {
  let session: { token: string; expiresAt: number } | undefined;

  const sessionToken = async (): Promise<string> => {
    if (session && ctx.now() < session.expiresAt) return session.token;
    const what = 'PUT /latest/api/token';
    const response = await request(
      `${endpoint}/latest/api/token`,
      { method: 'PUT', headers: { 'X-aws-ec2-metadata-token-ttl-seconds': String(IMDS_TOKEN_TTL_S) } },
      what,
      ctx.fail,
    );
    const text = await response.text();
    if (!response.ok)
      return ctx.fail(`${what}: HTTP ${response.status} (IMDSv2 is required; is this an EC2 instance?)`);
    // A minute's margin: a token must not run out between this check and the request it goes with.
    session = { token: text.trim(), expiresAt: ctx.now() + (IMDS_TOKEN_TTL_S - 60) * 1000 };
    return session.token;
  };

  /** A GET with the session token; a 401 (token expired or revoked) gets one more try with a new token. */
  const get = async (path: string): Promise<Response> => {
    for (let attempt = 1; ; attempt++) {
      const token = await sessionToken();
      const response = await request(
        `${endpoint}${path}`,
        { headers: { 'X-aws-ec2-metadata-token': token } },
        `GET ${path}`,
        ctx.fail,
      );
      if (response.status !== 401 || attempt === 2) return response;
      await response.body?.cancel();
      session = undefined;
    }
  };

  return async () => {
    const base = '/latest/meta-data/iam/security-credentials/';
    let name = role;
    if (name === undefined) {
      const listing = await get(base);
      const text = await listing.text();
      if (listing.status === 404) return ctx.fail(`GET ${base}: HTTP 404: the instance has no IAM role attached`);
      if (!listing.ok) return ctx.fail(`GET ${base}: HTTP ${listing.status}`);
      name = text.split('\n')[0]?.trim();
      if (!name) return ctx.fail(`GET ${base}: no role listed: the instance has no IAM role attached`);
    }
    const path = `${base}${encodeURIComponent(name)}`;
    const response = await get(path);
    if (!response.ok) {
      await response.body?.cancel();
      return ctx.fail(`GET ${path}: HTTP ${response.status}${response.status === 404 ? ': no such role' : ''}`);
    }
    const body = await jsonBody(response, `GET ${path}`, ctx.fail);
    if (!isObject(body) || body.Code !== 'Success') {
      const code = isObject(body) && typeof body.Code === 'string' ? body.Code : 'no Code';
      return ctx.fail(`GET ${path}: the role's credentials are not available (${code})`);
    }
    const { AccessKeyId, SecretAccessKey, Token, Expiration } = body;
    if (typeof AccessKeyId !== 'string' || typeof SecretAccessKey !== 'string' || typeof Token !== 'string') {
      return ctx.fail(`GET ${path}: the answer lacks AccessKeyId, SecretAccessKey or Token`);
    }
    const expiresAt = typeof Expiration === 'string' ? Date.parse(Expiration) : Number.NaN;
    return {
      values: new Map([
        ['AWS_ACCESS_KEY_ID', AccessKeyId],
        ['AWS_SECRET_ACCESS_KEY', SecretAccessKey],
        ['AWS_SESSION_TOKEN', Token],
      ]),
      readAt: ctx.now(),
      expiresAt: Number.isFinite(expiresAt) ? expiresAt : undefined,
    };
  };
}

function accessToken(
  body: unknown,
  expiresAt: (b: Record<string, unknown>) => number,
  what: string,
  ctx: SourceContext,
): Reading {
  if (!isObject(body) || typeof body.access_token !== 'string' || body.access_token === '') {
    return ctx.fail(`${what}: the answer has no access_token`);
  }
  const at = expiresAt(body);
  return {
    values: new Map([['ACCESS_TOKEN', body.access_token]]),
    readAt: ctx.now(),
    expiresAt: Number.isFinite(at) ? at : undefined,
  };
}

function gcpReader(endpoint: string, account: string, ctx: SourceContext): () => Promise<Reading> {
  const path = `/computeMetadata/v1/instance/service-accounts/${encodeURIComponent(account)}/token`;
  const what = `GET ${path}`;
  return async () => {
    const response = await request(`${endpoint}${path}`, { headers: { 'Metadata-Flavor': 'Google' } }, what, ctx.fail);
    if (!response.ok) {
      await response.body?.cancel();
      const hint = response.status === 404 ? `: no service account ${account} on this instance` : '';
      return ctx.fail(`${what}: HTTP ${response.status}${hint}`);
    }
    // The real service says who it is; anything else on that address is not the metadata server.
    if (response.headers.get('metadata-flavor') !== 'Google') {
      await response.body?.cancel();
      return ctx.fail(`${what}: the answer lacks Metadata-Flavor: Google, so it is not GCP's metadata server`);
    }
    const body = await jsonBody(response, what, ctx.fail);
    return accessToken(body, (b) => ctx.now() + Number(b.expires_in) * 1000, what, ctx);
  };
}

function azureReader(endpoint: string, resource: string, ctx: SourceContext): () => Promise<Reading> {
  const path = '/metadata/identity/oauth2/token';
  const what = `GET ${path}`;
  const query = new URLSearchParams({ 'api-version': AZURE_API_VERSION, resource });
  return async () => {
    const response = await request(`${endpoint}${path}?${query}`, { headers: { Metadata: 'true' } }, what, ctx.fail);
    if (!response.ok) {
      await response.body?.cancel();
      const hint = response.status === 400 ? ': no managed identity, or an unknown resource' : '';
      return ctx.fail(`${what}: HTTP ${response.status}${hint}`);
    }
    const body = await jsonBody(response, what, ctx.fail);
    // expires_on is epoch seconds, as a string.
    return accessToken(body, (b) => Number(b.expires_on) * 1000, what, ctx);
  };
}
