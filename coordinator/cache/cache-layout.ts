/**
 * The file names a Nix binary cache consists of (the layout `nix copy --to file://…` writes and
 * `http://…` substituters read). Every name that reaches the file system from a request passes through
 * `classifyCachePath` first, so nothing outside these shapes can be read or written.
 */
import { NIX_BASE32_ALPHABET, STORE_DIR, isStorePath } from '../../common/nix/store-path.js';

export type CacheFileKind = 'cache-info' | 'narinfo' | 'nar' | 'log';

export const CONTENT_TYPES: Record<CacheFileKind, string> = {
  'cache-info': 'text/x-nix-cache-info',
  narinfo: 'text/x-nix-narinfo',
  nar: 'application/x-nix-nar',
  log: 'text/plain; charset=utf-8',
};

const B32 = `[${NIX_BASE32_ALPHABET}]`;
const NARINFO_RE = new RegExp(`^${B32}{32}\\.narinfo$`);
/** Nix names NAR files after the SHA-256 of the file itself (`FileHash`), plus the compression's extension. */
const NAR_RE = new RegExp(`^nar/(${B32}{52})\\.nar(?:\\.[a-z0-9]{1,8})?$`);
const LOG_PREFIX = 'log/';

/**
 * What `relativePath` (relative to the cache root, already URL-decoded) names: one of the cache's file kinds,
 * `'unsafe'` for anything that tries to leave the cache directory (`..`, absolute, NUL, backslash), or
 * undefined for a harmless name the cache does not serve.
 */
export function classifyCachePath(relativePath: string): CacheFileKind | 'unsafe' | undefined {
  if (isUnsafe(relativePath)) return 'unsafe';
  if (relativePath === 'nix-cache-info') return 'cache-info';
  if (NARINFO_RE.test(relativePath)) return 'narinfo';
  if (NAR_RE.test(relativePath)) return 'nar';
  if (relativePath.startsWith(LOG_PREFIX)) {
    const drv = relativePath.slice(LOG_PREFIX.length);
    if (!drv.includes('/') && isStorePath(`${STORE_DIR}/${drv}`)) return 'log';
  }
  return undefined;
}

/** The base32 file hash a NAR's name claims, e.g. `nar/<hash>.nar.zst` → `<hash>`. */
export function narNameHash(relativePath: string): string | undefined {
  return NAR_RE.exec(relativePath)?.[1];
}

/** `<hash>.narinfo` for a store path's hash part. */
export function narInfoName(storePathHash: string): string {
  return `${storePathHash}.narinfo`;
}

function isUnsafe(p: string): boolean {
  if (p.startsWith('/') || p.includes('\0') || p.includes('\\')) return true;
  return p.split('/').some((segment) => segment === '..' || segment === '.');
}
