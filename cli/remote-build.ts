import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, argBatches, runNixChecked } from '../common/nix/cli.js';
import { sseEvents } from '../common/sse.js';
import type { BuildResult } from '../coordinator/scheduler/build-manager.js';
import { TERMINAL_STATES } from '../coordinator/scheduler/build-state.js';
import { type ClientOptions, CoordinatorClient, asCommand, drvHash, errorOf } from './coordinator-client.js';

export interface RemoteBuild extends ClientOptions {
  private?: boolean;
}

// Without events (a proxy that buffers them), the request is looked at this often anyway.
const POLL_MS = 5_000;

/**
 * `ekaci build FILE -A ATTR --coordinator URL`: what was instantiated here is built there. The `.drv` closure goes to
 * the coordinator's binary cache with `nix copy --derivation` (the API token as the netrc password; only
 * content-addressed paths are accepted, so nothing the client sends can pose as a build output), the roots are
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

/** `nix copy --derivation --to URL/cache`, authenticated by a netrc file only this process can read. */
async function upload(client: CoordinatorClient, drvs: readonly string[]): Promise<void> {
  // Asked first, so that a refused token is the coordinator's message, not Nix's "does not appear to be a cache".
  const probe = await fetch(`${client.base}/cache/nix-cache-info`, { headers: client.headers });
  if (!probe.ok) throw await errorOf(probe);
  const token = client.headers.authorization?.slice('Bearer '.length);
  const dir = await mkdtemp(join(tmpdir(), 'ekaci-upload-'));
  try {
    const netrc = join(dir, 'netrc');
    const host = new URL(client.base).hostname;
    await writeFile(netrc, token ? `machine ${host} login ekaci password ${token}\n` : '', { mode: 0o600 });
    const args = [
      ...NIX_EXPERIMENTAL,
      ...['copy', '--derivation', '--to', `${client.base}/cache`],
      ...['--option', 'netrc-file', netrc, ...NO_SUBSTITUTERS],
      // What the coordinator's cache holds is asked each time, not remembered from an earlier run.
      ...['--option', 'narinfo-cache-negative-ttl', '0', '--option', 'narinfo-cache-positive-ttl', '0'],
    ];
    for (const batch of argBatches([...drvs])) await runNixChecked('nix', [...args, ...batch]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
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
