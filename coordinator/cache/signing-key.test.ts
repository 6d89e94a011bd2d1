import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CacheError } from '../../common/errors.js';
import { NO_SUBSTITUTERS, runNix, runNixChecked } from '../../common/nix/cli.js';
import { fingerprint, parseNarInfo } from '../../common/nix/narinfo.js';
import {
  generateSigningKey,
  loadOrCreateSigningKey,
  signFingerprint,
  parsedKey,
  signingKeyFromSecret,
} from './signing-key.js';
import { FileWriter, SIGNATURE_SLOT } from './file-writer.js';
import { NIX, TempDirs, buildTrivial, nixEnv, type Built } from './test-support.js';

const temp = new TempDirs();
let dir: string;
let env: NodeJS.ProcessEnv;
let built: Built;

beforeAll(async () => {
  dir = await temp.make();
  env = nixEnv(dir);
  built = await buildTrivial(dir, env, 2);
});
afterAll(() => temp.removeAll());

/** Copies `path` into a fresh `file://` cache, signed by Nix with the secret key in `keyFile`. */
async function nixSignedCache(keyFile: string, path: string): Promise<string> {
  const cacheDir = await temp.make();
  await runNixChecked(
    'nix',
    [...NIX, 'copy', '--to', `file://${cacheDir}?secret-key=${keyFile}&compression=none`, ...NO_SUBSTITUTERS, path],
    { env },
  );
  return cacheDir;
}

function verify(cacheDir: string, trustedKey: string, path: string) {
  return runNix(
    'nix',
    [...NIX, 'store', 'verify', '--no-contents', '--store', `file://${cacheDir}`, ...NO_SUBSTITUTERS].concat([
      '--option',
      'trusted-public-keys',
      trustedKey,
      path,
    ]),
    { env },
  );
}

describe('signing keys', () => {
  it('generates a key pair that Nix signs with and then trusts through trusted-public-keys', async () => {
    const key = generateSigningKey('eka-ci-test-1');
    expect(key.secretKey).toMatch(/^eka-ci-test-1:[A-Za-z0-9+/]{86}==$/);
    expect(key.publicKey).toMatch(/^eka-ci-test-1:[A-Za-z0-9+/]{43}=$/);
    const keyFile = join(dir, 'generated.sec');
    await writeFile(keyFile, key.secretKey, { mode: 0o600 });

    const cacheDir = await nixSignedCache(keyFile, built.out);

    expect((await verify(cacheDir, key.publicKey, built.out)).code).toBe(0);
    const stranger = generateSigningKey('eka-ci-test-1');
    expect((await verify(cacheDir, stranger.publicKey, built.out)).code).not.toBe(0);
  });

  it('loads a key made by nix-store --generate-binary-cache-key and derives the same public key', async () => {
    const sec = join(dir, 'nix.sec');
    const pub = join(dir, 'nix.pub');
    await runNixChecked('nix-store', ['--generate-binary-cache-key', 'from-nix-1', sec, pub], { env });

    const key = await loadOrCreateSigningKey(sec, 'ignored-name');

    expect(key.secretKey).toBe((await readFile(sec, 'utf8')).trim());
    expect(key.publicKey).toBe((await readFile(pub, 'utf8')).trim());
  });

  it('signs a narinfo fingerprint byte-for-byte as Nix does, references included', async () => {
    const sec = join(dir, 'byte.sec');
    await runNixChecked('nix-store', ['--generate-binary-cache-key', 'byte-1', sec, join(dir, 'byte.pub')], { env });
    const cacheDir = await nixSignedCache(sec, built.out);
    const hash = built.out.slice('/nix/store/'.length, '/nix/store/'.length + 32);
    const info = parseNarInfo(await readFile(join(cacheDir, `${hash}.narinfo`), 'utf8'));
    expect(info.references).toHaveLength(2);

    const secret = (await readFile(sec, 'utf8')).trim();
    const ours = signFingerprint(secret, fingerprint(info));
    // As the cache signs an upload: on its file thread, into the narinfo it stores.
    const stored = join(dir, 'byte.narinfo');
    const inThread = await new FileWriter(parsedKey(secret)).storeSignedOnce(
      join(dir, '.upload-byte'),
      stored,
      `Sig: ${SIGNATURE_SLOT}\n`,
      fingerprint(info),
    );

    expect(info.sigs).toEqual([ours]);
    expect(inThread).toEqual({ stored: true, sig: ours });
    expect(await readFile(stored, 'utf8')).toBe(`Sig: ${ours}\n`);
  });

  it('creates the key file with mode 0600 on first start and returns the same key afterwards', async () => {
    const file = join(dir, 'state', 'cache-key.sec');

    const first = await loadOrCreateSigningKey(file, 'coordinator-1');
    const second = await loadOrCreateSigningKey(file, 'coordinator-1');

    expect((await stat(file)).mode & 0o777).toBe(0o600);
    expect(first.publicKey).toMatch(/^coordinator-1:/);
    expect(second).toEqual(first);
  });

  it('refuses a key file that is not a Nix secret key, saying how to get a valid one', async () => {
    const file = join(dir, 'broken.sec');
    await writeFile(file, 'name:bm90IGEga2V5');

    await expect(loadOrCreateSigningKey(file, 'x')).rejects.toThrow(CacheError);
    await expect(loadOrCreateSigningKey(file, 'x')).rejects.toThrow(/generate-binary-cache-key/);
  });

  it('refuses a secret key whose public half does not belong to its seed', () => {
    const a = Buffer.from(generateSigningKey('k').secretKey.slice(2), 'base64');
    const b = Buffer.from(generateSigningKey('k').secretKey.slice(2), 'base64');
    const mixed = `k:${Buffer.concat([a.subarray(0, 32), b.subarray(32)]).toString('base64')}`;

    expect(() => signingKeyFromSecret(mixed)).toThrow(/corrupt/);
  });
});
