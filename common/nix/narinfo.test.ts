import { createHash } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CacheError } from '../errors.js';
import { NO_SUBSTITUTERS, runNixChecked } from './cli.js';
import { fingerprint, nixBase32, normaliseSha256, parseNarInfo, serializeNarInfo } from './narinfo.js';
import { NIX, TempDirs, buildTrivial, nixEnv } from './test-support.js';

const temp = new TempDirs();
let nixWritten: string;
let env: NodeJS.ProcessEnv;

beforeAll(async () => {
  const dir = await temp.make();
  env = nixEnv(dir);
  const built = await buildTrivial(dir, env, 2);
  const sec = join(dir, 'k.sec');
  await runNixChecked('nix-store', ['--generate-binary-cache-key', 'k-1', sec, join(dir, 'k.pub')], { env });
  const cacheDir = await temp.make();
  const to = `file://${cacheDir}?secret-key=${sec}&compression=zstd`;
  await runNixChecked('nix', [...NIX, 'copy', '--to', to, ...NO_SUBSTITUTERS, built.out], { env });
  const hash = built.out.split('/')[3]?.slice(0, 32) ?? '';
  nixWritten = await readFile(join(cacheDir, `${hash}.narinfo`), 'utf8');
  expect(await readdir(cacheDir)).toContain(`${hash}.narinfo`);
});
afterAll(() => temp.removeAll());

const MINIMAL = [
  'StorePath: /nix/store/i83yximwg5krpiiaj0aghs2hn4cznk63-exp',
  'URL: nar/0qk0rv9dk5vfdxb91cq2298y6g818wmqi9xvnnnppqw5iba8azdj.nar',
  'NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h',
  'NarSize: 120',
].join('\n');

describe('narinfo', () => {
  it('reads what nix copy writes and writes it back byte-identically', () => {
    const info = parseNarInfo(nixWritten);

    expect(info.compression).toBe('zstd');
    expect(info.references).toHaveLength(2);
    expect(info.references.every((r) => r.startsWith('/nix/store/'))).toBe(true);
    expect(info.deriver).toMatch(/^\/nix\/store\/.*\.drv$/);
    expect(info.sigs).toHaveLength(1);
    expect(serializeNarInfo(info)).toBe(nixWritten);
  });

  it('fingerprints as 1;path;narHash;narSize;sorted full reference paths', () => {
    const info = parseNarInfo(nixWritten);
    const [a, b] = info.references;

    expect(fingerprint({ ...info, references: [b ?? '', a ?? ''] })).toBe(
      `1;${info.storePath};${info.narHash};${info.narSize};${a},${b}`,
    );
    expect(fingerprint({ ...info, references: [] })).toMatch(/;$/);
  });

  it('encodes hashes in Nix base32 exactly as nix-hash --to-base32 does', async () => {
    const digest = createHash('sha256').update('eka-ci').digest();

    const fromNix = await runNixChecked('nix-hash', ['--type', 'sha256', '--to-base32', digest.toString('hex')], {
      env,
    });

    expect(nixBase32(digest)).toBe(fromNix.trim());
  });

  it('normalises base16, base64 and SRI hashes to the base32 form that signatures cover', () => {
    const digest = createHash('sha256').update('x').digest();
    const base32 = `sha256:${nixBase32(digest)}`;

    expect(normaliseSha256(`sha256:${digest.toString('hex')}`, 'NarHash')).toBe(base32);
    expect(normaliseSha256(`sha256:${digest.toString('base64')}`, 'NarHash')).toBe(base32);
    expect(normaliseSha256(`sha256-${digest.toString('base64')}`, 'NarHash')).toBe(base32);
    expect(normaliseSha256(base32, 'NarHash')).toBe(base32);
    expect(() => normaliseSha256('md5:abc', 'NarHash')).toThrow(CacheError);
  });

  it('defaults Compression to bzip2 and References to none, as Nix does', () => {
    const info = parseNarInfo(MINIMAL);

    expect(info.compression).toBe('bzip2');
    expect(info.references).toEqual([]);
    expect(info.sigs).toEqual([]);
  });

  it.each([
    ['StorePath', MINIMAL.replace('/nix/store/i83', '/tmp/i83')],
    ['StorePath', MINIMAL.replace('StorePath', 'X-StorePath')],
    ['URL', MINIMAL.replace(/URL: .*/, 'URL: ')],
    ['NarHash', MINIMAL.replace(/NarHash: .*/, 'NarHash: sha256:nothex')],
    ['NarSize', MINIMAL.replace('NarSize: 120', 'NarSize: -1')],
    ['NarSize', MINIMAL.replace('NarSize: 120', 'NarSize: 0')],
    ['References', `${MINIMAL}\nReferences: ../../etc/passwd`],
    ['Deriver', `${MINIMAL}\nDeriver: not a path`],
  ])('rejects a narinfo with a bad %s field', (field, text) => {
    expect(() => parseNarInfo(text)).toThrow(new RegExp(field));
  });
});
