import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { readAll } from './read-all.js';

describe('readAll', () => {
  it("gives a stream's chunks as one buffer, and an empty one for an empty stream", async () => {
    const chunks = ['nar', 'chive', '', ' of three'].map((s) => Buffer.from(s));
    expect((await readAll(Readable.from(chunks))).toString()).toBe('narchive of three');
    expect((await readAll(Readable.from([Buffer.from('one')]))).toString()).toBe('one');
    expect(await readAll(Readable.from([]))).toEqual(Buffer.alloc(0));
  });

  it('fails as the stream does', async () => {
    const broken = Readable.from(
      (async function* () {
        yield Buffer.from('half');
        await Promise.resolve();
        throw new Error('connection reset');
      })(),
    );
    await expect(readAll(broken)).rejects.toThrow('connection reset');
  });
});
