import { lstat, readlink, realpath, stat } from 'node:fs/promises';
import { dirname, isAbsolute, join, relative, sep } from 'node:path';

/**
 * Resolves a path written in a repository's config to a real path inside the checkout, or says why it cannot.
 *
 * The repository is untrusted (any pull request may change it), so the walk follows the kernel's rules one
 * component at a time and never touches anything outside the checkout: `..` is taken physically (the directory
 * walked so far has no symlinks, so its parent is its real parent), and a symbolic link's target is checked
 * before it is followed. A link pointing out is rejected whether or not its target exists, so the answer does
 * not depend on — or reveal — what is on the host. `/a/b` and `a/b` are the same path: the root is the checkout.
 */

/** An existing entry: its real absolute path (inside the real checkout) and that path relative to the root. */
interface Entry<K extends string> {
  kind: K;
  absolute: string;
  /** `''` for the root itself. */
  relative: string;
}

export type CheckoutPath =
  | Entry<'file'>
  | Entry<'directory'>
  | Entry<'other'>
  | { kind: 'missing' }
  /** `via` is the symbolic link that led out (`lib -> /etc`), `undefined` for a plain `..` above the root. */
  | { kind: 'escapes'; via: string | undefined }
  | { kind: 'invalid'; reason: string };

// Linux gives up after 40 links (MAXSYMLINKS); any chain longer than that is a loop in practice.
const MAX_SYMLINK_HOPS = 40;

/** `root` must already be a real path (`realpath` of the checkout). */
export async function resolveInCheckout(root: string, path: string): Promise<CheckoutPath> {
  if (path.includes('\0')) return { kind: 'invalid', reason: 'contains a NUL byte' };
  // Reversed so the next component is a cheap pop; a link's target is pushed back in front of the rest.
  const pending = path.split('/').reverse();
  let current = root;
  let via: string | undefined;
  let hops = 0;
  while (pending.length > 0) {
    const segment = pending.pop()!;
    if (segment === '' || segment === '.') continue;
    if (segment === '..') {
      if (current === root) return { kind: 'escapes', via };
      current = dirname(current);
      continue;
    }
    const next = join(current, segment);
    let isLink: boolean;
    try {
      isLink = (await lstat(next)).isSymbolicLink();
    } catch (e) {
      return notFoundOr(e);
    }
    if (!isLink) {
      current = next;
      continue;
    }
    if (++hops > MAX_SYMLINK_HOPS) return { kind: 'invalid', reason: 'goes through too many symbolic links' };
    const target = await readlink(next);
    via = `${relative(root, next)} -> ${target}`;
    if (isAbsolute(target)) {
      // Only a link spelled with the checkout's own real path stays inside; anything else is the host.
      if (target !== root && !target.startsWith(root + sep)) return { kind: 'escapes', via };
      current = root;
      pending.push(...target.slice(root.length).split('/').reverse());
    } else {
      pending.push(...target.split('/').reverse());
    }
  }
  return describe(root, current);
}

async function describe(root: string, current: string): Promise<CheckoutPath> {
  let real: string;
  let kind: 'file' | 'directory' | 'other';
  try {
    real = await realpath(current);
    const st = await stat(real);
    kind = st.isFile() ? 'file' : st.isDirectory() ? 'directory' : 'other';
  } catch (e) {
    return notFoundOr(e);
  }
  // The walk above should make this impossible; it is the cheap second opinion before handing the path to Nix.
  const rel = relative(root, real);
  if (rel === '..' || rel.startsWith(`..${sep}`) || isAbsolute(rel)) return { kind: 'escapes', via: undefined };
  return { kind, absolute: real, relative: rel };
}

function notFoundOr(e: unknown): CheckoutPath {
  const code = (e as NodeJS.ErrnoException).code;
  // ENOTDIR: a component before the last is a regular file ("default.nix/x").
  if (code === 'ENOENT' || code === 'ENOTDIR') return { kind: 'missing' };
  return { kind: 'invalid', reason: `cannot be read (${code ?? String(e)})` };
}
