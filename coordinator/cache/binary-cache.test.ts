import { createHash, randomUUID } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { readFile, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { runNixChecked } from '../../common/nix/cli.js';
import { BinaryCache, NIX_CACHE_INFO, PUSH_COMPRESSION } from './binary-cache.js';
import { fingerprint, nixBase32, parseNarInfo, serializeNarInfo } from '../../common/nix/narinfo.js';
import { generateSigningKey, signFingerprint } from './signing-key.js';
import { NIX, TempDirs, buildTrivial, nixEnv, realiseFromCache, type Built } from './test-support.js';

const temp = new TempDirs();
const key = generateSigningKey('coordinator-test-1');
let env: NodeJS.ProcessEnv;
let work: string;
let built: Built;

beforeAll(async () => {
  work = await temp.make();
  env = nixEnv(work);
  built = await buildTrivial(work, env, 1);
});
afterAll(() => temp.removeAll());

async function newCache(): Promise<BinaryCache> {
  return new BinaryCache({ dir: await temp.make(), secretKey: key.secretKey, logger: silentLogger() });
}

function fakeStorePath(i: number): string {
  return `/nix/store/${nixBase32(createHash('sha256').update(String(i)).digest()).slice(0, 32)}-fake-${i}`;
}

describe('BinaryCache', () => {
  it('lays out a Nix file:// cache that announces its store directory and priority', async () => {
    const cache = await newCache();

    expect(await readFile(join(cache.dir, 'nix-cache-info'), 'utf8')).toBe(NIX_CACHE_INFO);
    expect(cache.publicKey).toBe(key.publicKey);
  });

  it('pushes a closure from the local store, signed, and reports it through hasPaths and narInfo', async () => {
    const cache = await newCache();

    await cache.pushFromLocalStore([built.out]);

    const present = await cache.hasPaths([built.out, ...built.deps, built.drv, fakeStorePath(1), 'not-a-path']);
    expect(present).toEqual(new Set([built.out, ...built.deps]));
    const info = await cache.narInfo(built.out);
    expect(info?.compression).toBe(PUSH_COMPRESSION);
    const narSize = Number((await runNixChecked('nix-store', ['-q', '--size', built.out], { env })).trim());
    expect(info?.narSize).toBe(narSize);
    expect(info?.sigs).toEqual([signFingerprint(key.secretKey, fingerprint(info!))]);
    expect(await cache.narInfo(fakeStorePath(2))).toBeUndefined();
  });

  it('answers hasPaths for hundreds of paths in one directory listing', async () => {
    const cache = await newCache();
    await cache.pushFromLocalStore([built.out]);
    const many = Array.from({ length: 500 }, (_, i) => fakeStorePath(i));

    const present = await cache.hasPaths([...many, built.out]);

    expect(present).toEqual(new Set([built.out]));
  });

  it('pushes .drv files with derivation: true so a store that has nothing can build from the cache', async () => {
    const cache = await newCache();
    const fresh = await buildTrivial(work, env, 2);

    await cache.pushFromLocalStore([fresh.drv], { derivation: true });

    expect(await cache.hasPaths([fresh.drv, fresh.out])).toEqual(new Set([fresh.drv]));
    const empty = await temp.make();
    const r = await realiseFromCache(empty, env, fresh.drv, { url: `file://${cache.dir}`, publicKey: cache.publicKey });
    expect(r.stderr).not.toMatch(/error/);
    expect(r.stdout.trim()).toBe(fresh.out);
    expect((await stat(join(empty, 'store', fresh.out.slice('/nix/store/'.length)))).isFile()).toBe(true);
  });

  it('writes .drv closures with the narinfos nix copy --derivation writes, sources included', async () => {
    const nonce = randomUUID().slice(0, 8);
    const dir = await temp.make();
    writeFileSync(join(dir, `builder-${nonce}.sh`), `echo built ${nonce} > $out\n`);
    const file = join(dir, 'with-source.nix');
    writeFileSync(
      file,
      `let dep = derivation { name = "dep-${nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
         args = [ "-c" "echo ${nonce} > $out" ]; };
       in derivation { name = "top-${nonce}"; system = builtins.currentSystem; builder = "/bin/sh";
         args = [ ./builder-${nonce}.sh ]; inherit dep; }`,
    );
    const drv = (await runNixChecked('nix-instantiate', [file], { env })).trim();
    const ours = await newCache();
    const theirs = await temp.make();

    await ours.pushFromLocalStore([drv], { derivation: true });
    await runNixChecked('nix', [...NIX, 'copy', '--derivation', '--to', `file://${theirs}`, drv], { env });

    const expected = (await readdir(theirs)).filter((n) => n.endsWith('.narinfo'));
    expect(expected).toHaveLength(3); // the two .drv files and the builder script
    expect((await readdir(ours.dir)).filter((n) => n.endsWith('.narinfo')).sort()).toEqual(expected.sort());
    for (const name of expected) {
      const want = parseNarInfo(await readFile(join(theirs, name), 'utf8'));
      const got = (await ours.narInfo(want.storePath))!;
      expect(got).toMatchObject({ narHash: want.narHash, narSize: want.narSize, references: want.references });
      expect(got.ca).toBe(want.ca);
      expect(got.sigs).toEqual([signFingerprint(key.secretKey, fingerprint(got))]);
    }
  });

  it('does nothing when asked to push no paths', async () => {
    const cache = await newCache();

    await cache.pushFromLocalStore([]);

    expect((await readdir(cache.dir)).filter((n) => n.endsWith('.narinfo'))).toEqual([]);
  });

  it('sums the closures of many paths with turns of the event loop between its reads', async () => {
    const cache = await newCache();
    const hashOf = (i: number) => nixBase32(createHash('sha256').update(`p${i}`).digest());
    const paths = Array.from({ length: 1200 }, (_, i) => `/nix/store/${hashOf(i).slice(0, 32)}-p${i}`);
    paths.forEach((storePath, i) => {
      const info = {
        storePath,
        url: `nar/${hashOf(i)}.nar`,
        compression: 'none',
        narHash: `sha256:${hashOf(i)}`,
        narSize: 8 + i,
        references: i === 0 ? [] : [paths[0]!],
        sigs: [],
      };
      writeFileSync(join(cache.dir, `${storePath.slice(11, 43)}.narinfo`), serializeNarInfo(info));
    });
    let turned = false;
    setImmediate(() => (turned = true));

    const sizes = await cache.sizes(paths);

    expect(turned).toBe(true);
    expect(sizes.size).toBe(1200);
    expect(sizes.get(paths[10]!)).toEqual({ narSize: 18, closureSize: 18 + 8 });
  });

  it('refuses an uploaded NAR whose content does not hash to its name, leaving no file behind', async () => {
    const cache = await newCache();
    const name = `nar/${nixBase32(createHash('sha256').update('real').digest())}.nar`;

    await expect(cache.writeNar(name, Readable.from([Buffer.from('forged')]))).rejects.toThrow(/hashes to/);
    // Declaring its size, it is taken in memory: the same check.
    await expect(cache.writeNar(name, Readable.from([Buffer.from('forged')]), 6)).rejects.toThrow(/hashes to/);

    expect(await readdir(join(cache.dir, 'nar'))).toEqual([]);
    await cache.writeNar(name, Readable.from([Buffer.from('real')]), 4);
    expect(await readdir(join(cache.dir, 'nar'))).toEqual([name.slice('nar/'.length)]);
  });

  it('refuses an uploaded narinfo whose NAR was not uploaded or whose references are missing', async () => {
    const source = await newCache();
    await source.pushFromLocalStore([built.out]);
    const info = (await source.narInfo(built.out))!;
    const cache = await newCache();
    const name = `${built.out.slice(11, 43)}.narinfo`;

    await expect(cache.writeNarInfo(name, serializeNarInfo(info))).rejects.toThrow(/was not uploaded/);

    await cache.writeNar(info.url, Readable.from([await readFile(join(source.dir, info.url))]));
    await expect(cache.writeNarInfo(name, serializeNarInfo(info))).rejects.toThrow(/references .* not in the cache/);
    expect(await cache.hasPaths([built.out])).toEqual(new Set());
  });

  it('keeps the first narinfo stored for a path and signs every upload with its own key only', async () => {
    const source = await newCache();
    await source.pushFromLocalStore([built.out]);
    const cache = await newCache();
    for (const p of [...built.deps, built.out]) {
      const info = (await source.narInfo(p))!;
      await cache.writeNar(info.url, Readable.from([await readFile(join(source.dir, info.url))]));
      const foreign = { ...info, sigs: ['agent-1:bm90LWEtc2lnbmF0dXJl'] };
      await cache.writeNarInfo(`${p.slice(11, 43)}.narinfo`, serializeNarInfo(foreign));
    }
    const stored = (await cache.narInfo(built.out))!;
    expect(stored.sigs).toEqual([signFingerprint(key.secretKey, fingerprint(stored))]);

    const changed = { ...stored, system: 'pretend-system' };
    await cache.writeNarInfo(`${built.out.slice(11, 43)}.narinfo`, serializeNarInfo(changed));

    expect((await cache.narInfo(built.out))?.system).toBe(stored.system);
    expect((await readdir(cache.dir)).filter((n) => n.startsWith('.'))).toEqual([]);
  });

  it('refuses a cache directory that cannot be written into a store URI', async () => {
    const dir = join(await temp.make(), 'a?b');

    expect(() => new BinaryCache({ dir, secretKey: key.secretKey, logger: silentLogger() })).toThrow(/must not/);
  });
});
