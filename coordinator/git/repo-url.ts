import { createHash } from 'node:crypto';
import { resolve as resolvePath } from 'node:path';
import { fileURLToPath } from 'node:url';
import { GitUrlError } from './errors.js';

/** Where a repository lives, and the names eka-ci gives it. */
export interface RepoLocation {
  /** What git fetches from: an absolute path for local repositories, the URL for http(s). */
  fetchUrl: string;
  /** Safe to print: no credentials, no query string. */
  display: string;
  /** The mirror's directory name: a readable slug plus a hash of the normalised URL. */
  mirrorName: string;
  /** Parts of `fetchUrl` that may carry a token (its query string), masked wherever git quotes the URL. */
  hidden: readonly string[];
}

/**
 * Hex digits of SHA-256 in a mirror's name: 64 bits make a collision between the handful of repositories one
 * coordinator mirrors vanishingly unlikely, and keep paths short.
 */
const MIRROR_HASH_LENGTH = 16;

/** Characters of the readable slug; its tail (owner/name) is what tells mirrors apart to a human. */
const MIRROR_SLUG_LENGTH = 48;

const SCHEME = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\//;
/** `git@github.com:owner/repo`: ssh in scp syntax, which git also accepts without a scheme. */
const SCP_LIKE = /^[^/:]+@[^/:]+:/;

/**
 * Normalises a clone URL so that spellings of the same repository share one mirror: local paths and `file://` URLs
 * become absolute paths without trailing slashes; http(s) URLs get a lower-case scheme and host, no default port and
 * no trailing slash.
 */
export function parseRepoUrl(raw: string): RepoLocation {
  const scheme = SCHEME.exec(raw)?.[1]?.toLowerCase();
  if (scheme === undefined) {
    if (SCP_LIKE.test(raw)) throw unsupported(raw);
    return local(resolvePath(raw));
  }
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new GitUrlError(`the repository URL ${redactUrl(raw)} is not a valid URL`);
  }
  if (scheme === 'file') {
    if (url.host !== '') throw unsupported(raw);
    return local(fileURLToPath(url));
  }
  if (scheme !== 'http' && scheme !== 'https') throw unsupported(raw);
  if (url.username !== '' || url.password !== '') {
    throw new GitUrlError(
      `the repository URL ${redactUrl(raw)} contains credentials; pass them as the auth option instead, so that they ` +
        'never reach logs, error messages or the mirror',
    );
  }
  url.hash = '';
  url.pathname = url.pathname.replace(/\/+$/, '');
  const fetchUrl = url.toString();
  const display = `${url.origin}${url.pathname}${url.search === '' ? '' : '?…'}`;
  const hidden = url.search === '' ? [] : [url.search];
  return { fetchUrl, display, mirrorName: mirrorName(`${url.host}${url.pathname}`, fetchUrl), hidden };
}

/** A URL with any user-info and query string masked, for messages about URLs we refuse. */
export function redactUrl(raw: string): string {
  return raw.replace(/^([a-zA-Z][a-zA-Z0-9+.-]*:\/\/)[^/@]*@/, '$1***@').replace(/\?.*$/, '?…');
}

function local(path: string): RepoLocation {
  const normalised = path.length > 1 ? path.replace(/\/+$/, '') : path;
  const name = mirrorName(normalised, `file://${normalised}`);
  return { fetchUrl: normalised, display: normalised, mirrorName: name, hidden: [] };
}

function mirrorName(readable: string, key: string): string {
  const slug = readable
    .replace(/[^a-zA-Z0-9._-]+/g, '-')
    .replace(/^[-.]+|-+$/g, '')
    .slice(-MIRROR_SLUG_LENGTH)
    .replace(/^[-.]+/, '');
  const hash = createHash('sha256').update(key).digest('hex').slice(0, MIRROR_HASH_LENGTH);
  return `${slug === '' ? 'repo' : slug}-${hash}.git`;
}

function unsupported(raw: string): GitUrlError {
  return new GitUrlError(
    `the repository URL ${redactUrl(raw)} is not supported: use a local path, a file:// URL or an http(s):// URL`,
  );
}
