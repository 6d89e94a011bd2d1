import { Minimatch, type MinimatchOptions } from 'minimatch';

/**
 * Globs over the paths of a repository's files, as `git diff --name-only` prints them (`doc/manual.md`), written in
 * `jobs.<name>.skip_build_paths`. Read like `.gitignore` lines: a glob without a `/` matches a file's name in any
 * directory (`*.md`, `CHANGELOG.md`); one with a `/` matches the path from the repository root (`doc/**`,
 * `.github/workflows/*.yml`), and a leading `/` anchors a plain name at the root (`/README.md`). `*` stops at `/`,
 * `**` crosses it, `{a,b}` alternates, `[abc]` is a class, and dot files match like any other.
 */

// Extglobs (`+(a|b)`) stay literal: they are what makes a glob backtrack badly, and nobody lists paths with them.
const BASE: MinimatchOptions = { dot: true, nonegate: true, nocomment: true, noext: true };

// A path glob longer than this is a mistake (minimatch itself refuses 64 KiB).
const MAX_GLOB_LENGTH = 1_000;

/** What is wrong with a glob, as a message for the config error; undefined when it is usable. */
export function globProblem(glob: string): string | undefined {
  if (glob === '') return 'an empty glob matches no file';
  if (glob.length > MAX_GLOB_LENGTH) return `a glob longer than ${MAX_GLOB_LENGTH} characters`;
  if (glob.startsWith('!')) return `"${glob}": negation is not supported: list the paths that skip building`;
  if (glob.endsWith('/'))
    return `"${glob}" matches no file (paths name files): write "${glob}**" for everything under it`;
  const parts = glob.replace(/^\//, '').split('/');
  if (parts.some((p) => p === '.' || p === '..' || p === '')) {
    return `"${glob}": no ".", ".." or empty parts: paths are relative to the repository root, as git prints them`;
  }
  if (unclosedBracket(glob)) return `"${glob}": "[" opens a class that is never closed (write "\\[" for a literal "[")`;
  return undefined;
}

/** Whether a `[` outside a class (and not escaped) has no `]` after it. */
function unclosedBracket(glob: string): boolean {
  let open = false;
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === '\\') i++;
    else if (c === '[' && !open) {
      open = true;
      // `[]` and `[!]`: a `]` right after the opening is a member of the class, not its end.
      if (glob[i + 1] === '!' || glob[i + 1] === '^') i++;
      if (glob[i + 1] === ']') i++;
    } else if (c === ']' && open) open = false;
  }
  return open;
}

/** A compiled glob: `matches(path)` for a repository path without a leading `/`. */
export interface PathGlob {
  glob: string;
  matches(path: string): boolean;
}

/** Compiles globs already accepted by `globProblem` (config load checks them). */
export function compilePathGlob(glob: string): PathGlob {
  const anchored = glob.startsWith('/');
  // matchBase: a glob without a slash is tried against the file's name, wherever the file is.
  const m = new Minimatch(anchored ? glob.slice(1) : glob, { ...BASE, matchBase: !anchored });
  return { glob, matches: (path) => m.match(path) };
}
