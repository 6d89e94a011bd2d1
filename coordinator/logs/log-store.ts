import { closeSync, fstatSync, mkdirSync, openSync, readFileSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';

/**
 * Build logs, one file per derivation and attempt (`logs/<drv name>/<attempt>.log`), so a retry never
 * overwrites the log of the attempt before it. Chunks arrive addressed by byte offset: bytes the store already
 * has are skipped, so a chunk sent twice (after a reconnect) is harmless. The file's length is the truth about
 * what is stored — it survives a coordinator crash, and the agent resumes from it.
 */
export class LogStore {
  private readonly open = new Map<string, { fd: number; size: number }>();

  constructor(private readonly dir: string) {}

  pathFor(drvPath: string, attempt: number): string {
    return join(this.dir, basename(drvPath), `${attempt}.log`);
  }

  /** Stores what is new in `data` (which starts at `offset`); returns the number of bytes stored in all. */
  append(logPath: string, offset: number, data: Uint8Array): number {
    const file = this.handle(logPath);
    if (offset > file.size) return file.size; // a gap: the agent resends from the acknowledged length
    const skip = file.size - offset;
    if (skip < data.length) {
      const fresh = data.subarray(skip);
      writeSync(file.fd, fresh, 0, fresh.length, file.size);
      file.size += fresh.length;
    }
    return file.size;
  }

  storedBytes(logPath: string): number {
    return this.handle(logPath).size;
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
