/**
 * How GitHub authenticates a GitHub App: a JWT signed (RS256) with the app's private key for the app's own endpoints,
 * and short-lived installation tokens (`ghs_…`) for everything done on an installation's behalf.
 */
import { generateKeyPairSync, randomBytes, verify, type KeyObject } from 'node:crypto';
import { createPublicKey } from 'node:crypto';

// GitHub refuses app JWTs that live longer than ten minutes; a minute of slack covers clocks a little apart.
const MAX_JWT_LIFETIME_SECONDS = 10 * 60 + 60;
// Installation tokens expire an hour after they are issued, as on github.com.
export const INSTALLATION_TOKEN_TTL_MS = 60 * 60 * 1000;
// Real installation tokens are `ghs_` and 36 base62 characters.
const TOKEN_RANDOM_BYTES = 27;

export type Credential =
  | { kind: 'none' }
  | { kind: 'app-jwt'; error?: string }
  | { kind: 'installation'; installationId?: number; error?: string };

/** A fresh RSA key pair, the private half as PEM in PKCS#1 (`BEGIN RSA PRIVATE KEY`) like GitHub's downloads. */
export function generateAppKey(): { privateKey: string; publicKey: KeyObject } {
  const { privateKey } = generateKeyPairSync('rsa', {
    modulusLength: 2048,
    privateKeyEncoding: { type: 'pkcs1', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'pem' },
  });
  return { privateKey, publicKey: createPublicKey(privateKey) };
}

function base64urlJson(part: string): unknown {
  return JSON.parse(Buffer.from(part, 'base64url').toString('utf8'));
}

export class AppAuth {
  private readonly tokens = new Map<string, { installationId: number; expiresAt: number }>();

  constructor(
    private readonly appId: number,
    private readonly publicKey: KeyObject,
  ) {}

  /** Who the `Authorization` header says the caller is; `error` is GitHub's 401 message when it cannot be believed. */
  identify(authorization: string | undefined): Credential {
    if (!authorization) return { kind: 'none' };
    const m = /^(token|bearer)\s+(\S+)$/i.exec(authorization.trim());
    if (!m) return { kind: 'installation', error: 'Bad credentials' };
    const secret = m[2]!;
    if (secret.split('.').length === 3) return { kind: 'app-jwt', error: this.jwtError(secret) };
    const known = this.tokens.get(secret);
    if (!known || known.expiresAt <= Date.now()) return { kind: 'installation', error: 'Bad credentials' };
    return { kind: 'installation', installationId: known.installationId };
  }

  issueToken(installationId: number): { token: string; expiresAt: Date } {
    const token = `ghs_${randomBytes(TOKEN_RANDOM_BYTES).toString('base64url').replace(/[-_]/g, 'x').slice(0, 36)}`;
    const expiresAt = Date.now() + INSTALLATION_TOKEN_TTL_MS;
    this.tokens.set(token, { installationId, expiresAt });
    return { token, expiresAt: new Date(expiresAt) };
  }

  private jwtError(jwt: string): string | undefined {
    const [header, payload, signature] = jwt.split('.') as [string, string, string];
    let claims: { iss?: unknown; exp?: unknown; iat?: unknown };
    try {
      const { alg } = base64urlJson(header) as { alg?: unknown };
      if (alg !== 'RS256') return 'A JSON web token could not be decoded';
      claims = base64urlJson(payload) as typeof claims;
    } catch {
      return 'A JSON web token could not be decoded';
    }
    const signed = Buffer.from(`${header}.${payload}`);
    if (!verify('RSA-SHA256', signed, this.publicKey, Buffer.from(signature, 'base64url'))) {
      return 'A JSON web token could not be decoded';
    }
    const now = Math.floor(Date.now() / 1000);
    if (typeof claims.iat !== 'number' || !Number.isInteger(claims.iat)) {
      return "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued";
    }
    if (typeof claims.exp !== 'number' || claims.exp <= now) {
      return "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires";
    }
    if (claims.exp > now + MAX_JWT_LIFETIME_SECONDS) return "'Expiration time' claim ('exp') is too far in the future";
    if (Number(claims.iss) !== this.appId) return 'Integration not found';
    return undefined;
  }
}
