import { closeSync, fstatSync, mkdirSync, openSync, readFileSync, readSync, statSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';

/**
 * Build logs, one file per derivation and attempt (`logs/<first two characters>/<drv name>.<attempt>.log`), so a
 * retry never overwrites the log of the attempt before it. The directories are shared by many derivations: one
 * directory per derivation (the layout before) cost a `mkdir` per build, 0.6 ms of the event loop on a slow disk.
 * A log is found through its attempt's `log_path`, which keeps logs of the earlier layout readable.
 *
 * Chunks arrive addressed by byte offset: bytes the store already has are skipped, so a chunk sent twice (after a
 * reconnect) is harmless. The file's length is the truth about what is stored — it survives a coordinator crash,
 * and the agent resumes from it.
 *
 * Files of running attempts stay open; `close()` ends that, and only `append()` opens a file again.
 *
 * Followers (`watch`) hear of every append to a log and of its close (the attempt ended), for live logs.
 */
export type LogEvent = 'appended' | 'closed';

// How much of a log's end `tail` reads.
const TAIL_WINDOW_BYTES = 64 * 1024;

export class LogStore {
  private readonly open = new Map<string, { fd: number; size: number }>();
  private readonly watchers = new Map<string, Set<(event: LogEvent) => void>>();
  /** Directories this store made or found, so that a new log costs no `mkdir`. */
  private readonly dirs = new Set<string>();

  constructor(private readonly dir: string) {}

  pathFor(drvPath: string, attempt: number): string {
    const name = basename(drvPath);
    return join(this.dir, name.slice(0, 2), `${name}.${attempt}.log`);
  }

  /**
   * Stores what is new in `data` (which starts at `offset`), up to `limit` bytes in all; returns the number of bytes
   * stored in all. Bytes past the limit are dropped (the caller sees the total stop short of what it sent).
   */
  append(logPath: string, offset: number, data: Uint8Array, limit = Infinity): number {
    const file = this.handle(logPath);
    if (offset > file.size) return file.size; // a gap: the agent resends from the acknowledged length
    const skip = file.size - offset;
    const room = Math.max(0, limit - file.size);
    if (skip < data.length && room > 0) {
      const fresh = data.subarray(skip, skip + Math.min(data.length - skip, room));
      writeSync(file.fd, fresh, 0, fresh.length, file.size);
      file.size += fresh.length;
      this.tell(logPath, 'appended');
    }
    return file.size;
  }

  /** Whether the log's attempt is running (its file open for appends). */
  isOpen(logPath: string): boolean {
    return this.open.has(logPath);
  }

  /** Calls `listener` on each append to the log and when it is closed; returns the function that stops that. */
  watch(logPath: string, listener: (event: LogEvent) => void): () => void {
    let set = this.watchers.get(logPath);
    if (!set) this.watchers.set(logPath, (set = new Set()));
    set.add(listener);
    return () => {
      set.delete(listener);
      if (set.size === 0 && this.watchers.get(logPath) === set) this.watchers.delete(logPath);
    };
  }

  /** How many followers are attached, in all (a gauge, and what a leak would show in). */
  get watcherCount(): number {
    let n = 0;
    for (const set of this.watchers.values()) n += set.size;
    return n;
  }

  /**
   * Up to `length` bytes of a log from `offset` (fewer at its end; none when there is no such log). A running
   * attempt's log is read through its open descriptor; only the bytes there are get a buffer.
   */
  readRange(logPath: string, offset: number, length: number): Buffer {
    const file = this.open.get(logPath);
    if (file) return readAt(file.fd, offset, Math.min(length, file.size - offset));
    let fd: number;
    try {
      fd = openSync(logPath, 'r');
    } catch {
      return Buffer.alloc(0);
    }
    try {
      return readAt(fd, offset, Math.min(length, fstatSync(fd).size - offset));
    } finally {
      closeSync(fd);
    }
  }

  private tell(logPath: string, event: LogEvent): void {
    const set = this.watchers.get(logPath);
    if (!set) return;
    for (const listener of [...set]) listener(event);
  }

  /** Bytes stored for a log, open or not; never opens a file. */
  storedBytes(logPath: string): number {
    const file = this.open.get(logPath);
    if (file) return file.size;
    try {
      // No log at all is common (a build that printed nothing): asked without an exception thrown and caught.
      return statSync(logPath, { throwIfNoEntry: false })?.size ?? 0;
    } catch {
      return 0;
    }
  }

  /** How many log files are open (running attempts): a gauge, and what a leak would show in. */
  get openCount(): number {
    return this.open.size;
  }

  /**
   * The last `lines` lines of a log (read from its last 64 KiB: a review shows the end of a failure, never the whole
   * log), trailing blank space dropped.
   */
  tail(logPath: string, lines: number): string {
    const size = this.storedBytes(logPath);
    const from = Math.max(0, size - TAIL_WINDOW_BYTES);
    let text = this.readRange(logPath, from, size - from).toString('utf8');
    // Started mid-log: the first line is a fragment (and maybe a cut UTF-8 sequence).
    if (from > 0) text = text.slice(text.indexOf('\n') + 1);
    return text.trimEnd().split('\n').slice(-lines).join('\n');
  }

  read(logPath: string): Buffer {
    try {
      return readFileSync(logPath);
    } catch {
      return Buffer.alloc(0);
    }
  }

  /** Closes the file of a finished attempt (it stays readable), and tells its followers, log or no log. */
  close(logPath: string): void {
    const file = this.open.get(logPath);
    if (file) {
      closeSync(file.fd);
      this.open.delete(logPath);
    }
    this.tell(logPath, 'closed');
  }

  closeAll(): void {
    for (const path of [...this.open.keys()]) this.close(path);
  }

  private handle(logPath: string): { fd: number; size: number } {
    let file = this.open.get(logPath);
    if (!file) {
      const fd = this.openForAppend(logPath);
      file = { fd, size: fstatSync(fd).size };
      this.open.set(logPath, file);
    }
    return file;
  }

  private openForAppend(logPath: string): number {
    const dir = dirname(logPath);
    if (!this.dirs.has(dir)) {
      mkdirSync(dir, { recursive: true });
      this.dirs.add(dir);
    }
    try {
      return openSync(logPath, 'a+');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      // Its directory went away (an operator cleaning up): it is made again.
      mkdirSync(dir, { recursive: true });
      return openSync(logPath, 'a+');
    }
  }
}

function readAt(fd: number, offset: number, length: number): Buffer {
  if (length <= 0) return Buffer.alloc(0);
  const buffer = Buffer.allocUnsafe(length);
  const n = readSync(fd, buffer, 0, length, offset);
  return buffer.subarray(0, n);
}
