import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  createReadStream,
  lstatSync,
  openSync,
  readFileSync,
  readSync,
  readdirSync,
  readlinkSync,
  statSync,
} from 'node:fs';
import { join } from 'node:path';
import { Readable } from 'node:stream';
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

/**
 * An uncompressed NAR up to this size is read in one synchronous call: a file stream takes four turns of the event
 * loop (open, read, end, close), which under load kept fixed-output uploads waiting for seconds (bench/fleet).
 */
const SMALL_NAR_BYTES = 256 * 1024;

/** The uncompressed NAR inside `file`, as a stream. */
function narStream(file: string, compression: string): { stream: Readable; done: Promise<void> } {
  if (!canVerifyCompression(compression)) throw new CacheError(`compression "${compression}" is not supported`);
  const command = DECOMPRESSORS[compression];
  if (command === undefined) {
    const small = statSync(file).size <= SMALL_NAR_BYTES;
    return { stream: small ? Readable.from([readFileSync(file)]) : createReadStream(file), done: Promise.resolve() };
  }
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

// Files are read in pieces of this size: a large one is never whole in memory.
const NAR_READ_BYTES = 1024 * 1024;

/**
 * The NAR serialisation of a file, symlink or directory tree, as Nix's `dumpPath` makes it (directory entries in
 * byte order, `executable` from the owner's execute bit), in pieces as it is read: the sources an evaluation adds
 * to the store (a builder script, a patch, a project's own tree).
 */
export function* narChunks(path: string): Generator<Buffer> {
  const str = narString;
  function* node(p: string): Generator<Buffer> {
    const st = lstatSync(p);
    yield* [...str('('), ...str('type')];
    if (st.isSymbolicLink()) {
      yield* [...str('symlink'), ...str('target'), ...str(readlinkSync(p, { encoding: 'buffer' }))];
    } else if (st.isFile()) {
      yield* str('regular');
      if (st.mode & 0o100) yield* [...str('executable'), ...str('')];
      yield* str('contents');
      yield u64(st.size);
      const fd = openSync(p, 'r');
      try {
        let done = 0;
        while (done < st.size) {
          const piece = Buffer.alloc(Math.min(NAR_READ_BYTES, st.size - done));
          const n = readSync(fd, piece, 0, piece.length, done);
          if (n === 0) throw new CacheError(`${p} shrank while it was archived`);
          done += n;
          yield piece.subarray(0, n);
        }
      } finally {
        closeSync(fd);
      }
      yield Buffer.alloc(pad(st.size));
    } else if (st.isDirectory()) {
      yield* str('directory');
      const names = readdirSync(p, { encoding: 'buffer' }).sort((a, b) => Buffer.compare(a, b));
      for (const name of names) {
        yield* [...str('entry'), ...str('('), ...str('name'), ...str(name), ...str('node')];
        yield* node(join(p, name.toString('utf8')));
        yield* str(')');
      }
    } else {
      throw new CacheError(`${p}: not a file, symlink or directory, so it cannot be archived`);
    }
    yield* str(')');
  }
  yield* str('nix-archive-1');
  yield* node(path);
}

/** The NAR of a regular, non-executable file with this content: how a `.drv` is archived. */
export function regularFileNar(content: Buffer): Buffer {
  return Buffer.concat([
    ...['nix-archive-1', '(', 'type', 'regular', 'contents'].flatMap(narString),
    ...narString(content),
    ...narString(')'),
  ]);
}

/** A string of the NAR format: its length, its bytes, zeros to a multiple of eight. */
function narString(value: string | Buffer): Buffer[] {
  const data = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  return [u64(data.length), data, Buffer.alloc(pad(data.length))];
}

function u64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(n));
  return b;
}

const pad = (n: number): number => (8 - (n % 8)) % 8;
