import { UsageError } from '../common/errors.js';
import { sseEvents } from '../common/sse.js';
import { type ClientOptions, CoordinatorClient, CoordinatorError, drvHash, errorOf } from './coordinator-client.js';

export interface LogsOptions extends ClientOptions {
  attempt?: string;
  follow?: boolean;
  /** An attribute instead of a derivation: its repository (`OWNER/NAME`), and which commit (default: the newest). */
  repo?: string;
  commit?: string;
  pr?: string;
  job?: string;
}

interface SizePoint {
  commit: string;
  job: string;
  evaluatedAt: number;
  drvPath: string | null;
  error: string | null;
}

// A follower whose connection drops picks up where it was this many times in a row before giving up.
const RECONNECTS = 5;

/**
 * `ekaci logs DRV --coordinator URL` (or `ekaci logs ATTR --repo OWNER/NAME [--commit SHA | --pr N] [--job J]`): a
 * build's log from a running coordinator, written to stdout as it is; with
 * `--follow`, live until the attempt ends. Exit status: 0 when the log is read (with `--follow`: when the build
 * succeeded), 1 when the build ended otherwise or the coordinator refused (its message on stderr).
 */
export async function logsCommand(drv: string, opts: LogsOptions): Promise<number> {
  let hash: string;
  if (opts.repo !== undefined) {
    const found = await drvOfAttribute(drv, opts);
    if (typeof found === 'number') return found;
    hash = drvHash(found);
  } else {
    hash = drvHash(drv);
  }
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

/**
 * The derivation of attribute `attr` of `--repo` at `--commit` (a prefix is enough), at the head of pull request
 * `--pr`, or at the newest evaluated commit; an exit status after saying why when there is none.
 */
async function drvOfAttribute(attr: string, opts: LogsOptions): Promise<string | number> {
  const repo = opts.repo!;
  if (!/^[^/\s]+\/[^/\s]+$/.test(repo)) throw new UsageError(`--repo is OWNER/NAME, got "${repo}"`);
  if (opts.commit !== undefined && opts.pr !== undefined) throw new UsageError('give --commit or --pr, not both');
  if (opts.pr !== undefined && !/^[1-9][0-9]*$/.test(opts.pr)) {
    throw new UsageError(`--pr must be a pull request number, got "${opts.pr}"`);
  }
  const client = new CoordinatorClient(opts);
  try {
    const commit =
      opts.pr !== undefined
        ? (await client.json<{ headSha: string }>(`/repos/${repo}/pulls/${opts.pr}`)).headSha
        : opts.commit;
    const query = opts.job !== undefined ? `?job=${encodeURIComponent(opts.job)}` : '';
    const { points } = await client.json<{ points: SizePoint[] }>(
      `/repos/${repo}/attributes/${encodeURIComponent(attr)}/sizes${query}`,
    );
    const matching = points.filter((p) => commit === undefined || p.commit.startsWith(commit));
    const point = matching.at(-1);
    const at = commit === undefined ? 'in any evaluated commit' : `at ${commit}`;
    if (!point) return fail(`${repo} has no attribute ${attr} ${at}`);
    const jobs = new Set(matching.filter((p) => p.commit === point.commit).map((p) => p.job));
    if (jobs.size > 1)
      return fail(`${attr} is in several jobs of ${point.commit} (${[...jobs].join(', ')}): add --job`);
    if (point.drvPath === null) {
      return fail(`${attr} did not evaluate at ${point.commit}${point.error ? `: ${point.error}` : ''}`);
    }
    process.stderr.write(`ekaci logs: ${attr} at ${point.commit.slice(0, 12)} is ${point.drvPath}\n`);
    return point.drvPath;
  } catch (err) {
    if (!(err instanceof CoordinatorError)) throw err;
    return fail(err.message);
  }
}

function fail(message: string): number {
  process.stderr.write(`ekaci logs: ${message}\n`);
  return 1;
}

async function refused(r: Response): Promise<number> {
  process.stderr.write(`ekaci logs: ${(await errorOf(r)).message}\n`);
  return 1;
}
