import { createPublicKey, verify } from 'node:crypto';
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FileWriter, SIGNATURE_SLOT } from './file-writer.js';
import { generateSigningKey, parsedKey } from './signing-key.js';

let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-file-writer-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

// A name Nix allows, with what String.replace would read as a pattern in a replacement text.
const key = generateSigningKey('writer-$&-1');

describe('FileWriter', () => {
  it('places whole files under their names, from views into larger buffers, and leaves no temporary file', async () => {
    const writer = new FileWriter();
    const pool = Buffer.from('0123456789abcdefghij');

    await Promise.all([
      writer.place(join(dir, '.upload-1'), join(dir, 'a'), pool.subarray(3, 7)),
      writer.place(join(dir, '.upload-2'), join(dir, 'b'), Buffer.from('second file')),
    ]);

    expect(await readFile(join(dir, 'a'), 'utf8')).toBe('3456');
    expect(await readFile(join(dir, 'b'), 'utf8')).toBe('second file');
    expect((await readdir(dir)).sort()).toEqual(['a', 'b']);
    // The caller's buffer is its own still (only a copy of the view moved to the thread).
    expect(pool.toString()).toBe('0123456789abcdefghij');
  });

  it('stores the first of many narinfos of one name, signed, and tells every other writer it was not stored', async () => {
    const writer = new FileWriter(parsedKey(key.secretKey));
    const final = join(dir, 'x.narinfo');

    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        writer.storeSignedOnce(join(dir, `.upload-${i}`), final, `Writer: ${i}\nSig: ${SIGNATURE_SLOT}\n`, `fp;${i}`),
      ),
    );

    const winners = results.flatMap((r, i) => (r.stored ? [i] : []));
    expect(winners).toHaveLength(1);
    const i = winners[0]!;
    expect(await readFile(final, 'utf8')).toBe(`Writer: ${i}\nSig: ${results[i]!.sig}\n`);
    const [name, signature] = results[i]!.sig.split(':');
    expect(name).toBe('writer-$&-1');
    const publicKey = createPublicKey({
      key: { kty: 'OKP', crv: 'Ed25519', x: Buffer.from(key.publicKey.split(':')[1]!, 'base64').toString('base64url') },
      format: 'jwk',
    });
    expect(verify(null, Buffer.from(`fp;${i}`), publicKey, Buffer.from(signature!, 'base64'))).toBe(true);
    expect(await readdir(dir)).toEqual(['x.narinfo']);
  });

  it('fails a write with the error of the file call that failed, its code kept, and goes on writing', async () => {
    const writer = new FileWriter(parsedKey(key.secretKey));

    const missingDir = writer.place(join(dir, 'no', '.upload-1'), join(dir, 'no', 'a'), Buffer.from('x'));
    const renameFails = writer.place(join(dir, '.upload-2'), join(dir, 'gone', 'b'), Buffer.from('y'));

    await expect(missingDir).rejects.toMatchObject({ code: 'ENOENT', syscall: 'open' });
    await expect(renameFails).rejects.toMatchObject({ code: 'ENOENT', syscall: 'rename' });
    await writer.place(join(dir, '.upload-3'), join(dir, 'c'), Buffer.from('z'));
    expect(await readdir(dir)).toEqual(['c']);
    await expect(
      new FileWriter().storeSignedOnce(join(dir, '.t'), join(dir, 'd'), SIGNATURE_SLOT, 'fp'),
    ).rejects.toThrow('without a signing key');
  });
});
