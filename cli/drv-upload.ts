import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, argBatches, runNixChecked } from '../common/nix/cli.js';
import { type Derivation, parseDerivation } from '../common/nix/derivation.js';
import { narChunks } from '../common/nix/nar.js';
import { nixBase32, serializeNarInfo } from '../common/nix/narinfo.js';
import { storePathHash } from '../common/nix/store-path.js';
import { type CoordinatorClient, errorOf } from './coordinator-client.js';

// Requests in flight at once: enough to keep the coordinator's cores busy over one connection each, few enough
// that a coordinator serving agents meanwhile is not swamped by one client.
const CONCURRENCY = 16;

/** What an upload found and did: paths of the closure the cache held already, and those sent. */
export interface UploadSummary {
  /** `.drv` files and sources found in the cache, each standing for its whole closure (not looked at further). */
  present: number;
  derivations: number;
  sources: number;
}

/**
 * Uploads what the coordinator's cache lacks of the `.drv` closure of `roots`, for `ekaci build --coordinator`.
 *
 * The cache stores a narinfo only once every path it refers to is stored, so a path found there stands for its whole
 * closure: the walk starts at the roots and goes down only below paths the cache lacks. A pull request's closure
 * of tens of thousands of derivations, nearly all of them uploaded before, costs a question per derivation it
 * changed, not one per derivation.
 *
 * The `.drv` files are sent as `nix copy` sends them (an uncompressed NAR, then its narinfo with a `CA` the
 * coordinator checks), but many at once and each after the derivations it refers to: `nix copy` to an HTTP cache
 * sends one path at a time, with four requests each (30,000 paths: over 7 minutes). Sources (builder scripts,
 * patches, a project's tree; few) go by `nix copy`, which knows every kind of file tree.
 */
export async function uploadDerivationClosure(
  client: CoordinatorClient,
  roots: readonly string[],
): Promise<UploadSummary> {
  const cache = `${client.base}/cache`;
  const has = async (path: string): Promise<boolean> => {
    const r = await fetch(`${cache}/${storePathHash(path)}.narinfo`, { method: 'HEAD', headers: client.headers });
    if (r.status === 404) return false;
    if (!r.ok) throw await errorOf(r);
    return true;
  };

  // Down from the roots, one layer of questions at a time, below what the cache lacks only.
  const missing = new Map<string, { text: Buffer; drv: Derivation }>();
  const sources = new Set<string>();
  const asked = new Set<string>(roots);
  let present = 0;
  let layer = [...asked];
  while (layer.length > 0) {
    const found = await inParallel(layer, has);
    const next: string[] = [];
    layer.forEach((path, i) => {
      if (found[i]) {
        present++;
        return;
      }
      const text = readFileSync(path);
      const drv = parseDerivation(text.toString('utf8'), path);
      missing.set(path, { text, drv });
      for (const input of Object.keys(drv.inputDrvs)) {
        if (!asked.has(input)) {
          asked.add(input);
          next.push(input);
        }
      }
      for (const src of drv.inputSrcs) sources.add(src);
    });
    layer = next;
  }

  const sourcesFound = await inParallel([...sources], has);
  const sourcesMissing = [...sources].filter((_, i) => !sourcesFound[i]);
  present += sources.size - sourcesMissing.length;
  if (sourcesMissing.length > 0) await nixCopy(client, sourcesMissing);

  // Each derivation once the derivations it refers to are in the cache.
  const waitingOn = new Map<string, number>();
  const dependents = new Map<string, string[]>();
  const ready: string[] = [];
  for (const [path, { drv }] of missing) {
    const inputs = Object.keys(drv.inputDrvs).filter((input) => missing.has(input));
    waitingOn.set(path, inputs.length);
    for (const input of inputs) {
      const list = dependents.get(input);
      if (list) list.push(path);
      else dependents.set(input, [path]);
    }
    if (inputs.length === 0) ready.push(path);
  }
  let sent = 0;
  await drain(ready, async (path) => {
    const { text, drv } = missing.get(path)!;
    await putDerivation(client, cache, path, text, drv);
    sent++;
    for (const dependent of dependents.get(path) ?? []) {
      const left = waitingOn.get(dependent)! - 1;
      waitingOn.set(dependent, left);
      if (left === 0) ready.push(dependent);
    }
  });
  if (sent < missing.size) {
    throw new Error(`${missing.size - sent} derivations refer to each other in a cycle; no .drv closure can`);
  }
  return { present, derivations: missing.size, sources: sourcesMissing.length };
}

/** A `.drv` file as `nix copy` uploads it: its NAR, uncompressed, then a narinfo whose CA proves its path. */
async function putDerivation(
  client: CoordinatorClient,
  cache: string,
  path: string,
  text: Buffer,
  drv: Derivation,
): Promise<void> {
  const nar = Buffer.concat([...narChunks(path)]);
  const narHash = nixBase32(createHash('sha256').update(nar).digest());
  const url = `nar/${narHash}.nar`;
  const narinfo = serializeNarInfo({
    storePath: path,
    url,
    compression: 'none',
    fileHash: `sha256:${narHash}`,
    fileSize: nar.length,
    narHash: `sha256:${narHash}`,
    narSize: nar.length,
    references: [...new Set([...Object.keys(drv.inputDrvs), ...drv.inputSrcs])].sort(),
    sigs: [],
    ca: `text:sha256:${nixBase32(createHash('sha256').update(text).digest())}`,
  });
  for (const [name, body] of [
    [url, nar],
    [`${storePathHash(path)}.narinfo`, narinfo],
  ] as const) {
    const r = await fetch(`${cache}/${name}`, { method: 'PUT', headers: client.headers, body });
    if (!r.ok) throw new Error(`uploading ${path} to ${cache}: ${(await errorOf(r)).message}`);
  }
}

/** `nix copy --to URL/cache`, authenticated by a netrc file only this process can read. */
async function nixCopy(client: CoordinatorClient, paths: readonly string[]): Promise<void> {
  const token = client.headers.authorization?.slice('Bearer '.length);
  const dir = await mkdtemp(join(tmpdir(), 'ekaci-upload-'));
  try {
    const netrc = join(dir, 'netrc');
    const host = new URL(client.base).hostname;
    await writeFile(netrc, token ? `machine ${host} login ekaci password ${token}\n` : '', { mode: 0o600 });
    const args = [
      ...NIX_EXPERIMENTAL,
      ...['copy', '--to', `${client.base}/cache`],
      ...['--option', 'netrc-file', netrc, ...NO_SUBSTITUTERS],
      // What the coordinator's cache holds is asked each time, not remembered from an earlier run.
      ...['--option', 'narinfo-cache-negative-ttl', '0', '--option', 'narinfo-cache-positive-ttl', '0'],
    ];
    for (const batch of argBatches(paths)) await runNixChecked('nix', [...args, ...batch]);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** `f` of every item, CONCURRENCY at a time; the answers in the items' order. */
async function inParallel<T, R>(items: readonly T[], f: (item: T) => Promise<R>): Promise<R[]> {
  const results = new Array<R>(items.length);
  await drain(
    items.map((_, i) => i),
    async (i) => {
      results[i] = await f(items[i]!);
    },
  );
  return results;
}

/**
 * Runs `f` on every item of `queue`, CONCURRENCY at a time, including the items `f` itself adds to the queue while
 * it runs; the first failure rejects once the calls in flight are over.
 */
async function drain<T>(queue: T[], f: (item: T) => Promise<void>): Promise<void> {
  let running = 0;
  let head = 0;
  let failure: Error | undefined;
  await new Promise<void>((resolve, reject) => {
    const pump = (): void => {
      while (failure === undefined && running < CONCURRENCY && head < queue.length) {
        const item = queue[head++]!;
        running++;
        f(item).then(
          () => {
            running--;
            pump();
          },
          (err: unknown) => {
            running--;
            failure ??= err instanceof Error ? err : new Error(`upload failed: ${JSON.stringify(err)}`);
            pump();
          },
        );
      }
      if (running > 0) return;
      if (failure !== undefined) reject(failure);
      else resolve();
    };
    pump();
  });
}
