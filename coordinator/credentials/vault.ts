/**
 * HashiCorp Vault, KV secrets engine version 2, over its HTTP API: `GET /v1/MOUNT/data/PATH` with `X-Vault-Token`
 * (and `X-Vault-Namespace` for Vault Enterprise namespaces). The values are the secret's keys (`.data.data`).
 *
 * `secret_path` is the API path after `/v1/` (`secret/data/eka-ci/cache`); a path without a `data` segment after
 * its mount (`eka-ci/cache`, as `vault kv get secret/eka-ci/cache` names it) is read from the default mount `secret/`.
 *
 * KV secrets carry no lease; the token does. Its TTL is looked up once (`auth/token/lookup-self`) and a renewable
 * token is renewed (`auth/token/renew-self`) when two thirds of it have passed — by a timer, so an idle coordinator
 * keeps its token, and before any read that finds it close to running out. A token from `token_file` (a Vault agent's
 * sink) is read again when the file changes and when Vault refuses it.
 */
import { readFileSync, statSync } from 'node:fs';
import { jitter } from '../../common/backoff.js';
import type { VaultSpec } from './schema.js';
import { anchored } from './local.js';
import { isObject, jsonBody, request, stringFields, type Reading, type Source, type SourceContext } from './source.js';

// KV secrets have no expiry to wait for: they are read again this often, so a rotated secret is picked up within it.
const DEFAULT_REFRESH_MS = 5 * 60_000;
// A renewable token is renewed once this share of its TTL has passed: early enough that one failed attempt leaves a
// third of the TTL to try again, late enough not to renew on every read.
const RENEW_AT_FRACTION = 2 / 3;
// Asked of renew-self; Vault grants at most the token's max TTL whatever is asked.
const RENEW_INCREMENT = '1h';
const DEFAULT_TOKEN_ENV = 'VAULT_TOKEN';
// Timers wait at most this long (Node's limit is 24.8 days; tokens may live longer): a timer that fires early just
// waits again.
const MAX_TIMER_MS = 24 * 3_600_000;

interface TokenState {
  token: string;
  /** Where the token came from, when a file: its fingerprint, to see it rotate. */
  fileFingerprint?: string | undefined;
  /** undefined: not looked up yet. */
  expiresAt?: number | undefined;
  renewable?: boolean;
  ttlMs?: number;
}

export function vaultSource(spec: VaultSpec, ctx: SourceContext, describe: (d: string) => void): Source {
  const address = spec.address.replace(/\/+$/, '');
  const apiPath = kvApiPath(spec.secret_path);
  const description = `vault ${address}${spec.namespace ? ` (namespace ${spec.namespace})` : ''} ${apiPath}`;
  describe(description);
  const tokenFile = spec.token_file === undefined ? undefined : anchored(spec.token_file, ctx.baseDir);
  const tokenEnv = spec.token_env ?? DEFAULT_TOKEN_ENV;
  if (tokenFile === undefined && !ctx.env[tokenEnv]?.trim()) {
    ctx.fail(`${tokenEnv} is not set: give the Vault token in it, or name a token_file`);
  }
  const refreshMs = (spec.refresh_seconds ?? DEFAULT_REFRESH_MS / 1000) * 1000;
  let state: TokenState | undefined;
  let timer: NodeJS.Timeout | undefined;
  let closed = false;

  const headers = (token: string): Record<string, string> => ({
    'X-Vault-Token': token,
    'X-Vault-Request': 'true',
    ...(spec.namespace ? { 'X-Vault-Namespace': spec.namespace } : {}),
  });

  const readToken = (): TokenState => {
    if (tokenFile === undefined) return { token: ctx.env[tokenEnv]!.trim() };
    let text: string;
    let print: string;
    try {
      const s = statSync(tokenFile, { bigint: true });
      print = `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}`;
      text = readFileSync(tokenFile, 'utf8').trim();
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? (err as Error).message;
      return ctx.fail(`cannot read token file ${tokenFile}: ${code}`, err);
    }
    if (text === '') return ctx.fail(`token file ${tokenFile} is empty`);
    return { token: text, fileFingerprint: print };
  };

  const tokenFileChanged = (s: TokenState): boolean => {
    if (tokenFile === undefined) return false;
    try {
      const st = statSync(tokenFile, { bigint: true });
      return `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}` !== s.fileFingerprint;
    } catch {
      return true;
    }
  };

  const refused = (status: number, what: string): never => {
    if (status === 403 || status === 401) {
      return ctx.fail(`${what}: permission denied (HTTP ${status}): wrong or expired token, or no policy grants read`);
    }
    if (status === 503) return ctx.fail(`${what}: Vault is sealed or in standby (HTTP 503)`);
    return ctx.fail(`${what}: HTTP ${status}`);
  };

  /** Learns the token's TTL (lookup-self), or renews it (renew-self); either way `s` learns when it expires. */
  const tokenCall = async (s: TokenState, renew: boolean): Promise<void> => {
    const what = renew ? 'renewing the token' : 'looking up the token';
    const url = `${address}/v1/auth/token/${renew ? 'renew-self' : 'lookup-self'}`;
    const response = await request(
      url,
      renew
        ? {
            method: 'POST',
            headers: { ...headers(s.token), 'Content-Type': 'application/json' },
            body: JSON.stringify({ increment: RENEW_INCREMENT }),
          }
        : { headers: headers(s.token) },
      what,
      ctx.fail,
    );
    if (!renew && response.status === 403) {
      // A policy may withhold lookup-self: then the TTL is unknown and nothing is renewed. A wrong token is refused
      // by the read that follows, which says so.
      await response.body?.cancel();
      s.expiresAt = Number.POSITIVE_INFINITY;
      s.renewable = false;
      return;
    }
    if (!response.ok) {
      await response.body?.cancel();
      return refused(response.status, what);
    }
    const body = await jsonBody(response, what, ctx.fail);
    let ttlS: unknown;
    let renewable: unknown;
    if (renew) {
      const auth = isObject(body) && isObject(body.auth) ? body.auth : {};
      [ttlS, renewable] = [auth.lease_duration, auth.renewable];
    } else {
      const data = isObject(body) && isObject(body.data) ? body.data : {};
      [ttlS, renewable] = [data.ttl, data.renewable];
    }
    if (typeof ttlS !== 'number') return ctx.fail(`${what}: the answer has no TTL`);
    s.renewable = renewable === true;
    s.ttlMs = ttlS * 1000;
    // TTL 0: a token that never expires (root tokens, periodic tokens without a period).
    s.expiresAt = ttlS > 0 ? ctx.now() + s.ttlMs : Number.POSITIVE_INFINITY;
    schedule(s);
  };

  const renewDue = (s: TokenState): number =>
    s.expiresAt === undefined || !Number.isFinite(s.expiresAt)
      ? Number.POSITIVE_INFINITY
      : s.expiresAt - (1 - RENEW_AT_FRACTION) * (s.ttlMs ?? 0);

  /** Keeps an idle token alive: a timer at the renewal point (unref'd: it never holds the process open). */
  const schedule = (s: TokenState): void => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    if (closed || !s.renewable || !Number.isFinite(renewDue(s))) return;
    const delay = Math.max(0, renewDue(s) - ctx.now());
    timer = setTimeout(
      () => {
        timer = undefined;
        if (state !== s) return;
        if (ctx.now() < renewDue(s)) schedule(s);
        // A failed renewal is tried again by the next read, which finds the token due.
        else tokenCall(s, true).catch(() => undefined);
      },
      Math.min(MAX_TIMER_MS, jitter(delay, 0.1)),
    );
    timer.unref();
  };

  /** A token that works now: read, looked up, renewed if due; a rotated token file replaces the old token. */
  const currentToken = async (): Promise<TokenState> => {
    if (state === undefined || tokenFileChanged(state)) state = readToken();
    const s = state;
    if (s.expiresAt === undefined) await tokenCall(s, false);
    const now = ctx.now();
    if (s.renewable && now >= renewDue(s) && now < s.expiresAt!) await tokenCall(s, true);
    if (ctx.now() >= s.expiresAt!) {
      return ctx.fail(
        tokenFile === undefined
          ? `the token in ${tokenEnv} has expired and cannot be renewed: give a new one`
          : `the token in ${tokenFile} has expired and cannot be renewed: write a new one there`,
      );
    }
    return s;
  };

  const readSecret = async (s: TokenState): Promise<Response> =>
    request(`${address}/v1/${apiPath}`, { headers: headers(s.token) }, `reading ${apiPath}`, ctx.fail);

  const read = async (): Promise<Reading> => {
    let s = await currentToken();
    let response = await readSecret(s);
    // A Vault agent may have written a new token since the file was last looked at: one more try with it.
    const fresh = response.status === 403 && tokenFile !== undefined ? readToken() : undefined;
    if (fresh && fresh.token !== s.token) {
      await response.body?.cancel();
      state = fresh;
      s = await currentToken();
      response = await readSecret(s);
    }
    const what = `reading ${apiPath}`;
    if (response.status === 404) {
      await response.body?.cancel();
      const hint = spec.secret_path === apiPath ? '' : ` (${spec.secret_path} was read from the default mount secret/)`;
      return ctx.fail(
        `secret not found (HTTP 404)${hint}; a KV v2 path needs /data/ after the mount: MOUNT/data/PATH, ` +
          `as in secret/data/eka-ci/cache`,
      );
    }
    if (!response.ok) {
      await response.body?.cancel();
      if (response.status === 403) state = undefined;
      return refused(response.status, what);
    }
    const body = await jsonBody(response, what, ctx.fail);
    const data = isObject(body) && isObject(body.data) ? body.data : undefined;
    if (!data) return ctx.fail(`${what}: the answer has no data: is this a KV version 2 mount?`);
    if (data.data === null) return ctx.fail(`${what}: the current version of the secret is deleted`);
    if (!isObject(data.data)) {
      return ctx.fail(`${what}: the answer has no data.data: is this a KV version 2 mount (MOUNT/data/PATH)?`);
    }
    const metadata = isObject(data.metadata) ? data.metadata : {};
    const version = typeof metadata.version === 'number' ? String(metadata.version) : undefined;
    return { values: stringFields(data.data), readAt: ctx.now(), fingerprint: version };
  };

  return {
    description,
    synchronous: false,
    refreshMs,
    read,
    close: () => {
      closed = true;
      if (timer) clearTimeout(timer);
      timer = undefined;
    },
  };
}

/** The API path of a KV v2 secret: as given when it has a `data` segment after the mount, else under `secret/`. */
export function kvApiPath(secretPath: string): string {
  const path = secretPath.replace(/^\/+|\/+$/g, '');
  return path.split('/')[1] === 'data' ? path : `secret/data/${path}`;
}
