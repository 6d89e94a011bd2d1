import { IllegalStateError } from '../../common/errors.js';
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';

/**
 * Web sessions after a GitHub login: a compact JWT (HS256) in an `HttpOnly` cookie naming the GitHub user, and a
 * CSRF token the page sends back in a header on every state-changing request (it is derived from the session, so a
 * page of another site, which can make the browser send the cookie but cannot read it, cannot produce it).
 */

export const SESSION_COOKIE = 'ekaci_session';
export const STATE_COOKIE = 'ekaci_oauth_state';
export const CSRF_HEADER = 'X-CSRF-Token';

export interface Session {
  /** The GitHub login. */
  login: string;
  /** A random id per login: what the CSRF token is derived from. */
  sid: string;
  /** Seconds since the epoch. */
  exp: number;
}

const b64 = (data: Buffer | string): string => Buffer.from(data).toString('base64url');
const HEADER = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));

export class Sessions {
  /** `secret`: the signing secret, or where to read it (a secret resolved when the coordinator starts). */
  constructor(
    private readonly secret: string | (() => string),
    private readonly lifetimeSeconds: number,
  ) {}

  /** A new session's cookie value for `login`. */
  issue(login: string, now = Date.now()): string {
    const payload: Session = {
      login,
      sid: randomBytes(16).toString('hex'),
      exp: Math.floor(now / 1000) + this.lifetimeSeconds,
    };
    const body = `${HEADER}.${b64(JSON.stringify(payload))}`;
    return `${body}.${this.mac(body)}`;
  }

  /** The session a cookie value carries, or undefined for a forged, altered, malformed or expired one. */
  verify(token: string | undefined, now = Date.now()): Session | undefined {
    if (!token) return undefined;
    const parts = token.split('.');
    if (parts.length !== 3 || parts[0] !== HEADER) return undefined;
    const expected = Buffer.from(this.mac(`${parts[0]}.${parts[1]}`));
    const given = Buffer.from(parts[2]!);
    if (given.length !== expected.length || !timingSafeEqual(given, expected)) return undefined;
    let session: Session;
    try {
      session = JSON.parse(Buffer.from(parts[1]!, 'base64url').toString('utf8')) as Session;
    } catch {
      return undefined;
    }
    if (typeof session.login !== 'string' || typeof session.sid !== 'string' || typeof session.exp !== 'number') {
      return undefined;
    }
    return session.exp * 1000 > now ? session : undefined;
  }

  /** The CSRF token of a session: what the page must send in `X-CSRF-Token`. */
  csrfToken(session: Session): string {
    return this.mac(`csrf:${session.sid}`);
  }

  /** Whether a request's CSRF header matches its session. */
  csrfMatches(session: Session, header: string | undefined): boolean {
    if (!header) return false;
    const expected = Buffer.from(this.csrfToken(session));
    const given = Buffer.from(header);
    return given.length === expected.length && timingSafeEqual(given, expected);
  }

  /** A signed value for the short-lived OAuth `state` cookie. */
  sign(value: string): string {
    return `${value}.${this.mac(`state:${value}`)}`;
  }

  /** The value of a signed cookie, or undefined when the signature does not hold. */
  unsign(signed: string | undefined): string | undefined {
    const dot = signed?.lastIndexOf('.') ?? -1;
    if (!signed || dot < 0) return undefined;
    const value = signed.slice(0, dot);
    const expected = Buffer.from(this.mac(`state:${value}`));
    const given = Buffer.from(signed.slice(dot + 1));
    return given.length === expected.length && timingSafeEqual(given, expected) ? value : undefined;
  }

  private mac(data: string): string {
    const secret = typeof this.secret === 'string' ? this.secret : this.secret();
    if (secret === '') throw new IllegalStateError('the session secret is not read yet');
    return createHmac('sha256', secret).update(data).digest('base64url');
  }
}
