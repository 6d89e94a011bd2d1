/**
 * Compressing NARs on their way to a binary cache with the `xz` or `zstd` command (Node 20 has neither codec), never
 * holding one whole in memory: a large NAR is streamed through its own compressor into a spool file, hashed as it is
 * written; small ones are spooled as they are and compressed many to one command (compressFiles), since starting a
 * compressor costs more than compressing a few KiB (≈25 ms per `zstd` start on a busy 2-core builder, against
 * ≈1 ms for a 10 KiB NAR).
 */
import { NAR_FILE_SUFFIX, type NarCompression } from '../../common/nix/nar.js';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CacheError } from '../../common/errors.js';
import { nixBase32 } from '../../common/nix/narinfo.js';

/**
 * The commands, at their default levels — the levels Nix itself uses for these methods (libarchive's defaults:
 * xz 6, zstd 3) — so a bucket written by eka-ci costs what one written by `nix copy` does.
 */
const COMPRESSORS: Record<NarCompression, readonly string[] | undefined> = {
  xz: ['xz', '-c', '-q'],
  zstd: ['zstd', '-c', '-q'],
  none: undefined,
};

/** The file name suffix each command gives the files it compresses (`zstd a` writes `a.zst`). */

/** The commands compressing the files named on their command lines, each to FILE + suffix, deleting FILE. */
const FILE_COMPRESSORS: Record<'xz' | 'zstd', readonly string[]> = {
  xz: ['xz', '-q', '-f', '--'],
  zstd: ['zstd', '-q', '-f', '--rm', '--'],
};

export interface SpooledNar {
  /** `sha256:<nix base32>` of the file. */
  fileHash: string;
  fileSize: number;
}

/** Writes `nar`, compressed with `compression`, to the new file `file`; `what` names the NAR in errors. */
export async function spoolCompressed(
  nar: AsyncIterable<Buffer>,
  compression: NarCompression,
  file: string,
  what: string,
): Promise<SpooledNar> {
  const hash = createHash('sha256');
  let fileSize = 0;
  const measure = async function* (source: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
    for await (const chunk of source) {
      hash.update(chunk);
      fileSize += chunk.length;
      yield chunk;
    }
  };
  const command = COMPRESSORS[compression];
  if (command === undefined) {
    await pipeline(Readable.from(nar), measure, createWriteStream(file, { flags: 'wx' }));
  } else {
    const child = spawn(command[0]!, command.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr = (stderr + s).slice(-2000)));
    const exited = new Promise<void>((resolve, reject) => {
      child.on('error', (e) => reject(new CacheError(`cannot run ${command[0]} to compress ${what}: ${e.message}`)));
      child.on('close', (code, signal) =>
        code === 0
          ? resolve()
          : reject(new CacheError(`${command[0]} failed on ${what} (exit ${code ?? signal}): ${stderr.trim()}`)),
      );
    });
    const results = await Promise.allSettled([
      exited,
      pipeline(Readable.from(nar), child.stdin),
      pipeline(child.stdout, measure, createWriteStream(file, { flags: 'wx' })),
    ]);
    const failures = results.filter((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failures.length > 0) {
      child.kill('SIGKILL');
      // The compressor's own complaint explains a broken pipe better than the broken pipe does; a failure to read
      // the NAR (the daemon) is reported as it is.
      throw failures.find((f) => !isPipeError(f.reason))?.reason ?? failures[0]!.reason;
    }
  }
  return { fileHash: `sha256:${nixBase32(hash.digest())}`, fileSize };
}

/**
 * Compresses `files` (spooled NARs) with one command, each into FILE + NAR_FILE_SUFFIX (the original is deleted),
 * and returns each compressed file with its hash and size, in the order given.
 */
export async function compressFiles(
  files: readonly string[],
  compression: 'xz' | 'zstd',
): Promise<Array<SpooledNar & { file: string }>> {
  const command = FILE_COMPRESSORS[compression];
  await new Promise<void>((resolve, reject) => {
    const child = spawn(command[0]!, [...command.slice(1), ...files], { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr = (stderr + s).slice(-2000)));
    child.on('error', (e) => reject(new CacheError(`cannot run ${command[0]} to compress NARs: ${e.message}`)));
    child.on('close', (code, signal) =>
      code === 0
        ? resolve()
        : reject(
            new CacheError(`${command[0]} failed on ${files.length} NARs (exit ${code ?? signal}): ${stderr.trim()}`),
          ),
    );
  });
  const out: Array<SpooledNar & { file: string }> = [];
  for (const f of files) {
    const file = `${f}${NAR_FILE_SUFFIX[compression]}`;
    const hash = createHash('sha256');
    let fileSize = 0;
    for await (const chunk of createReadStream(file) as AsyncIterable<Buffer>) {
      hash.update(chunk);
      fileSize += chunk.length;
    }
    out.push({ file, fileHash: `sha256:${nixBase32(hash.digest())}`, fileSize });
  }
  return out;
}

function isPipeError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  return code === 'EPIPE' || code === 'ERR_STREAM_PREMATURE_CLOSE' || code === 'ERR_STREAM_DESTROYED';
}
