import { closeSync, fstatSync, mkdirSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';

/**
 * Build logs, one file per derivation and attempt (`logs/<drv name>/<attempt>.log`), so a retry never
 * overwrites the log of the attempt before it. Chunks arrive addressed by byte offset: bytes the store already
 * has are skipped, so a chunk sent twice (after a reconnect) is harmless. The file's length is the truth about
 * what is stored — it survives a coordinator crash, and the agent resumes from it.
 *
 * Files of running attempts stay open; `close()` ends that, and only `append()` opens a file again.
 */
export class LogStore {
  private readonly open = new Map<string, { fd: number; size: number }>();

  constructor(private readonly dir: string) {}

  pathFor(drvPath: string, attempt: number): string {
    return join(this.dir, basename(drvPath), `${attempt}.log`);
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
    }
    return file.size;
  }

  /** Bytes stored for a log, open or not; never opens a file. */
  storedBytes(logPath: string): number {
    const file = this.open.get(logPath);
    if (file) return file.size;
    try {
      return statSync(logPath).size;
    } catch {
      return 0;
    }
  }

  /** How many log files are open (running attempts): a gauge, and what a leak would show in. */
  get openCount(): number {
    return this.open.size;
  }

  read(logPath: string): Buffer {
    try {
      return readFileSync(logPath);
    } catch {
      return Buffer.alloc(0);
    }
  }

  /** Closes the file of a finished attempt; it stays readable. */
  close(logPath: string): void {
    const file = this.open.get(logPath);
    if (!file) return;
    closeSync(file.fd);
    this.open.delete(logPath);
  }

  closeAll(): void {
    for (const path of [...this.open.keys()]) this.close(path);
  }

  private handle(logPath: string): { fd: number; size: number } {
    let file = this.open.get(logPath);
    if (!file) {
      mkdirSync(join(logPath, '..'), { recursive: true });
      const fd = openSync(logPath, 'a+');
      file = { fd, size: fstatSync(fd).size };
      this.open.set(logPath, file);
    }
    return file;
  }
}
