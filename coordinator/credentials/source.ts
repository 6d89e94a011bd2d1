/**
 * What every credential source implements; `Credentials` (credentials.ts) adds caching, rotation and redaction on
 * top, so a source only knows how to read its values once and how to tell that a reading went stale.
 */

/** One reading of a source's values. */
export interface Reading {
  values: Map<string, string>;
  /** When the reading was taken (the context's clock, ms). */
  readAt: number;
  /** When the values stop working (AWS session credentials, metadata tokens); undefined when unknown or never. */
  expiresAt?: number | undefined;
  /** Whatever tells a later check that the source changed (a file's inode, size and mtime). */
  fingerprint?: string | undefined;
}

export interface Source {
  /** Where the values come from, for messages: addresses, paths and names only, never a value. */
  readonly description: string;
  /** Values of synchronous sources (environment, local files) can be read without waiting: `readSync` exists. */
  readonly synchronous: boolean;
  /** Read again when a reading is older than this (ms); undefined: only on change or expiry. */
  readonly refreshMs?: number | undefined;
  read(): Promise<Reading>;
  readSync?(): Reading;
  /** Whether the source changed since `reading` was taken; a cheap local check (a stat), never a request. */
  changed?(reading: Reading): boolean;
  /** Stops timers (token renewal). */
  close?(): void;
}

/** What a source is compiled with. `fail` throws a CredentialsError: `WHERE: DESCRIPTION: problem`. */
export interface SourceContext {
  env: NodeJS.ProcessEnv;
  baseDir: string;
  now: () => number;
  fail: (problem: string, cause?: unknown) => never;
}

// Every request a source makes gives up after this long: a metadata service or a Vault that does not answer must not
// hang a cache push or the coordinator's start. Ten seconds is far beyond any healthy answer.
export const REQUEST_TIMEOUT_MS = 10_000;

/**
 * `fetch` with the timeout, failing with the source's description and what happened: the HTTP layer's error code
 * (ECONNREFUSED, a timeout), never the URL's query or a header.
 */
export async function request(
  url: string,
  init: RequestInit,
  what: string,
  fail: SourceContext['fail'],
): Promise<Response> {
  try {
    return await fetch(url, { ...init, redirect: 'manual', signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) });
  } catch (err) {
    const e = err as Error & { cause?: { code?: string; message?: string } };
    const why =
      e.name === 'TimeoutError' ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` : (e.cause?.code ?? e.message);
    return fail(`${what} failed: ${why}`, err);
  }
}

/** A response body as JSON, or a failure naming what was expected (the body itself is never quoted). */
export async function jsonBody(response: Response, what: string, fail: SourceContext['fail']): Promise<unknown> {
  const text = await response.text();
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return fail(`${what}: the answer is not JSON (HTTP ${response.status}, ${text.length} bytes)`);
  }
}

/** A JSON object's string and number fields as values; anything else in it is ignored. */
export function stringFields(object: Record<string, unknown>): Map<string, string> {
  const values = new Map<string, string>();
  for (const [key, value] of Object.entries(object)) {
    if (typeof value === 'string' || typeof value === 'number') values.set(key, String(value));
  }
  return values;
}

export function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}
