import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { closeSync, mkdirSync, openSync, read, rmSync, unlinkSync, write, writeFileSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { IllegalStateError } from '../../common/errors.js';

// Bytes a build may get ahead of the disk before its output is paused (the build stops reading the daemon, whose
// builder then blocks on its pipe): enough to absorb a burst of compiler output, small enough that a slow or stuck
// disk stalls the build instead of filling the agent's memory.
const WRITE_HIGH_WATER_BYTES = 1024 * 1024;

// A lease id is chosen by the coordinator; one that is not a plain file name is hashed so it cannot escape the
// spool directory or collide with a sibling's GC-root directory.
const SAFE_NAME = /^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$/;

/**
 * The agent's on-disk spool: one log file per lease under `logs/`, Nix GC roots of the leases under `gcroots/` (so a
 * build's outputs survive until they are uploaded and reported), a work directory per check lease under `work/`
 * and the `netrc` Nix uses to reach the cache.
 */
export class LogSpool {
  /** The GC-root links handed out per lease (`gcRoot`), removed with the lease (`removeGcRoots`). */
  private readonly roots = new Map<string, Set<string>>();

  constructor(
    readonly dir: string,
    /** Per lease log: see WRITE_HIGH_WATER_BYTES; tests shrink it. */
    private readonly writeHighWaterBytes = WRITE_HIGH_WATER_BYTES,
  ) {}

  get netrcPath(): string {
    return join(this.dir, 'netrc');
  }

  /**
   * Creates the directories and removes what an earlier agent process left: its leases died with it (message ids
   * and the session nonce start anew), so the coordinator has already given them up.
   */
  prepare(): void {
    for (const sub of ['logs', 'gcroots', 'uploads', 'work']) {
      rmSync(join(this.dir, sub), { recursive: true, force: true });
      mkdirSync(join(this.dir, sub), { recursive: true, mode: 0o700 });
    }
  }

  /** Where NARs wait while they are uploaded. */
  get uploadsDir(): string {
    return join(this.dir, 'uploads');
  }

  /** Creates (truncating) the spool file of a lease. */
  open(leaseId: string): LeaseLog {
    return new LeaseLog(join(this.dir, 'logs', `${fileName(leaseId)}.log`), this.writeHighWaterBytes);
  }

  /**
   * Where the GC-root symlink of one output of a lease goes: the daemon is told to treat it as an indirect root, so
   * the output outlives the daemon connection that built it until `removeGcRoots`. All links share `gcroots/`,
   * named `<lease>~<output>` (`~` is in no file name of `fileName`): a directory per lease cost every build a
   * directory made and removed (≈1 ms of the agent's time here, bench/dispatch).
   */
  gcRoot(leaseId: string, outputName: string): string {
    const link = join(this.dir, 'gcroots', `${fileName(leaseId)}~${fileName(outputName)}`);
    let links = this.roots.get(leaseId);
    if (links === undefined) this.roots.set(leaseId, (links = new Set()));
    links.add(link);
    return link;
  }

  /** Releases a lease's outputs to the garbage collector (they are in the cache by now, or not worth keeping). */
  removeGcRoots(leaseId: string): void {
    for (const link of this.roots.get(leaseId) ?? []) rmSync(link, { force: true });
    this.roots.delete(leaseId);
  }

  /**
   * A fresh, empty work directory for a lease, readable by the agent's user only (a check's checkout goes there).
   * One per lease, side by side: no lease's directory is inside another's.
   */
  workDir(leaseId: string): string {
    const dir = join(this.dir, 'work', fileName(leaseId));
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    return dir;
  }

  removeWorkDir(leaseId: string): Promise<void> {
    return rm(join(this.dir, 'work', fileName(leaseId)), { recursive: true, force: true });
  }

  /** Writes the credentials Nix sends to the coordinator's cache, readable by the agent's user only. */
  writeNetrc(host: string, token: string): void {
    rmSync(this.netrcPath, { force: true });
    writeFileSync(this.netrcPath, `machine ${host} login ekaci password ${token}\n`, { mode: 0o600, flag: 'wx' });
  }
}

function fileName(leaseId: string): string {
  if (SAFE_NAME.test(leaseId)) return leaseId;
  return `h-${createHash('sha256').update(leaseId).digest('hex').slice(0, 40)}`;
}

type LeaseLogState = 'open' | 'closing' | 'closed' | 'removed';

interface LeaseLogEvents {
  /** More bytes are on disk. */
  grow: [];
  /** The writer is done; `size` is final. */
  closed: [];
  /** Pending writes fell to half the high-water mark after `append` returned false. */
  drain: [];
}

/**
 * One lease's build output on disk. Bytes count (`size`) only once the write finished, so whatever reads up to
 * `size` reads what is really in the file.
 *
 * States: open → closing → closed → removed (or straight to removed). Appending is legal only while open.
 */
export class LeaseLog extends EventEmitter<LeaseLogEvents> {
  private readonly fd: number;
  private state: LeaseLogState = 'open';
  private durable = 0;
  /** Bytes appended whose write has not finished (nor been given up): what this log holds in memory. */
  private queued = 0;
  private peakQueued = 0;
  private writes: Promise<void> = Promise.resolve();
  private readonly reads = new Set<Promise<unknown>>();
  private blocked = false;
  /** Appended bytes that wait for the write in flight; one write takes them all. */
  private batch: Buffer[] = [];
  private batchQueued = false;
  /** The first write error (a full disk): the build is then reported as an infrastructure failure. */
  writeError: Error | null = null;

  constructor(
    readonly path: string,
    private readonly highWaterBytes = WRITE_HIGH_WATER_BYTES,
  ) {
    super();
    this.fd = openSync(path, 'w+', 0o600);
  }

  get size(): number {
    return this.durable;
  }

  /** Bytes waiting in memory for the disk. */
  get buffered(): number {
    return this.queued;
  }

  /** The most bytes that ever waited in memory at once: bounded by the high-water mark plus one append. */
  get peakBuffered(): number {
    return this.peakQueued;
  }

  get closed(): boolean {
    return this.state === 'closed';
  }

  /**
   * Queues bytes for the file; false means "pause the producer until `drain`" (see `writable`). Bytes appended
   * while a write is in flight go out together in the next one: a build printing short lines costs a write per
   * batch, not per line.
   */
  append(chunk: Buffer): boolean {
    if (this.state !== 'open') throw new IllegalStateError(`cannot append to a ${this.state} log ${this.path}`);
    this.queued += chunk.length;
    this.peakQueued = Math.max(this.peakQueued, this.queued);
    this.batch.push(chunk);
    if (!this.batchQueued) {
      this.batchQueued = true;
      this.writes = this.writes.then(() => this.writeBatch());
    }
    if (this.queued > this.highWaterBytes) this.blocked = true;
    return !this.blocked;
  }

  private async writeBatch(): Promise<void> {
    const chunks = this.batch;
    this.batch = [];
    this.batchQueued = false;
    const data = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
    // After a write error or removal the bytes are dropped, but they still leave memory and may end a pause.
    if (this.writeError === null && this.state !== 'removed') {
      try {
        await writeFully(this.fd, data, this.durable);
        this.durable += data.length;
        this.emit('grow');
      } catch (err) {
        this.writeError = err instanceof Error ? err : new Error(String(err));
      }
    }
    this.queued -= data.length;
    if (this.blocked && this.queued <= this.highWaterBytes / 2) {
      this.blocked = false;
      this.emit('drain');
    }
  }

  /** Resolves when appending may go on: at once, or at `drain` after an `append` returned false. */
  writable(): Promise<void> {
    if (!this.blocked) return Promise.resolve();
    return new Promise((resolve) => this.once('drain', resolve));
  }

  /** Waits for queued writes; afterwards `size` is the final length. Idempotent. */
  async close(): Promise<void> {
    if (this.state === 'open') this.state = 'closing';
    await this.writes;
    if (this.state === 'closing') {
      this.state = 'closed';
      this.emit('closed');
    }
  }

  /** Reads up to `length` bytes at `offset`; never beyond `size`. */
  read(offset: number, length: number): Promise<Buffer> {
    if (this.state === 'removed') return Promise.reject(new IllegalStateError(`log ${this.path} was removed`));
    const n = Math.max(0, Math.min(length, this.durable - offset));
    const p = readFully(this.fd, n, offset);
    this.reads.add(p);
    const forget = (): void => void this.reads.delete(p);
    p.then(forget, forget);
    return p;
  }

  /** Deletes the file once pending reads and writes are over (the descriptor must not be reused under them). */
  async remove(): Promise<void> {
    if (this.state === 'removed') return;
    this.state = 'removed';
    await this.writes;
    await Promise.allSettled([...this.reads]);
    closeSync(this.fd);
    try {
      unlinkSync(this.path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
    }
  }
}

async function writeFully(fd: number, chunk: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < chunk.length) {
    done += await new Promise<number>((resolve, reject) =>
      write(fd, chunk, done, chunk.length - done, position + done, (err, n) => (err ? reject(err) : resolve(n))),
    );
  }
}

async function readFully(fd: number, length: number, position: number): Promise<Buffer> {
  const buffer = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = await new Promise<number>((resolve, reject) =>
      read(fd, buffer, done, length - done, position + done, (err, bytes) => (err ? reject(err) : resolve(bytes))),
    );
    if (n === 0) break;
    done += n;
  }
  return buffer.subarray(0, done);
}
