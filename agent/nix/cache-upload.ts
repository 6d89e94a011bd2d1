import { access, mkdir, mkdtemp, rename, rm, writeFile } from 'node:fs/promises';
import { createReadStream, createWriteStream } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { LRUCache } from 'lru-cache';
import { Backoff, sleep } from '../../common/backoff.js';
import { CacheError } from '../../common/errors.js';
import type { NixDaemonConnection, PathInfo } from '../../common/nix/daemon-client.js';
import { readAll } from '../../common/read-all.js';
import { serializeNarInfo, uncompressedNarInfo } from '../../common/nix/narinfo.js';
import { storePathHash } from '../../common/nix/store-path.js';

/** The header naming the lease an upload belongs to (the coordinator's cache checks it). */
const LEASE_HEADER = 'x-ekaci-lease';
/** On a narinfo upload: the body is this many bytes of narinfo, then the NAR (protocol 1.6). */
const NARINFO_BYTES_HEADER = 'x-ekaci-narinfo-bytes';
const ONE_REQUEST_TYPE = 'application/x-ekaci-narinfo-nar';

/**
 * NARs up to this size are held in memory while they are uploaded, larger ones in a spool file. Nearly every output
 * is far smaller; a spool file cost a build a directory made and removed (≈10 ms here, bench/dispatch), and memory
 * stays bounded by the build slots times this.
 */
const IN_MEMORY_NAR_BYTES = 4 * 1024 * 1024;

// How often that wait looks whether the build was cancelled meanwhile.
const STOP_CHECK_MS = 100;

// Path infos are immutable for a store path, and an agent meets the same inputs build after build: remembering
// them makes closure sizes and uploads cost one query per new path. 200k entries is some tens of MiB.
const PATH_INFO_MEMORY = 200_000;

export interface UploadOptions {
  /** Whether the build was cancelled: an upload waiting for the coordinator gives up then. */
  stopped?: () => boolean;
  /** Send each path's narinfo and NAR in one request (a coordinator of protocol 1.6 or later). */
  oneRequest?: boolean;
}

interface UploadJob {
  target: string;
  outputs: ReadonlySet<string>;
  leaseId: string;
  stopped: () => boolean;
  oneRequest: boolean;
}

/**
 * Uploads a lease's outputs from the agent's store to the coordinator's binary cache — streamed out of the Nix
 * daemon connection the build already holds, with no `nix copy` process — and measures closures. Uploads are
 * uncompressed NARs naming their lease (`X-Ekaci-Lease`); the coordinator checks them and signs the narinfo on
 * arrival. An agent may publish only the outputs of the leases it holds: every other path an output refers to
 * came from the cache (the build's inputs), and one that is missing there fails the upload with its name.
 */
export class CacheUploader {
  private readonly infos = new LRUCache<string, PathInfo>({ max: PATH_INFO_MEMORY });
  private readonly uploaded = new LRUCache<string, true>({ max: PATH_INFO_MEMORY });

  /**
   * `unreachableWaitMs`: how long an upload that finds the cache unreachable waits for it (a coordinator restarting)
   * before the build is given up as an infrastructure failure. Giving up at once cost builds their logs: the retry
   * ran on a store that had the output already, so Nix printed nothing.
   */
  constructor(
    private readonly token: string,
    private readonly unreachableWaitMs = 0,
    /** Where a NAR is spooled while it is uploaded (the agent's spool directory). */
    private readonly spoolDir = tmpdir(),
  ) {}

  async pathInfo(conn: NixDaemonConnection, path: string): Promise<PathInfo> {
    const known = this.infos.get(path);
    if (known) return known;
    const info = await conn.queryPathInfo(path);
    if (!info) throw new CacheError(`${path} is not valid in the agent's store`);
    this.infos.set(path, info);
    return info;
  }

  /** The NAR size of each path and the total NAR size of its closure. */
  async sizes(conn: NixDaemonConnection, path: string): Promise<{ narSize: number; closureSize: number }> {
    const seen = new Set<string>();
    const stack = [path];
    let closureSize = 0;
    while (stack.length > 0) {
      const p = stack.pop()!;
      if (seen.has(p)) continue;
      seen.add(p);
      const info = await this.pathInfo(conn, p);
      closureSize += info.narSize;
      for (const r of info.references) if (!seen.has(r)) stack.push(r);
    }
    return { narSize: (await this.pathInfo(conn, path)).narSize, closureSize };
  }

  /**
   * Uploads `paths` — the outputs of lease `leaseId`, which the cache cannot have unless another agent built the
   * same derivation, so they are sent without asking — after the outputs among them that they refer to.
   */
  async upload(
    conn: NixDaemonConnection,
    cacheUrl: string,
    paths: readonly string[],
    leaseId: string,
    options: UploadOptions = {},
  ): Promise<void> {
    const target = cacheUrl.replace(/\/+$/, '');
    const outputs = new Set(paths);
    const job: UploadJob = {
      target,
      outputs,
      leaseId,
      stopped: options.stopped ?? (() => false),
      oneRequest: options.oneRequest ?? false,
    };
    for (const path of paths) await this.uploadOutput(conn, job, path, new Set());
  }

  private async uploadOutput(
    conn: NixDaemonConnection,
    job: UploadJob,
    path: string,
    visiting: Set<string>,
  ): Promise<void> {
    const { target, outputs, stopped } = job;
    const key = `${target} ${path}`;
    if (this.uploaded.has(key) || visiting.has(path)) return;
    visiting.add(path);
    const info = await this.pathInfo(conn, path);
    for (const r of info.references) {
      if (r === path || this.uploaded.has(`${target} ${r}`)) continue;
      // Outputs of this lease go first (one output may refer to another); anything else must be there already.
      if (outputs.has(r)) await this.uploadOutput(conn, job, r, visiting);
      else if (await this.whenReachable(target, stopped, () => this.cacheHas(target, r)))
        this.uploaded.set(`${target} ${r}`, true);
      else
        throw new CacheError(
          `${path} refers to ${r}, which is not in ${target} (an input should have come from there)`,
        );
    }
    await this.put(conn, job, path, info);
    this.uploaded.set(key, true);
  }

  /**
   * Runs a request; when it fails without an answer (connection refused or reset: the coordinator restarting), runs
   * it again with backoff for up to `unreachableWaitMs`. Gives up at once when `giveUp()` says so (the build was
   * cancelled, or the request cannot be repeated).
   */
  private async whenReachable<T>(target: string, giveUp: () => boolean, request: () => Promise<T>): Promise<T> {
    const backoff = new Backoff(250, 5_000);
    const deadline = Date.now() + this.unreachableWaitMs;
    for (;;) {
      try {
        return await request();
      } catch (err) {
        const why = err instanceof Error ? err.message : String(err);
        if (giveUp()) throw new CacheError(`${target}: ${why}`);
        if (Date.now() >= deadline) {
          throw new CacheError(`${target} did not answer for ${Math.round(this.unreachableWaitMs / 1000)} s: ${why}`);
        }
        for (let wait = Math.min(backoff.next(), Math.max(0, deadline - Date.now())); wait > 0 && !giveUp();) {
          await sleep(Math.min(wait, STOP_CHECK_MS));
          wait -= STOP_CHECK_MS;
        }
      }
    }
  }

  private async cacheHas(target: string, path: string): Promise<boolean> {
    if (target.startsWith('file://')) {
      return access(join(fileURLToPath(target), `${storePathHash(path)}.narinfo`)).then(
        () => true,
        () => false,
      );
    }
    const r = await fetch(`${target}/${storePathHash(path)}.narinfo`, { method: 'HEAD', headers: this.auth() });
    return r.ok;
  }

  private async put(conn: NixDaemonConnection, job: UploadJob, path: string, info: PathInfo): Promise<void> {
    const { target, leaseId, stopped } = job;
    const described = uncompressedNarInfo(path, info);
    const narFile = described.url;
    const narinfo = Buffer.from(serializeNarInfo(described));
    const narinfoUrl = `${target}/${storePathHash(path)}.narinfo`;
    if (target.startsWith('file://')) {
      const dir = fileURLToPath(target);
      // Not `recursive`: Node 20's recursive mkdir loops forever under /proc. One level of parent is enough.
      for (const d of [dir, join(dir, 'nar')]) await mkdir(d).catch(ignoreExisting);
      await pipeline(Readable.from(conn.narFromPath(path)), createWriteStream(join(dir, narFile)));
      const tmp = join(dir, `.${storePathHash(path)}.narinfo.tmp`);
      await writeFile(tmp, narinfo);
      await rename(tmp, join(dir, `${storePathHash(path)}.narinfo`));
      return;
    }
    // The NAR is held whole before it is sent — in memory when small, else spooled to disk — so that a request that
    // fails (the coordinator restarting, killed mid-upload) can be sent again, which a NAR streamed out of the
    // daemon connection could not be.
    const nar = await this.holdNar(conn, path, info.narSize);
    try {
      const send = (url: string, headers: Record<string, string>, parts: readonly NarPart[]): Promise<Response> =>
        this.whenReachable(target, stopped, () =>
          fetch(url, {
            method: 'PUT',
            headers: {
              ...this.auth(leaseId),
              ...headers,
              'content-length': String(parts.reduce((n, p) => n + p.bytes, 0)),
            },
            body: bodyOf(parts),
            duplex: 'half',
          } as RequestInit),
        );
      if (job.oneRequest) {
        const r = await send(
          narinfoUrl,
          { 'content-type': ONE_REQUEST_TYPE, [NARINFO_BYTES_HEADER]: String(narinfo.length) },
          [{ bytes: narinfo.length, data: narinfo }, nar],
        );
        if (!r.ok) throw new CacheError(`uploading ${path} to ${target}: HTTP ${r.status} ${await r.text()}`);
        return;
      }
      const r = await send(`${target}/${narFile}`, { 'content-type': 'application/x-nix-nar' }, [nar]);
      if (!r.ok) throw new CacheError(`uploading the NAR of ${path} to ${target}: HTTP ${r.status} ${await r.text()}`);
    } finally {
      if (nar.file !== undefined) await rm(dirname(nar.file), { recursive: true, force: true });
    }
    const meta = await this.whenReachable(target, stopped, () =>
      fetch(narinfoUrl, {
        method: 'PUT',
        headers: { ...this.auth(leaseId), 'content-type': 'text/x-nix-narinfo' },
        body: narinfo,
      }),
    );
    if (!meta.ok) {
      throw new CacheError(`uploading the narinfo of ${path} to ${target}: HTTP ${meta.status} ${await meta.text()}`);
    }
  }

  /** A path's NAR out of the daemon: in memory up to IN_MEMORY_NAR_BYTES, else in a spool file. */
  private async holdNar(conn: NixDaemonConnection, path: string, narSize: number): Promise<NarPart> {
    if (narSize <= IN_MEMORY_NAR_BYTES) {
      const data = await readAll(conn.narFromPath(path));
      return { bytes: data.length, data };
    }
    const dir = await mkdtemp(join(this.spoolDir, 'upload-'));
    const file = join(dir, 'nar');
    try {
      await pipeline(Readable.from(conn.narFromPath(path)), createWriteStream(file));
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
    return { bytes: narSize, file };
  }

  private auth(leaseId?: string): Record<string, string> {
    const headers: Record<string, string> = {
      authorization: `Basic ${Buffer.from(`ekaci:${this.token}`).toString('base64')}`,
    };
    if (leaseId !== undefined) headers[LEASE_HEADER] = leaseId;
    return headers;
  }
}

/** Part of a request body: bytes in memory, or a spooled file of `bytes` bytes. */
type NarPart = { bytes: number; data: Buffer; file?: undefined } | { bytes: number; file: string; data?: undefined };

/** A request body made of parts, read afresh each time it is sent (a retry sends it again whole). */
function bodyOf(parts: readonly NarPart[]): Buffer | ReadableStream {
  const inMemory = parts.flatMap((p) => (p.data === undefined ? [] : [p.data]));
  if (inMemory.length === parts.length) return Buffer.concat(inMemory);
  return Readable.toWeb(
    Readable.from(
      (async function* () {
        for (const p of parts) {
          if (p.data !== undefined) yield p.data;
          else yield* createReadStream(p.file) as AsyncIterable<Buffer>;
        }
      })(),
    ),
  ) as ReadableStream;
}

function ignoreExisting(err: NodeJS.ErrnoException): void {
  if (err.code !== 'EEXIST') throw err;
}
