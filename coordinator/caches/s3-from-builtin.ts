import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { turn } from '../../common/turn.js';
import { CacheError } from '../../common/errors.js';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, argBatches, runNixChecked } from '../../common/nix/cli.js';
import { type NarInfo, parseNarInfo } from '../../common/nix/narinfo.js';
import { storePathHash } from '../../common/nix/store-path.js';
import { type BinaryCache, NARINFO_READS_PER_TURN } from '../cache/binary-cache.js';
import type { S3BinaryCache } from './s3-cache.js';
import { leaseClosure } from './s3-push-routes.js';

/**
 * Pushes `outputs` and their closures from the coordinator's built-in cache to an S3 cache: the push of outputs no
 * agent holds any more (built before a run asked for the push). Nix recompresses the missing NARs into a private
 * directory (`nix copy` between the two file caches); each is then uploaded through a presigned URL, exactly as an
 * agent's would be, and its narinfo written from the built-in cache's own record, references first. Returns the
 * number of paths uploaded.
 */
export async function pushFromBuiltIn(
  bucket: S3BinaryCache,
  builtIn: Pick<BinaryCache, 'dir' | 'narInfo'>,
  outputs: readonly string[],
  spoolDir: string,
): Promise<number> {
  const closure = await leaseClosure(builtIn, outputs);
  const missing = await bucket.missing([...closure]);
  if (missing.length === 0) return 0;
  await bucket.ensureCacheInfo();
  await mkdir(spoolDir, { recursive: true });
  const dir = await mkdtemp(join(spoolDir, 's3-'));
  try {
    const to = `file://${dir}?compression=${bucket.compression}`;
    const from = ['--from', `file://${builtIn.dir}`, '--no-check-sigs'];
    for (const batch of argBatches(missing)) {
      await runNixChecked('nix', [...NIX_EXPERIMENTAL, 'copy', ...from, '--to', to, ...NO_SUBSTITUTERS, ...batch]);
    }
    const trusted = new Map<string, NarInfo>();
    for (const [i, path] of missing.entries()) {
      // The built-in cache reads narinfos synchronously: a long list turns the event loop now and then.
      if (i % NARINFO_READS_PER_TURN === NARINFO_READS_PER_TURN - 1) await turn();
      const info = await builtIn.narInfo(path);
      if (!info) throw new CacheError(`${path} left the built-in cache while it was pushed`);
      trusted.set(path, info);
    }
    for (const path of referencesFirst(missing, trusted)) {
      const local = parseNarInfo(await readFile(join(dir, `${storePathHash(path)}.narinfo`), 'utf8'));
      if (local.fileHash === undefined || local.fileSize === undefined) {
        throw new CacheError(`nix copy wrote no FileHash or FileSize for ${path}`);
      }
      const narUrl = bucket.narUrl(local.fileHash);
      const put = await bucket.presignNarPut(narUrl, local.fileSize);
      const response = await fetch(put.url, {
        method: 'PUT',
        headers: put.headers,
        body: Readable.toWeb(createReadStream(join(dir, local.url))) as ReadableStream,
        duplex: 'half',
      } as RequestInit);
      if (!response.ok) {
        throw new CacheError(`uploading ${narUrl} of ${path}: HTTP ${response.status} ${await response.text()}`);
      }
      await bucket.putNarinfo({
        ...trusted.get(path)!,
        url: narUrl,
        compression: local.compression,
        fileHash: local.fileHash,
        fileSize: local.fileSize,
      });
    }
    return missing.length;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** `paths` ordered so that each comes after those of its references that are among them. */
function referencesFirst(paths: readonly string[], infos: ReadonlyMap<string, NarInfo>): string[] {
  const order: string[] = [];
  const done = new Set<string>();
  const visit = (path: string): void => {
    if (done.has(path)) return;
    done.add(path);
    for (const r of infos.get(path)?.references ?? []) if (r !== path && infos.has(r)) visit(r);
    order.push(path);
  };
  for (const p of paths) visit(p);
  return order;
}
