/**
 * Store paths as Nix spells them: `/nix/store/<hash>-<name>`. eka-ci only ever talks to stores rooted at
 * `/nix/store` (agents bind-mount their own `/nix`, they never relocate it), so the store directory is fixed.
 */
export const STORE_DIR = '/nix/store';

/** Nix's base32 alphabet: the digits and lowercase letters minus e, o, t and u, so that hashes rarely spell words. */
export const NIX_BASE32_ALPHABET = '0123456789abcdfghijklmnpqrsvwxyz';

/** 160 bits of truncated SHA-256, base32-encoded. */
const HASH_LENGTH = 32;

/** Nix's `StorePath::MaxPathLen`: keeps the whole file name within the 255 bytes most file systems allow. */
const MAX_NAME_LENGTH = 211;

const PREFIX = `${STORE_DIR}/`;
const HASH_START = PREFIX.length;
const NAME_START = HASH_START + HASH_LENGTH + 1;

const HASH_RE = new RegExp(`^[${NIX_BASE32_ALPHABET}]{${HASH_LENGTH}}$`);
const NAME_RE = /^[A-Za-z0-9+\-._?=]+$/;

/**
 * Whether `name` is a valid store path name. Nix 2.8 refused any leading dot; newer releases only refuse `.`,
 * `..` and names starting `.-` or `..-` (which would read as a hidden hash-less path). We accept what the newest
 * Nix accepts, because the derivations we read may come from any Nix release.
 */
export function isValidStorePathName(name: string): boolean {
  if (name.length === 0 || name.length > MAX_NAME_LENGTH || !NAME_RE.test(name)) return false;
  if (name === '.' || name === '..' || name.startsWith('.-') || name.startsWith('..-')) return false;
  return true;
}

/** Whether `p` is exactly a store path (not a file inside one, not a path with a trailing slash). */
export function isStorePath(p: string): boolean {
  return (
    p.startsWith(PREFIX) &&
    p.charCodeAt(NAME_START - 1) === 0x2d /* '-' */ &&
    HASH_RE.test(p.slice(HASH_START, NAME_START - 1)) &&
    isValidStorePathName(p.slice(NAME_START))
  );
}

/** Whether `p` is a store path naming a derivation file. */
export function isDrvPath(p: string): boolean {
  return p.endsWith('.drv') && isStorePath(p);
}

/**
 * The name part of a store path: `hello-2.12.1` for `/nix/store/<hash>-hello-2.12.1`. A non-store path is a bug in
 * the caller (paths from users are checked with `isStorePath` first), hence a RangeError rather than an EkaciError.
 */
export function storePathName(p: string): string {
  assertStorePath(p);
  return p.slice(NAME_START);
}

/** The 32-character base32 hash part of a store path. Throws RangeError like `storePathName`. */
export function storePathHash(p: string): string {
  assertStorePath(p);
  return p.slice(HASH_START, NAME_START - 1);
}

function assertStorePath(p: string): void {
  if (!isStorePath(p)) throw new RangeError(`not a store path: ${JSON.stringify(p)}`);
}
