import { UsageError } from '../common/errors.js';
import { sseEvents } from '../common/sse.js';
import { type ClientOptions, CoordinatorClient, drvHash, errorOf } from './coordinator-client.js';

export interface LogsOptions extends ClientOptions {
  attempt?: string;
  follow?: boolean;
}

// A follower whose connection drops picks up where it was this many times in a row before giving up.
const RECONNECTS = 5;

/**
 * `ekaci logs DRV --coordinator URL`: a build's log from a running coordinator, written to stdout as it is; with
 * `--follow`, live until the attempt ends. Exit status: 0 when the log is read (with `--follow`: when the build
 * succeeded), 1 when the build ended otherwise or the coordinator refused (its message on stderr).
 */
export async function logsCommand(drv: string, opts: LogsOptions): Promise<number> {
  const hash = drvHash(drv);
  if (opts.attempt !== undefined && !/^[1-9][0-9]*$/.test(opts.attempt)) {
    throw new UsageError(`--attempt must be a positive whole number, got "${opts.attempt}"`);
  }
  const client = new CoordinatorClient(opts);
  const base = client.base;
  const path = opts.attempt === undefined ? 'log' : `attempts/${opts.attempt}/log`;
  const url = client.url(`/derivations/${hash}/${path}${opts.follow ? '?follow=1' : ''}`);
  const headers = client.headers;
  if (!opts.follow) {
    const r = await fetch(url, { headers });
    if (!r.ok) return refused(r);
    for await (const chunk of r.body ?? []) process.stdout.write(chunk);
    return 0;
  }
  let lastId: string | undefined;
  for (let failures = 0; failures <= RECONNECTS;) {
    let r: Response;
    try {
      r = await fetch(url, { headers: { ...headers, ...(lastId ? { 'last-event-id': lastId } : {}) } });
    } catch (err) {
      failures++;
      process.stderr.write(`ekaci logs: cannot reach ${base} (${(err as Error).message}); trying again\n`);
      await new Promise((resolve) => setTimeout(resolve, 1000 * failures));
      continue;
    }
    if (!r.ok) return refused(r);
    try {
      for await (const e of sseEvents(r)) {
        failures = 0;
        if (e.event === 'log') {
          process.stdout.write(JSON.parse(e.data) as string);
          lastId = e.id;
        } else if (e.event === 'end') {
          const end = JSON.parse(e.data) as { state: string | null; attemptState: string | null; error: string | null };
          const why = end.error ? `: ${end.error}` : '';
          process.stderr.write(
            `ekaci logs: attempt ${end.attemptState ?? 'gone'}, build ${end.state ?? 'unknown'}${why}\n`,
          );
          return end.attemptState === 'succeeded' ? 0 : 1;
        }
      }
    } catch (err) {
      process.stderr.write(`ekaci logs: the connection dropped (${(err as Error).message}); resuming\n`);
    }
    failures++;
  }
  process.stderr.write(`ekaci logs: gave up after ${RECONNECTS} failed reconnects\n`);
  return 1;
}

async function refused(r: Response): Promise<number> {
  process.stderr.write(`ekaci logs: ${(await errorOf(r)).message}\n`);
  return 1;
}
