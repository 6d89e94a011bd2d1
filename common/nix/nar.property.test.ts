import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mutateBytes, mutations, resolvesOrFailsWith } from '../../test/support/fuzz.js';
import { CacheError } from '../errors.js';
import { flatFileHashOfNar, narHashOfFile } from './nar.js';
import { nixBase32 } from './narinfo.js';

const RUNS = 100;
let dir: string;
let file: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-nar-fuzz-'));
  file = join(dir, 'upload.nar');
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function str(s: string | Uint8Array): Buffer {
  const data = Buffer.from(s);
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(data.length));
  return Buffer.concat([length, data, Buffer.alloc((8 - (data.length % 8)) % 8)]);
}

/** What `nix-store --dump` writes for a single regular file: the NAR an agent uploads for a flat fetcher. */
function singleFileNar(contents: Uint8Array, executable: boolean): Buffer {
  const flag = executable ? [str('executable'), str('')] : [];
  return Buffer.concat([
    str('nix-archive-1'),
    str('('),
    str('type'),
    str('regular'),
    ...flag,
    str('contents'),
    str(contents),
    str(')'),
  ]);
}

const contents = fc.uint8Array({ maxLength: 100 });

describe('flatFileHashOfNar on any upload', () => {
  it('hashes the contents of every single-file NAR', async () => {
    await fc.assert(
      fc.asyncProperty(contents, fc.boolean(), fc.constantFrom('sha256', 'sha1', 'md5'), async (c, x, algorithm) => {
        writeFileSync(file, singleFileNar(c, x));
        expect(await flatFileHashOfNar(file, 'none', algorithm)).toBe(createHash(algorithm).update(c).digest('hex'));
      }),
      { numRuns: RUNS },
    );
  });

  it('hashes a NAR read at once (small) and one read as a stream (large) alike', async () => {
    for (const size of [10, 256 * 1024 - 200, 256 * 1024 + 1, 3 * 1024 * 1024]) {
      const c = Buffer.alloc(size, size % 251);
      writeFileSync(file, singleFileNar(c, false));
      expect(await flatFileHashOfNar(file, 'none', 'sha256')).toBe(createHash('sha256').update(c).digest('hex'));
      const nar = singleFileNar(c, false);
      expect(await narHashOfFile(file, 'none')).toEqual({
        narHash: `sha256:${nixBase32(createHash('sha256').update(nar).digest())}`,
        narSize: nar.length,
      });
    }
  });

  it('hashes a damaged NAR or refuses it with CacheError, never another exception', async () => {
    const length = fc.bigInt({ min: 0n, max: 2n ** 64n - 1n });
    const damaged = fc.oneof(
      fc
        .tuple(contents, fc.boolean(), mutations(['(', ')', 'contents', 'regular']))
        .map(([c, x, ms]) => mutateBytes(singleFileNar(c, x), ms)),
      // A contents length from 0 to 2^64 - 1, whatever follows.
      fc.tuple(contents, length).map(([c, n]) => {
        const nar = singleFileNar(c, false);
        nar.writeBigUInt64LE(n, nar.length - 16 - Math.ceil(c.length / 8) * 8 - 8);
        return nar;
      }),
    );
    await fc.assert(
      fc.asyncProperty(damaged, async (bytes) => {
        writeFileSync(file, bytes);
        await resolvesOrFailsWith(CacheError, () => flatFileHashOfNar(file, 'none', 'sha256'));
      }),
      { numRuns: RUNS },
    );
  });
});
