/**
 * Pushes a lease's outputs, with their closure, to an S3 binary cache the agent holds no credentials for: the
 * coordinator says which paths the bucket lacks and presigns one PUT per NAR; the agent streams each NAR out of its
 * Nix daemon connection, compresses it into a spool file, uploads it, and asks the coordinator to write its narinfo
 * (coordinator/caches/s3-push-routes.ts). Narinfos are written references first, each after its NAR, so the bucket
 * never offers a path whose NAR or references are not there yet.
 */
import { NAR_FILE_SUFFIX, type NarCompression } from '../../common/nix/nar.js';
import { createWriteStream } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { Backoff, sleep } from '../../common/backoff.js';
import { CacheError } from '../../common/errors.js';
import type { NixDaemonConnection, PathInfo } from '../../common/nix/daemon-client.js';
import { storePathHash } from '../../common/nix/store-path.js';
import { compressFiles, spoolCompressed, type SpooledNar } from './nar-compress.js';
import { Signal, deferred, type Deferred } from './push-flow.js';
import { coordinatorErrorText, s3ErrorText, send, transient } from './push-requests.js';

export interface S3PushOptions {
  conn: NixDaemonConnection;
  /** `http(s)://host:port` of the coordinator's HTTP root. */
  coordinatorUrl: string;
  /** The agent's token. */
  token: string;
  leaseId: string;
  cacheId: string;
  /** The lease's output paths; their closure is pushed. */
  outputs: readonly string[];
  /** The cache's compression (the coordinator refuses any other). */
  compression: NarCompression;
  /** Where compressed NARs wait for their upload (the agent's spool directory). */
  spoolDir: string;
  /** True once the build was cancelled: the push stops between paths. */
  stopped: () => boolean;
}

export interface S3PushResult {
  /** Paths whose NAR and narinfo this push wrote. */
  pushed: number;
  /** Paths of the closure the bucket held already. */
  skipped: number;
  /** Compressed bytes uploaded. */
  bytes: number;
}

/**
 * Paths uploading at once. Each is five round trips in a row (ask, S3 checks, PUT, ask, S3 writes): with S3 ≈30 ms
 * away, eight at once keep a push of small paths near 50 paths/s rather than 7.
 */
const UPLOADS_AT_ONCE = 8;

/**
 * NARs up to this size are spooled as they are and compressed in batches (one compressor start for many); larger
 * ones stream through a compressor of their own, so that they are written to disk once.
 */
const SMALL_NAR_BYTES = 1024 * 1024;
/** A batch is compressed once it holds this many paths or bytes, or a large NAR comes next. */
const BATCH_PATHS = 128;
const BATCH_BYTES = 16 * 1024 * 1024;

/**
 * Spooled, not yet uploaded: at most this many paths and this many NAR bytes (more only for a single NAR larger than
 * that). Spooling runs ahead of the uploads by this much, and no further, so the spool stays bounded.
 */
const QUEUED_PATHS = 512;
const QUEUED_BYTES = 512 * 1024 * 1024;

/** Paths per `missing` question; the coordinator takes up to 2,000. */
const MISSING_BATCH = 1_000;

/** Attempts of one request that fails without an answer, or with 5xx/429 (S3 or the coordinator busy). */
const ATTEMPTS = 4;

export async function pushToS3(options: S3PushOptions): Promise<S3PushResult> {
  return new S3Push(options).run();
}

/** A compressed NAR in the spool, ready to upload. */
interface Ready extends SpooledNar {
  file: string;
}

interface Queued {
  path: string;
  ready: Promise<Ready>;
  narSize: number;
}

class S3Push {
  private readonly infos = new Map<string, PathInfo>();
  private bytes = 0;

  constructor(private readonly o: S3PushOptions) {}

  async run(): Promise<S3PushResult> {
    const closure = await this.closure();
    const missing = new Set<string>();
    for (let i = 0; i < closure.length; i += MISSING_BATCH) {
      const answer = (await this.ask('missing', { paths: closure.slice(i, i + MISSING_BATCH) })) as {
        missing?: unknown;
      };
      if (!Array.isArray(answer.missing)) throw this.error('the coordinator’s answer to missing has no list');
      for (const p of answer.missing) if (typeof p === 'string') missing.add(p);
    }
    const order = this.referencesFirst(missing);
    const dir = await mkdtemp(join(this.o.spoolDir, 's3-push-'));
    try {
      await this.pushAll(order, dir);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
    return { pushed: order.length, skipped: closure.length - order.length, bytes: this.bytes };
  }

  /** The closure of the outputs in the agent's store. */
  private async closure(): Promise<string[]> {
    const todo = [...this.o.outputs];
    while (todo.length > 0) {
      const path = todo.pop()!;
      if (this.infos.has(path)) continue;
      const info = await this.o.conn.queryPathInfo(path);
      if (!info) throw this.error(`${path} is not valid in the agent's store`);
      this.infos.set(path, info);
      for (const r of info.references) if (!this.infos.has(r)) todo.push(r);
    }
    return [...this.infos.keys()];
  }

  /** `paths` ordered so that every path comes after the paths it refers to. */
  private referencesFirst(paths: ReadonlySet<string>): string[] {
    const order: string[] = [];
    const placed = new Set<string>();
    for (const root of paths) {
      // Iterative depth-first post-order: a chain of thousands of paths must not exhaust the stack.
      const stack: Array<{ path: string; refs: string[] }> = [];
      const enter = (p: string): void => {
        placed.add(p);
        stack.push({ path: p, refs: this.infos.get(p)!.references.filter((r) => r !== p && paths.has(r)) });
      };
      if (!placed.has(root)) enter(root);
      while (stack.length > 0) {
        const top = stack[stack.length - 1]!;
        const next = top.refs.pop();
        if (next === undefined) {
          order.push(top.path);
          stack.pop();
        } else if (!placed.has(next)) enter(next);
      }
    }
    return order;
  }

  /**
   * Spools NARs in `order` (references first), one after another since the daemon connection serves one at a time,
   * into a queue that UPLOADS_AT_ONCE workers take from in the same order. A worker writes a path's narinfo once the
   * narinfos of its references are written; taking paths in order, the workers always have one whose references are
   * done. The first failure stops spooling and taking; uploads under way finish, and the failure is thrown.
   */
  private async pushAll(order: readonly string[], dir: string): Promise<void> {
    const published = new Map(order.map((p) => [p, deferred<void>()]));
    const queue: Queued[] = [];
    const changed = new Signal();
    let failure: { error: unknown } | undefined;
    const fail = (error: unknown): void => {
      failure ??= { error };
      changed.notify();
    };
    let producing = true;
    let queuedBytes = 0;
    let unfinished = 0;

    const worker = async (): Promise<void> => {
      for (;;) {
        if (failure !== undefined) return;
        const item = queue.shift();
        if (item === undefined) {
          if (!producing) return;
          await changed.next();
          continue;
        }
        try {
          const refs = this.infos
            .get(item.path)!
            .references.filter((r) => r !== item.path)
            .map((r) => published.get(r)?.promise)
            .filter((p) => p !== undefined);
          await this.upload(item.path, await item.ready, refs);
          published.get(item.path)!.resolve();
        } catch (error) {
          published.get(item.path)!.reject(error);
          fail(error);
        } finally {
          unfinished--;
          queuedBytes -= item.narSize;
          changed.notify();
        }
      }
    };
    const workers = Array.from({ length: UPLOADS_AT_ONCE }, worker);

    let batch: Array<{ raw: string; ready: Deferred<Ready> }> = [];
    let batchBytes = 0;
    const flush = (): void => {
      if (batch.length === 0) return;
      const items = batch;
      batch = [];
      batchBytes = 0;
      compressFiles(
        items.map((i) => i.raw),
        this.o.compression as 'xz' | 'zstd',
      ).then(
        (files) => items.forEach((item, i) => item.ready.resolve(files[i]!)),
        (error: unknown) => items.forEach((item) => item.ready.reject(error)),
      );
    };
    const enqueue = (path: string, ready: Promise<Ready>): void => {
      const narSize = this.infos.get(path)!.narSize;
      queue.push({ path, ready, narSize });
      queuedBytes += narSize;
      unfinished++;
      changed.notify();
    };

    let cancelled = false;
    try {
      for (const path of order) {
        const narSize = this.infos.get(path)!.narSize;
        if (unfinished > 0 && (unfinished >= QUEUED_PATHS || queuedBytes + narSize > QUEUED_BYTES)) {
          // Full: compress what is batched (the uploads may be waiting for it), then wait until a whole batch fits
          // again — resuming at the first free place would compress one path per compressor start.
          flush();
          while (
            failure === undefined &&
            !this.o.stopped() &&
            unfinished > 0 &&
            (unfinished > QUEUED_PATHS - BATCH_PATHS || queuedBytes + narSize > QUEUED_BYTES - BATCH_BYTES)
          ) {
            await changed.next();
          }
        }
        cancelled = this.o.stopped();
        if (failure !== undefined || cancelled) break;
        const base = join(dir, storePathHash(path));
        const what = `the NAR of ${path}`;
        if (this.o.compression !== 'none' && narSize <= SMALL_NAR_BYTES) {
          const raw = `${base}.nar`;
          await pipeline(Readable.from(this.o.conn.narFromPath(path)), createWriteStream(raw, { flags: 'wx' }));
          const ready = deferred<Ready>();
          batch.push({ raw, ready });
          batchBytes += narSize;
          enqueue(path, ready.promise);
          if (batch.length >= BATCH_PATHS || batchBytes >= BATCH_BYTES) flush();
        } else {
          flush();
          const file = `${base}.nar${NAR_FILE_SUFFIX[this.o.compression]}`;
          const spooled = await spoolCompressed(this.o.conn.narFromPath(path), this.o.compression, file, what);
          enqueue(path, Promise.resolve({ ...spooled, file }));
        }
      }
      flush();
    } catch (error) {
      flush();
      fail(error);
    } finally {
      producing = false;
      changed.notify();
    }
    await Promise.all(workers);
    // Compressions still running when a failure stopped everything end before the spool is removed.
    await Promise.allSettled(queue.map((q) => q.ready));
    const error = failure?.error;
    for (const d of published.values()) d.reject(error ?? this.error('push cancelled'));
    if (failure !== undefined) throw failure.error;
    if (cancelled) throw this.error('push cancelled');
  }

  /** Uploads a spooled NAR, then has the coordinator write its narinfo once `refs` (their narinfos) are done. */
  private async upload(path: string, nar: Ready, refs: Array<Promise<void>>): Promise<void> {
    const body = { storePath: path, compression: this.o.compression, fileHash: nar.fileHash, fileSize: nar.fileSize };
    try {
      const backoff = new Backoff(250, 5_000);
      for (let attempt = 1; ; attempt++) {
        // Asked afresh on every attempt: a URL outlives no retry by much, and another agent may have uploaded it.
        const presigned = (await this.ask('nar', body)) as { present?: boolean; url?: string; headers?: unknown };
        if (presigned.present === true) break;
        if (typeof presigned.url !== 'string' || typeof presigned.headers !== 'object' || presigned.headers === null) {
          throw this.error(`the coordinator’s answer to nar of ${path} has no url`);
        }
        let status: number | undefined;
        let why: string;
        try {
          const answer = await send(presigned.url, 'PUT', presigned.headers as Record<string, string>, {
            file: nar.file,
          });
          status = answer.status;
          why = `HTTP ${answer.status}${s3ErrorText(answer.body)}`;
        } catch (err) {
          why = (err as Error).message;
        }
        if (status !== undefined && status >= 200 && status < 300) {
          this.bytes += nar.fileSize;
          break;
        }
        if ((status !== undefined && !transient(status)) || attempt >= ATTEMPTS || this.o.stopped()) {
          throw this.error(`uploading the NAR of ${path} (${nar.fileSize} bytes) failed: ${why}`);
        }
        await sleep(backoff.next());
      }
    } finally {
      await rm(nar.file, { force: true });
    }
    // The coordinator refuses a narinfo whose references are not in the bucket yet.
    await Promise.all(refs);
    await this.ask('narinfo', body);
  }

  /** POSTs `body` to one of the coordinator's push routes; retries failures without an answer and 5xx. */
  private async ask(step: 'missing' | 'nar' | 'narinfo', body: unknown): Promise<unknown> {
    const url =
      `${this.o.coordinatorUrl.replace(/\/+$/, '')}/agent/leases/${encodeURIComponent(this.o.leaseId)}` +
      `/caches/${encodeURIComponent(this.o.cacheId)}/${step}`;
    const what =
      typeof body === 'object' && body !== null && 'storePath' in body ? `${step} of ${String(body.storePath)}` : step;
    const json = JSON.stringify(body);
    const backoff = new Backoff(250, 5_000);
    for (let attempt = 1; ; attempt++) {
      let why: string;
      try {
        const r = await send(
          url,
          'POST',
          {
            authorization: `Bearer ${this.o.token}`,
            'content-type': 'application/json',
            'content-length': String(Buffer.byteLength(json)),
          },
          json,
        );
        if (r.status >= 200 && r.status < 300) return r.body === '' ? undefined : (JSON.parse(r.body) as unknown);
        why = `HTTP ${r.status}: ${coordinatorErrorText(r.body)}`;
        if (!transient(r.status)) throw this.error(`the coordinator refused ${what}: ${why}`);
      } catch (err) {
        if (err instanceof CacheError) throw err;
        why = (err as Error).message;
      }
      if (attempt >= ATTEMPTS || this.o.stopped()) throw this.error(`asking the coordinator for ${what}: ${why}`);
      await sleep(backoff.next());
    }
  }

  private error(message: string): CacheError {
    return new CacheError(`push of lease ${this.o.leaseId} to cache ${this.o.cacheId}: ${message}`);
  }
}
