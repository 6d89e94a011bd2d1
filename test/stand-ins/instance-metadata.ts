/**
 * A cloud instance metadata stand-in, speaking the three documented APIs on one address:
 *
 * - AWS IMDSv2: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1..21600, else 400; a request
 *   with `X-Forwarded-For` is refused 403), then GETs under `/latest/meta-data/` with `X-aws-ec2-metadata-token`
 *   (missing, unknown or expired: 401 — IMDSv1, a GET without a token, is off as on a hardened instance).
 *   `/latest/meta-data/iam/security-credentials/` lists the role; `…/ROLE` answers its credentials as JSON.
 * - GCP: `GET /computeMetadata/v1/instance/service-accounts/ACCOUNT/token` needs `Metadata-Flavor: Google` (else
 *   403) and answers with that header and `{ access_token, expires_in, token_type }`.
 * - Azure: `GET /metadata/identity/oauth2/token?api-version=…&resource=…` needs `Metadata: true` (else 400) and
 *   answers `{ access_token, expires_in, expires_on, resource, token_type }` (numbers as strings).
 *
 * Time is the stand-in's `now()`; `rotate()` hands out new credentials, as the services do before expiry.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { closeServer, listenOnLoopback } from './loopback.js';

// The role credentials' lifetime, as EC2 hands them out (about six hours), and the access tokens' (an hour).
const ROLE_CREDENTIALS_TTL_MS = 6 * 3_600_000;
const ACCESS_TOKEN_TTL_S = 3_599;

export interface RoleCredentials {
  AccessKeyId: string;
  SecretAccessKey: string;
  Token: string;
  Expiration: string;
}

export interface MetadataRequest {
  method: string;
  path: string;
  /** The IMDSv2 session token sent, if any. */
  imdsToken: string | undefined;
}

export class InstanceMetadataStandIn {
  readonly requests: MetadataRequest[] = [];
  /** Whether an IAM role is attached (AWS); false lists none. */
  role: string | undefined = 'ekaci-role';
  roleCredentials!: RoleCredentials;
  accessToken!: string;
  private readonly sessions = new Map<string, number>();
  private server: Server | undefined;
  private clock: number;

  constructor(start = Date.parse('2026-06-01T00:00:00Z')) {
    this.clock = start;
    this.rotate();
  }

  now = (): number => this.clock;

  advance(ms: number): void {
    this.clock += ms;
  }

  /** New role credentials and a new access token, expiring from now. */
  rotate(): void {
    this.roleCredentials = {
      AccessKeyId: `ASIA${randomBytes(8).toString('hex').toUpperCase()}`,
      SecretAccessKey: randomBytes(20).toString('base64'),
      Token: randomBytes(32).toString('base64'),
      Expiration: new Date(this.clock + ROLE_CREDENTIALS_TTL_MS).toISOString().replace(/\.\d{3}Z$/, 'Z'),
    };
    this.accessToken = `ya29.${randomBytes(24).toString('base64url')}`;
  }

  /** Invalidates every IMDSv2 session token, as a reboot or a metadata-service restart does. */
  expireSessions(): void {
    this.sessions.clear();
  }

  async start(): Promise<string> {
    this.server = createServer((req, res) => this.handle(req, res));
    return listenOnLoopback(this.server);
  }

  async stop(): Promise<void> {
    await closeServer(this.server);
    this.server = undefined;
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://x');
    const imdsToken = header(req, 'x-aws-ec2-metadata-token');
    this.requests.push({ method: req.method ?? '', path: url.pathname, imdsToken });
    if (url.pathname === '/latest/api/token') return this.sessionToken(req, res);
    if (url.pathname.startsWith('/latest/')) return this.aws(req, res, url.pathname, imdsToken);
    if (url.pathname.startsWith('/computeMetadata/v1/')) return this.gcp(req, res, url.pathname);
    if (url.pathname === '/metadata/identity/oauth2/token') return this.azure(req, res, url);
    send(res, 404, 'text/plain', 'Not Found');
  }

  private sessionToken(req: IncomingMessage, res: ServerResponse): void {
    if (req.method !== 'PUT') return send(res, 405, 'text/plain', 'Method Not Allowed');
    if (header(req, 'x-forwarded-for') !== undefined) return send(res, 403, 'text/plain', 'Forbidden');
    const ttl = Number(header(req, 'x-aws-ec2-metadata-token-ttl-seconds'));
    if (!Number.isInteger(ttl) || ttl < 1 || ttl > 21_600) return send(res, 400, 'text/plain', 'Bad Request');
    const token = randomBytes(32).toString('base64');
    this.sessions.set(token, this.clock + ttl * 1000);
    res.setHeader('x-aws-ec2-metadata-token-ttl-seconds', String(ttl));
    send(res, 200, 'text/plain', token);
  }

  private aws(req: IncomingMessage, res: ServerResponse, path: string, token: string | undefined): void {
    const expires = token === undefined ? undefined : this.sessions.get(token);
    if (expires === undefined || this.clock >= expires) return send(res, 401, 'text/plain', 'Unauthorized');
    if (req.method !== 'GET') return send(res, 405, 'text/plain', 'Method Not Allowed');
    const base = '/latest/meta-data/iam/security-credentials/';
    if (path === base) {
      return this.role === undefined
        ? send(res, 404, 'text/plain', 'Not Found')
        : send(res, 200, 'text/plain', this.role);
    }
    if (this.role !== undefined && path === `${base}${this.role}`) {
      const body = {
        Code: 'Success',
        LastUpdated: new Date(this.clock).toISOString(),
        Type: 'AWS-HMAC',
        ...this.roleCredentials,
      };
      return send(res, 200, 'text/plain', JSON.stringify(body));
    }
    send(res, 404, 'text/plain', 'Not Found');
  }

  private gcp(req: IncomingMessage, res: ServerResponse, path: string): void {
    if (header(req, 'metadata-flavor') !== 'Google' || header(req, 'x-forwarded-for') !== undefined) {
      return send(res, 403, 'text/html', 'Missing Metadata-Flavor:Google header.');
    }
    res.setHeader('Metadata-Flavor', 'Google');
    if (path !== '/computeMetadata/v1/instance/service-accounts/default/token') {
      return send(res, 404, 'text/html', 'Not Found');
    }
    send(
      res,
      200,
      'application/json',
      JSON.stringify({ access_token: this.accessToken, expires_in: ACCESS_TOKEN_TTL_S, token_type: 'Bearer' }),
    );
  }

  private azure(req: IncomingMessage, res: ServerResponse, url: URL): void {
    if (header(req, 'metadata') !== 'true' || header(req, 'x-forwarded-for') !== undefined) {
      return send(
        res,
        400,
        'application/json',
        JSON.stringify({ error: 'invalid_request', error_description: 'Required metadata header not specified' }),
      );
    }
    const resource = url.searchParams.get('resource');
    if (!url.searchParams.get('api-version') || !resource) {
      return send(
        res,
        400,
        'application/json',
        JSON.stringify({ error: 'invalid_request', error_description: 'api-version and resource are required' }),
      );
    }
    const expiresOn = Math.floor(this.clock / 1000) + ACCESS_TOKEN_TTL_S;
    send(
      res,
      200,
      'application/json',
      JSON.stringify({
        access_token: this.accessToken,
        client_id: randomUUID(),
        expires_in: String(ACCESS_TOKEN_TTL_S),
        expires_on: String(expiresOn),
        ext_expires_in: String(ACCESS_TOKEN_TTL_S),
        not_before: String(expiresOn - ACCESS_TOKEN_TTL_S),
        resource,
        token_type: 'Bearer',
      }),
    );
  }
}

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function send(res: ServerResponse, status: number, type: string, body: string): void {
  res.writeHead(status, { 'content-type': type });
  res.end(body);
}
