import { sseEvents } from '../common/sse.js';
import type { BuildResult } from '../coordinator/scheduler/build-manager.js';
import { TERMINAL_STATES } from '../coordinator/scheduler/build-state.js';
import { type ClientOptions, CoordinatorClient, asCommand, drvHash, errorOf } from './coordinator-client.js';
import { uploadDerivationClosure } from './drv-upload.js';

export interface RemoteBuild extends ClientOptions {
  private?: boolean;
}

// Without events (a proxy that buffers them), the request is looked at this often anyway.
const POLL_MS = 5_000;

/**
 * `ekaci build FILE -A ATTR --coordinator URL`: what was instantiated here is built there. What the coordinator's
 * binary cache lacks of the `.drv` closure goes there (cli/drv-upload.ts; only content-addressed paths are accepted,
 * so nothing the client sends can pose as a build output), the roots are
 * submitted, and progress is followed live from `/api/v1/events` until every root has settled. Prints what the
 * embedded mode prints: `report` prints the results and gives the exit status.
 */
export function remoteBuild(
  roots: ReadonlyArray<{ attr: string; drvPath: string }>,
  opts: RemoteBuild,
  report: (results: BuildResult[], seconds: number) => number,
): Promise<number> {
  return asCommand('build', async () => {
    const client = new CoordinatorClient(opts);
    const started = Date.now();
    await upload(
      client,
      roots.map((r) => r.drvPath),
    );
    const submitted = await client.json<{ id: number }>('/builds', {
      method: 'POST',
      body: { roots: roots.map((r) => ({ attr: r.attr, drvPath: r.drvPath })), private: opts.private ?? false },
    });
    process.stderr.write(`submitted request ${submitted.id} to ${client.base}\n`);
    const results = await follow(client, submitted.id, roots.length);
    return report(results, (Date.now() - started) / 1000);
  });
}

/** The `.drv` closure of the roots to the coordinator's cache, once the token has been seen to be accepted there. */
async function upload(client: CoordinatorClient, drvs: readonly string[]): Promise<void> {
  // Asked first, so that a refused token is the coordinator's message, not a failed upload's.
  const probe = await fetch(`${client.base}/cache/nix-cache-info`, { headers: client.headers });
  if (!probe.ok) throw await errorOf(probe);
  const sent = await uploadDerivationClosure(client, drvs);
  process.stderr.write(
    `uploaded ${sent.derivations} derivations and ${sent.sources} sources ` +
      `(${sent.present} paths found in the coordinator's cache with their closures)\n`,
  );
}

/** Waits for the request to settle, printing each root as it does (stderr); an interrupt cancels what is left. */
async function follow(client: CoordinatorClient, id: number, total: number): Promise<BuildResult[]> {
  const events = new AbortController();
  const seen = new Set<string>();
  let wake: () => void = () => {};
  const onSignal = (): void => {
    process.stderr.write('interrupted: cancelling builds…\n');
    void cancelUnfinished(client, id);
  };
  process.once('SIGINT', onSignal);
  // Any build event may concern this request; the request itself says what it is.
  void (async () => {
    try {
      const r = await fetch(client.url('/events'), { headers: client.headers, signal: events.signal });
      if (!r.ok) return;
      for await (const e of sseEvents(r)) if (e.event === 'build' || e.event === 'reset') wake();
    } catch {
      // aborted, or the stream broke: polling goes on
    }
  })();
  try {
    for (;;) {
      const request = await client.json<{ settled: boolean; builds: BuildResult[] }>(`/requests/${id}`);
      for (const b of request.builds) {
        if (seen.has(b.attr) || !TERMINAL_STATES.has(b.state)) continue;
        seen.add(b.attr);
        process.stderr.write(`[${seen.size}/${total}] ${b.attr}: ${b.state}\n`);
      }
      if (request.settled) return request.builds;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, POLL_MS);
        wake = () => {
          clearTimeout(timer);
          // Several events in a row are one look at the request.
          setTimeout(resolve, 200);
        };
      });
    }
  } finally {
    process.off('SIGINT', onSignal);
    events.abort();
  }
}

async function cancelUnfinished(client: CoordinatorClient, id: number): Promise<void> {
  const request = await client.json<{ builds: BuildResult[] }>(`/requests/${id}`);
  for (const b of request.builds.filter((r) => !TERMINAL_STATES.has(r.state))) {
    await client.json(`/derivations/${drvHash(b.drvPath)}/cancel`, { method: 'POST' }).catch(() => undefined);
  }
}
