/**
 * Binary-cache signing keys in Nix's own text format, so that keys move freely between eka-ci and Nix:
 * a secret key is `name:base64(seed ‖ publicKey)` (libsodium's 64-byte ed25519 secret key), a public key is
 * `name:base64(publicKey)`, and a signature is `name:base64(signature)`. Nix looks signatures up by `name`,
 * which is why every part carries it.
 */
import { createPrivateKey, createPublicKey, generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { mkdir, open, readFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { CacheError } from '../../common/errors.js';

export interface SigningKey {
  /** `name:base64(64 bytes)`, the format of `nix-store --generate-binary-cache-key` and `secret-key=`. */
  secretKey: string;
  /** `name:base64(32 bytes)`, the format of `trusted-public-keys`. */
  publicKey: string;
}

const SEED_BYTES = 32;
const PUBLIC_BYTES = 32;

/**
 * node:crypto takes raw ed25519 seeds only inside a PKCS#8 envelope. For ed25519 that envelope is constant
 * (RFC 8410: version 0, algorithm OID 1.3.101.112, an OCTET STRING holding the 32-byte seed), so it is a prefix.
 */
const PKCS8_ED25519_PREFIX = Buffer.from('302e020100300506032b657004220420', 'hex');

/** The file holds the only copy of the coordinator's signing secret: readable by its owner alone. */
const KEY_FILE_MODE = 0o600;

/** Nix's key names are free text but must not contain the separator, or the key could not be parsed back. */
const KEY_NAME_RE = /^[^:\s]+$/;

/** A fresh key pair, e.g. `generateSigningKey('ci.example.org-1')`. */
export function generateSigningKey(name: string): SigningKey {
  checkName(name);
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const seed = privateKey.export({ format: 'der', type: 'pkcs8' }).subarray(PKCS8_ED25519_PREFIX.length);
  const pub = rawPublicKey(publicKey);
  return {
    secretKey: `${name}:${Buffer.concat([seed, pub]).toString('base64')}`,
    publicKey: `${name}:${pub.toString('base64')}`,
  };
}

/**
 * Reads the secret key in `file`, or creates the file with a new key named `name` on first start. A key found in
 * the file keeps its own name: renaming it would invalidate every signature already handed out.
 */
export async function loadOrCreateSigningKey(file: string, name: string): Promise<SigningKey> {
  try {
    const text = await readFile(file, 'utf8');
    return signingKeyFromSecret(text.trim(), file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const key = generateSigningKey(name);
  await mkdir(dirname(file), { recursive: true });
  try {
    // 'wx' so that two coordinators starting at once cannot each write a different key.
    const handle = await open(file, 'wx', KEY_FILE_MODE);
    try {
      await handle.writeFile(key.secretKey);
    } finally {
      await handle.close();
    }
    return key;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    return signingKeyFromSecret((await readFile(file, 'utf8')).trim(), file);
  }
}

/** The key pair for a secret key; throws CacheError when the secret is not a Nix ed25519 secret key. */
export function signingKeyFromSecret(secretKey: string, source = 'secret key'): SigningKey {
  const { name, publicKey } = parseSecretKey(secretKey, source);
  return { secretKey, publicKey: `${name}:${publicKey.toString('base64')}` };
}

/** Signs a narinfo fingerprint (see `fingerprint` in narinfo.ts) as Nix does: `name:base64(ed25519 signature)`. */
export function signFingerprint(secretKey: string, fingerprint: string): string {
  const { name, privateKey } = parsedKey(secretKey);
  return `${name}:${sign(null, Buffer.from(fingerprint, 'utf8'), privateKey).toString('base64')}`;
}

/**
 * The name and private key of a secret key, for signing elsewhere (the cache's file thread). Building the KeyObject
 * costs more than signing; a coordinator signs every upload with the same key.
 */
export function parsedKey(secretKey: string): ReturnType<typeof parseSecretKey> {
  let parsed = parsedKeys.get(secretKey);
  if (!parsed) {
    parsed = parseSecretKey(secretKey, 'secret key');
    parsedKeys.clear();
    parsedKeys.set(secretKey, parsed);
  }
  return parsed;
}

const parsedKeys = new Map<string, ReturnType<typeof parseSecretKey>>();

function parseSecretKey(secretKey: string, source: string): { name: string; privateKey: KeyObject; publicKey: Buffer } {
  const colon = secretKey.indexOf(':');
  const name = secretKey.slice(0, colon);
  const bytes = Buffer.from(secretKey.slice(colon + 1), 'base64');
  if (colon <= 0 || !KEY_NAME_RE.test(name) || bytes.length !== SEED_BYTES + PUBLIC_BYTES) {
    throw new CacheError(
      `${source} is not a Nix binary-cache secret key (expected "name:base64 of 64 bytes"); ` +
        'create one with `nix-store --generate-binary-cache-key NAME SECRET PUBLIC` or delete the file to get a new one',
    );
  }
  const privateKey = createPrivateKey({
    key: Buffer.concat([PKCS8_ED25519_PREFIX, bytes.subarray(0, SEED_BYTES)]),
    format: 'der',
    type: 'pkcs8',
  });
  const publicKey = rawPublicKey(createPublicKey(privateKey));
  // A secret whose second half is not the seed's public key would make Nix publish signatures nobody can verify.
  if (!publicKey.equals(bytes.subarray(SEED_BYTES))) {
    throw new CacheError(`${source} is corrupt: its public half does not match its seed; replace the key`);
  }
  return { name, privateKey, publicKey };
}

function rawPublicKey(key: KeyObject): Buffer {
  const jwk = key.export({ format: 'jwk' });
  if (typeof jwk.x !== 'string') throw new CacheError('ed25519 public key export returned no key material');
  return Buffer.from(jwk.x, 'base64url');
}

function checkName(name: string): void {
  if (!KEY_NAME_RE.test(name)) {
    throw new CacheError(`signing key name ${JSON.stringify(name)} must be non-empty without ":" or spaces`);
  }
}
