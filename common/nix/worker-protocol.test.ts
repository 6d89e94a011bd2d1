import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tempDir } from '../../test/support/nix-project.js';
import { NixCommandError } from '../errors.js';
import { Stderr, WireReader, WireWriter, exitStatusFromMessages, readNar, readStderr } from './worker-protocol.js';

const noFlowControl = { pause: () => {}, resume: () => {} };

/** Feeds `bytes` to a new reader in pieces of the given sizes (cycled), on later ticks, as a pipe would. */
function feed(bytes: Buffer, sizes: number[]): WireReader {
  const reader = new WireReader(noFlowControl);
  let offset = 0;
  let i = 0;
  const next = (): void => {
    if (offset >= bytes.length) return;
    const size = sizes[i++ % sizes.length] ?? 1;
    reader.push(bytes.subarray(offset, offset + size));
    offset += size;
    setImmediate(next);
  };
  next();
  return reader;
}

async function collect(chunks: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const chunk of chunks) parts.push(chunk);
  return Buffer.concat(parts);
}

let dir: string;
let smallNar: Buffer;
let bigNar: Buffer;

function dump(path: string): Buffer {
  const r = spawnSync('nix-store', ['--option', 'substituters', '', '--dump', path], { maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`nix-store --dump failed: ${r.stderr.toString()}`);
  return r.stdout;
}

beforeAll(() => {
  dir = tempDir('ekaci-nar-');
  const small = join(dir, 'small');
  mkdirSync(join(small, 'a', 'b'), { recursive: true });
  mkdirSync(join(small, 'empty-dir'));
  writeFileSync(join(small, 'a', 'b', 'leaf'), 'leaf\n');
  writeFileSync(join(small, 'empty-file'), '');
  writeFileSync(join(small, 'seven'), '1234567'); // content that needs padding
  writeFileSync(join(small, 'run'), '#!/bin/sh\n');
  chmodSync(join(small, 'run'), 0o755);
  symlinkSync('a/b/leaf', join(small, 'link'));
  writeFileSync(join(small, 'ünïcødé name'), 'x');
  smallNar = dump(small);
  const big = join(dir, 'big');
  writeFileSync(big, randomBytes(3 * 1024 * 1024 + 5));
  bigNar = dump(big);
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('readNar', () => {
  it('re-emits exactly the bytes of a NAR fed one byte at a time, and stops at its end', async () => {
    const trailer = new WireWriter().u64(0x1234).bytes();
    const reader = feed(Buffer.concat([smallNar, trailer]), [1]);
    expect(await collect(readNar(reader))).toEqual(smallNar);
    expect(await reader.u64()).toBe(0x1234);
  });

  it('streams a large file in bounded chunks without losing a byte', async () => {
    const reader = feed(bigNar, [65536, 1, 4093, 300000]);
    const chunks: Buffer[] = [];
    for await (const chunk of readNar(reader)) chunks.push(chunk);
    // toEqual compares 3 MB byte by byte in seconds; Buffer.equals does it in microseconds.
    expect(Buffer.concat(chunks).equals(bigNar)).toBe(true);
    expect(Math.max(...chunks.map((c) => c.length))).toBeLessThanOrEqual(512 * 1024);
  });

  it('rejects bytes that are not a NAR', async () => {
    const reader = feed(new WireWriter().string('not-a-nar').bytes(), [64]);
    await expect(collect(readNar(reader))).rejects.toThrow(/NAR stream is malformed: expected 'nix-archive-1'/);
  });

  it('rejects with the reader failure when the stream ends inside a NAR', async () => {
    const reader = feed(smallNar.subarray(0, 100), [100]);
    setTimeout(() => reader.fail(new NixCommandError('daemon died', 1, '')), 10);
    await expect(collect(readNar(reader))).rejects.toThrow('daemon died');
  });
});

describe('WireWriter and WireReader', () => {
  it('write strings as length, bytes and zero padding to 8 bytes, which the reader reads back', async () => {
    const bytes = new WireWriter().string('abc').strings(['', '12345678', 'ü']).u64(true).bytes();
    expect(bytes.subarray(0, 16).toString('hex')).toBe('0300000000000000' + '6162630000000000');
    expect(bytes.length).toBe(16 + 8 + 8 + 16 + 16 + 8);
    const reader = feed(bytes, [3]);
    expect(await reader.string()).toBe('abc');
    expect(await reader.strings()).toEqual(['', '12345678', 'ü']);
    expect(await reader.u64()).toBe(1);
  });
});

describe('readStderr', () => {
  it('passes build log lines and messages on and returns a structured error without colours', async () => {
    const w = new WireWriter()
      .u64(Stderr.StartActivity)
      .u64(7)
      .u64(0)
      .u64(105)
      .string("building '/nix/store/x.drv'")
      .u64(0)
      .u64(0)
      .u64(Stderr.Result)
      .u64(7)
      .u64(101)
      .u64(1)
      .u64(1)
      .string('a log line')
      .u64(Stderr.Next)
      .string('\u001b[33mwarning:\u001b[0m something\n')
      .u64(Stderr.StopActivity)
      .u64(7)
      .u64(Stderr.Error)
      .string('Error')
      .u64(0)
      .string('Error')
      .string("builder for '\u001b[35;1m/nix/store/x.drv\u001b[0m' failed with exit code 3")
      .u64(0)
      .u64(1)
      .u64(0)
      .string('trace');
    const lines: string[] = [];
    const messages: string[] = [];
    const error = await readStderr(feed(w.bytes(), [5]), {
      onBuildLogLine: (l) => lines.push(l),
      onMessage: (m) => messages.push(m),
    });
    expect(lines).toEqual(['a log line']);
    expect(messages).toEqual(['warning: something']);
    expect(error).toEqual({
      level: 0,
      message: "builder for '/nix/store/x.drv' failed with exit code 3",
      traces: ['trace'],
    });
  });

  it('hands lines as bytes with invalid UTF-8 replaced, as the text of the line would have it', async () => {
    const frame = (line: Buffer): Buffer => {
      const head = new WireWriter().u64(Stderr.Result).u64(7).u64(101).u64(1).u64(1).u64(line.length).bytes();
      return Buffer.concat([head, line, Buffer.alloc((8 - (line.length % 8)) % 8)]);
    };
    const bytes = Buffer.concat([
      frame(Buffer.from([0x66, 0xff, 0x67, 0x20, 0xc3, 0xa9])),
      frame(Buffer.from('next')),
      new WireWriter().u64(Stderr.Last).bytes(),
    ]);
    const got: Buffer[] = [];
    expect(await readStderr(feed(bytes, [bytes.length]), { onBuildLog: (lines) => got.push(lines) })).toBeUndefined();
    expect(Buffer.concat(got).equals(Buffer.from('f\uFFFDg \u00e9\nnext\n'))).toBe(true);
    expect(got).toHaveLength(1);
  });

  it('reads no further while a handler holds it with a promise, and goes on once the promise settles', async () => {
    const result = (line: string) => new WireWriter().u64(Stderr.Result).u64(7).u64(101).u64(1).u64(1).string(line);
    const bytes = Buffer.concat([
      result('first').bytes(),
      result('second').bytes(),
      new WireWriter().u64(Stderr.Last).bytes(),
    ]);
    const seen: string[] = [];
    let release = (): void => {};
    const done = readStderr(feed(bytes, [bytes.length]), {
      onBuildLogLine: (line) => {
        seen.push(line);
        if (line !== 'first') return;
        // Released from outside once the test has seen where the reader stands: a slow log writer.
        return new Promise<void>(
          (resolve) =>
            (release = () => {
              seen.push('released');
              resolve();
            }),
        );
      },
    });
    await expect.poll(() => seen).toEqual(['first']);
    release();
    expect(await done).toBeUndefined();
    expect(seen).toEqual(['first', 'released', 'second']);
  });

  it('refuses a request for input, which no operation it is used for makes', async () => {
    await expect(readStderr(feed(new WireWriter().u64(Stderr.Read).u64(10).bytes(), [16]))).rejects.toThrow(
      /STDERR_READ/,
    );
  });
});

describe('exitStatusFromMessages', () => {
  it.each([
    ["builder for '/nix/store/x.drv' failed with exit code 3;\nlast 1 log lines:\n> bad", 100],
    ["builder for '/nix/store/x.drv' was killed by signal 9", 100],
    ["1 dependencies of derivation '/nix/store/y.drv' failed to build", 100],
    ["building '/nix/store/x.drv' timed out after 1 seconds of silence", 101],
    ["building '/nix/store/x.drv' timed out after 5 seconds", 101],
    ["hash mismatch in fixed-output derivation '/nix/store/z':\n  specified: sha256-A\n     got:    sha256-B", 102],
    ["path '/nix/store/00000000000000000000000000000000-missing.drv' is not valid", 1],
  ])('gives %j the status %i', (message, status) => {
    expect(exitStatusFromMessages([message])).toBe(status);
  });

  it('combines the failures of a keep-going build as Nix does', () => {
    const messages = [
      'build of /nix/store/a.drv, /nix/store/b.drv failed',
      "building '/nix/store/a.drv' timed out after 1 seconds of silence",
    ];
    expect(exitStatusFromMessages(messages)).toBe(101);
  });
});
