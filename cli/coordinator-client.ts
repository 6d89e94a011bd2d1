import { UsageError } from '../common/errors.js';

/** How `ekaci` reaches a running coordinator: its URL and an API token (`--token`, else `$EKACI_TOKEN`). */
export interface ClientOptions {
  coordinator: string;
  token?: string;
}

/** The coordinator refused or failed a request; the message is its own (`{ error: { message } }`). */
export class CoordinatorError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(`${status}: ${message}`);
  }
}

/** The API of a running coordinator, for `ekaci` commands. */
export class CoordinatorClient {
  readonly base: string;
  readonly headers: Record<string, string>;

  constructor(opts: ClientOptions) {
    this.base = opts.coordinator.replace(/\/+$/, '');
    const token = opts.token ?? process.env.EKACI_TOKEN;
    this.headers = token ? { authorization: `Bearer ${token}` } : {};
  }

  url(path: string): string {
    return `${this.base}/api/v1${path}`;
  }

  /** GET (or POST with `body`) of a JSON route; throws CoordinatorError for an answer that is not 2xx. */
  async json<T>(path: string, init: { method?: string; body?: unknown } = {}): Promise<T> {
    const r = await fetch(this.url(path), {
      method: init.method ?? 'GET',
      headers: { ...this.headers, ...(init.body === undefined ? {} : { 'content-type': 'application/json' }) },
      ...(init.body === undefined ? {} : { body: JSON.stringify(init.body) }),
    });
    if (!r.ok) throw await errorOf(r);
    return (await r.json()) as T;
  }
}

/** The error a non-2xx answer carries: the API's message when it sent one, else the body as it is. */
export async function errorOf(r: Response): Promise<CoordinatorError> {
  const text = await r.text();
  try {
    return new CoordinatorError(r.status, (JSON.parse(text) as { error: { message: string } }).error.message);
  } catch {
    return new CoordinatorError(r.status, text);
  }
}

/** The hash of a derivation named by its .drv store path or its hash (what the API's routes take). */
export function drvHash(drv: string): string {
  const hash = /^(?:\/nix\/store\/)?([0-9a-df-np-sv-z]{32})(?:-[^/]*)?$/.exec(drv)?.[1];
  if (!hash) throw new UsageError(`"${drv}" is neither a .drv store path nor its hash`);
  return hash;
}

/** Runs a client command: a CoordinatorError or an unreachable coordinator is one line on stderr and exit status 1. */
export async function asCommand(name: string, fn: () => Promise<number>): Promise<number> {
  try {
    return await fn();
  } catch (err) {
    if (err instanceof CoordinatorError) {
      process.stderr.write(`ekaci ${name}: ${err.message}\n`);
      return 1;
    }
    if (err instanceof TypeError && /fetch failed/.test(err.message)) {
      const cause = (err as TypeError & { cause?: Error }).cause?.message ?? err.message;
      process.stderr.write(`ekaci ${name}: cannot reach the coordinator (${cause})\n`);
      return 1;
    }
    throw err;
  }
}
