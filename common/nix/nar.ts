import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import type { Readable } from 'node:stream';
import { CacheError } from '../errors.js';
import { nixBase32 } from './narinfo.js';

/**
 * Checks of NAR files the coordinator did not make itself (uploads by agents): their hash and size, through the
 * decompressor their narinfo names, and the content hash a fixed-output derivation declares.
 */

/** The compressions eka-ci writes NARs with (a cache's `compression`), the default first. */
export const NAR_COMPRESSIONS = ['zstd', 'xz', 'none'] as const;
export type NarCompression = (typeof NAR_COMPRESSIONS)[number];
/** What a NAR file's name ends with after `.nar`, as Nix names them (`nar/<filehash>.nar.zst`). */
export const NAR_FILE_SUFFIX: Record<NarCompression, string> = { xz: '.xz', zstd: '.zst', none: '' };

/** Decompressors for the `Compression` values Nix writes, run as child processes (Node 20 has none for these). */
const DECOMPRESSORS: Record<string, string[] | undefined> = {
  none: undefined,
  xz: ['xz', '-dc'],
  zstd: ['zstd', '-dcq'],
  bzip2: ['bzip2', '-dc'],
  br: ['brotli', '-dc'],
};

export function canVerifyCompression(compression: string): boolean {
  return compression in DECOMPRESSORS;
}

/** The uncompressed NAR inside `file`, as a stream. */
function narStream(file: string, compression: string): { stream: Readable; done: Promise<void> } {
  if (!canVerifyCompression(compression)) throw new CacheError(`compression "${compression}" is not supported`);
  const command = DECOMPRESSORS[compression];
  if (command === undefined) return { stream: createReadStream(file), done: Promise.resolve() };
  const child = spawn(command[0]!, [...command.slice(1), file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr = (stderr + s).slice(-2000)));
  const done = new Promise<void>((resolve, reject) => {
    child.on('error', (e) => reject(new CacheError(`cannot run ${command[0]} to check the NAR: ${e.message}`)));
    child.on('close', (code) =>
      code === 0 ? resolve() : reject(new CacheError(`${command[0]} cannot decompress the NAR: ${stderr.trim()}`)),
    );
  });
  return { stream: child.stdout, done };
}

/** NAR hash (`sha256:<base32>`) and size of the NAR in `file`, decompressed as `compression` says. */
export async function narHashOfFile(file: string, compression: string): Promise<{ narHash: string; narSize: number }> {
  const { stream, done } = narStream(file, compression);
  const hash = createHash('sha256');
  let narSize = 0;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    hash.update(chunk);
    narSize += chunk.length;
  }
  await done;
  return { narHash: `sha256:${nixBase32(hash.digest())}`, narSize };
}

/**
 * The hash (lowercase hex, as `.drv` files write it) of the one regular file a NAR holds: what a flat fixed-output
 * derivation declares. Rejects a NAR that is not a single regular file.
 */
export async function flatFileHashOfNar(file: string, compression: string, algorithm: string): Promise<string> {
  const { stream, done } = narStream(file, compression);
  const chunks: Buffer[] = [];
  for await (const chunk of stream as AsyncIterable<Buffer>) chunks.push(chunk);
  await done;
  const contents = singleFileContents(Buffer.concat(chunks));
  return createHash(algorithm).update(contents).digest('hex');
}

/** Reads NAR strings: a little-endian u64 length, the bytes, zero padding to a multiple of 8. */
class NarReader {
  private at = 0;
  constructor(private readonly buf: Buffer) {}

  string(): Buffer {
    if (this.at + 8 > this.buf.length) throw new CacheError('NAR ends early');
    const len = Number(this.buf.readBigUInt64LE(this.at));
    const start = this.at + 8;
    if (start + len > this.buf.length) throw new CacheError('NAR ends early');
    this.at = start + len + ((8 - (len % 8)) % 8);
    return this.buf.subarray(start, start + len);
  }

  expect(word: string): void {
    const got = this.string().toString('latin1');
    if (got !== word) throw new CacheError(`not a single-file NAR (expected "${word}", found "${got.slice(0, 40)}")`);
  }

  get atEnd(): boolean {
    return this.at === this.buf.length;
  }
}

function singleFileContents(nar: Buffer): Buffer {
  const r = new NarReader(nar);
  r.expect('nix-archive-1');
  r.expect('(');
  r.expect('type');
  r.expect('regular');
  let tag = r.string().toString('latin1');
  if (tag === 'executable') {
    r.expect('');
    tag = r.string().toString('latin1');
  }
  if (tag !== 'contents') throw new CacheError('not a single-file NAR (no contents)');
  const contents = r.string();
  r.expect(')');
  if (!r.atEnd) throw new CacheError('not a single-file NAR (trailing data)');
  return contents;
}
