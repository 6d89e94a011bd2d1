/**
 * A HashiCorp Vault stand-in: the slice of Vault's HTTP API that eka-ci uses, answered as Vault documents it.
 *
 * - `GET /v1/MOUNT/data/PATH` (KV version 2): `{ data: { data, metadata: { version, … } } }`; 404 `{ errors: [] }`
 *   for a missing secret; a deleted version answers 404 with `data.data: null`.
 * - `GET /v1/auth/token/lookup-self`: `{ data: { ttl, renewable, expire_time, … } }`.
 * - `POST /v1/auth/token/renew-self`: `{ auth: { client_token, lease_duration, renewable } }`.
 * - every request needs `X-Vault-Token` naming a live token (403 `{ errors: ["permission denied"] }` otherwise) and,
 *   for a token made in a namespace, the same `X-Vault-Namespace`.
 *
 * Time is the stand-in's `now()`, so a test moves it to expire tokens without waiting.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { closeServer, listenOnLoopback } from './loopback.js';

interface Token {
  /** ms since the epoch; undefined: never expires (a root token). */
  expiresAt: number | undefined;
  ttlSeconds: number;
  renewable: boolean;
  /** Renewals never extend past this (Vault's max TTL); undefined: no limit. */
  maxExpiresAt: number | undefined;
  namespace: string | undefined;
}

interface Secret {
  data: Record<string, string> | null;
  version: number;
}

export interface VaultRequest {
  method: string;
  path: string;
  token: string | undefined;
  namespace: string | undefined;
}

export class VaultStandIn {
  readonly requests: VaultRequest[] = [];
  renewals = 0;
  private readonly tokens = new Map<string, Token>();
  private readonly secrets = new Map<string, Secret>();
  private server: Server | undefined;
  private clock: number;

  constructor(start = Date.parse('2026-06-01T00:00:00Z')) {
    this.clock = start;
  }

  /** The stand-in's clock (ms); give the same one to the client under test. */
  now = (): number => this.clock;

  advance(ms: number): void {
    this.clock += ms;
  }

  async start(): Promise<string> {
    this.server = createServer((req, res) => {
      this.handle(req, res).catch((err: unknown) => {
        res.writeHead(500, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ errors: [String(err)] }));
      });
    });
    return listenOnLoopback(this.server);
  }

  async stop(): Promise<void> {
    await closeServer(this.server);
    this.server = undefined;
  }

  /** A token; ttlSeconds 0 makes one that never expires. */
  addToken(
    token: string,
    o: { ttlSeconds?: number; renewable?: boolean; maxTtlSeconds?: number; namespace?: string } = {},
  ): void {
    const ttl = o.ttlSeconds ?? 3_600;
    this.tokens.set(token, {
      ttlSeconds: ttl,
      expiresAt: ttl > 0 ? this.clock + ttl * 1000 : undefined,
      renewable: o.renewable ?? true,
      maxExpiresAt: o.maxTtlSeconds === undefined ? undefined : this.clock + o.maxTtlSeconds * 1000,
      namespace: o.namespace,
    });
  }

  revokeToken(token: string): void {
    this.tokens.delete(token);
  }

  tokenExpiresAt(token: string): number | undefined {
    return this.tokens.get(token)?.expiresAt;
  }

  /** Writes a new version of the secret at `apiPath` (`secret/data/eka-ci/x`), as `vault kv put` does. */
  putSecret(apiPath: string, data: Record<string, string>): number {
    const version = (this.secrets.get(apiPath)?.version ?? 0) + 1;
    this.secrets.set(apiPath, { data, version });
    return version;
  }

  /** Soft-deletes the current version (`vault kv delete`). */
  deleteSecret(apiPath: string): void {
    const s = this.secrets.get(apiPath);
    if (s) s.data = null;
  }

  private liveToken(req: IncomingMessage): Token | undefined {
    const token = header(req, 'x-vault-token');
    const t = token === undefined ? undefined : this.tokens.get(token);
    if (!t) return undefined;
    if (t.expiresAt !== undefined && this.clock >= t.expiresAt) return undefined;
    if ((t.namespace ?? undefined) !== header(req, 'x-vault-namespace')) return undefined;
    return t;
  }

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const body = await readBody(req);
    const path = new URL(req.url ?? '/', 'http://x').pathname;
    this.requests.push({
      method: req.method ?? '',
      path,
      token: header(req, 'x-vault-token'),
      namespace: header(req, 'x-vault-namespace'),
    });
    const token = this.liveToken(req);
    if (!token) return send(res, 403, { errors: ['permission denied'] });
    if (path === '/v1/auth/token/lookup-self' && req.method === 'GET') {
      const ttl = token.expiresAt === undefined ? 0 : Math.max(0, Math.round((token.expiresAt - this.clock) / 1000));
      return send(res, 200, {
        data: {
          ttl,
          renewable: token.renewable,
          expire_time: token.expiresAt === undefined ? null : new Date(token.expiresAt).toISOString(),
          policies: ['default', 'eka-ci'],
        },
      });
    }
    if (path === '/v1/auth/token/renew-self' && (req.method === 'POST' || req.method === 'PUT')) {
      if (!token.renewable) return send(res, 400, { errors: ['lease is not renewable'] });
      this.renewals++;
      const increment = parseIncrement(body) ?? token.ttlSeconds;
      let expiresAt = this.clock + increment * 1000;
      if (token.maxExpiresAt !== undefined) expiresAt = Math.min(expiresAt, token.maxExpiresAt);
      token.expiresAt = expiresAt;
      const duration = Math.round((expiresAt - this.clock) / 1000);
      return send(res, 200, {
        auth: { client_token: header(req, 'x-vault-token'), lease_duration: duration, renewable: true },
      });
    }
    if (req.method !== 'GET' || !path.startsWith('/v1/')) return send(res, 405, { errors: [] });
    const secret = this.secrets.get(path.slice('/v1/'.length));
    if (!secret) return send(res, 404, { errors: [] });
    const response = {
      request_id: 'stand-in',
      lease_id: '',
      renewable: false,
      lease_duration: 0,
      data: {
        data: secret.data,
        metadata: {
          created_time: new Date(this.clock).toISOString(),
          custom_metadata: null,
          deletion_time: secret.data === null ? new Date(this.clock).toISOString() : '',
          destroyed: false,
          version: secret.version,
        },
      },
      wrap_info: null,
      warnings: null,
      auth: null,
    };
    return send(res, secret.data === null ? 404 : 200, response);
  }
}

function header(req: IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function parseIncrement(body: string): number | undefined {
  if (!body) return undefined;
  const { increment } = JSON.parse(body) as { increment?: string | number };
  if (typeof increment === 'number') return increment;
  const m = /^(\d+)([smh]?)$/.exec(increment ?? '');
  if (!m) return undefined;
  return Number(m[1]) * ({ '': 1, s: 1, m: 60, h: 3600 } as Record<string, number>)[m[2]!]!;
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(JSON.stringify(body));
}
