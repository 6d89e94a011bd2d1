import { describe, it, expect } from 'vitest';
import { runNixChecked, NO_SUBSTITUTERS } from './cli.js';
import {
  NIX_BASE32_ALPHABET,
  STORE_DIR,
  isDrvPath,
  isStorePath,
  isValidStorePathName,
  storePathHash,
  storePathName,
} from './store-path.js';

const HASH = '0123456789abcdfghijklmnpqrsvwxy';
const h = (c: string): string => `${HASH}${c}`;

describe('store paths', () => {
  it('accepts /nix/store/<32 base32 characters>-<name> and splits it into hash and name', () => {
    const p = `${STORE_DIR}/${h('z')}-hello-2.12.1`;
    expect(isStorePath(p)).toBe(true);
    expect(storePathHash(p)).toBe(h('z'));
    expect(storePathName(p)).toBe('hello-2.12.1');
  });

  it('agrees with a path that Nix itself put in the store', async () => {
    const out = await runNixChecked('nix-instantiate', [
      ...NO_SUBSTITUTERS,
      '--eval',
      '--read-write-mode',
      '--json',
      '-E',
      'builtins.toFile "ekaci-store-path-test+x=y?.txt" "hello"',
    ]);
    const p = JSON.parse(out) as string;
    expect(isStorePath(p)).toBe(true);
    expect(storePathName(p)).toBe('ekaci-store-path-test+x=y?.txt');
  });

  it('accepts every character of the Nix base32 alphabet in the hash and none of e, o, t, u', () => {
    for (const c of NIX_BASE32_ALPHABET) expect(isStorePath(`${STORE_DIR}/${h(c)}-x`)).toBe(true);
    for (const c of 'eotuA_-.') expect(isStorePath(`${STORE_DIR}/${h(c)}-x`)).toBe(false);
  });

  it('rejects hashes of the wrong length, other store directories, subpaths and trailing slashes', () => {
    expect(isStorePath(`${STORE_DIR}/${HASH}-x`)).toBe(false);
    expect(isStorePath(`${STORE_DIR}/${h('zz')}-x`)).toBe(false);
    expect(isStorePath(`/gnu/store/${h('z')}-x`)).toBe(false);
    expect(isStorePath(`${STORE_DIR}/${h('z')}-x/bin/x`)).toBe(false);
    expect(isStorePath(`${STORE_DIR}/${h('z')}-x/`)).toBe(false);
    expect(isStorePath(`${STORE_DIR}/${h('z')}x`)).toBe(false);
    expect(isStorePath(`${STORE_DIR}/${h('z')}-`)).toBe(false);
    expect(isStorePath(`${STORE_DIR}/`)).toBe(false);
    expect(isStorePath('')).toBe(false);
  });

  it("allows only Nix's name characters, at most 211 of them", () => {
    expect(isValidStorePathName('aZ09+-._?=')).toBe(true);
    expect(isValidStorePathName('a'.repeat(211))).toBe(true);
    expect(isValidStorePathName('a'.repeat(212))).toBe(false);
    for (const bad of ['', 'a b', 'a/b', 'a:b', 'ü', 'a\nb', 'a@b', 'a~b'])
      expect(isValidStorePathName(bad)).toBe(false);
  });

  it('rejects the names ".", ".." and names starting ".-" or "..-", but allows other leading dots', () => {
    for (const bad of ['.', '..', '.-x', '..-x']) expect(isValidStorePathName(bad)).toBe(false);
    for (const ok of ['.x', '..x', '...', '.git-foo']) expect(isValidStorePathName(ok)).toBe(true);
  });

  it('recognises derivation paths by the .drv suffix of a valid store path', () => {
    expect(isDrvPath(`${STORE_DIR}/${h('z')}-hello-2.12.1.drv`)).toBe(true);
    expect(isDrvPath(`${STORE_DIR}/${h('z')}-hello-2.12.1`)).toBe(false);
    expect(isDrvPath(`/tmp/${h('z')}-hello.drv`)).toBe(false);
    expect(storePathName(`${STORE_DIR}/${h('z')}-hello.drv`)).toBe('hello.drv');
  });

  it('throws a RangeError naming the value when asked for the hash or name of a non-store path', () => {
    expect(() => storePathName('/usr/bin/env')).toThrow(RangeError);
    expect(() => storePathHash('/usr/bin/env')).toThrow('not a store path: "/usr/bin/env"');
  });
});
