import { isAttrPath } from './commands.js';

/**
 * The "OfBorg convention" of Nixpkgs: a commit title names the packages it touches before a colon —
 * `hello: 1.0 -> 2.0`, `python3Packages.requests: 2.31.0 -> 2.32.0`, `foo, bar: fix build`. eka-ci reads those
 * names to know what a pull request means to build without evaluating it.
 *
 * A title only counts when every comma-separated name before the first colon is an attribute path: `nixos/foo:`
 * (a module), `Revert "hello: …"` or prose with a colon yield nothing. The names are a hint, not a promise: a
 * caller still checks that each one exists before building it.
 */

/**
 * Title prefixes that by convention name an area of the repository, not a package. Matched case-insensitively
 * against the whole name and against its first component, so `lib.strings: …` is not a package either.
 */
export const NON_PACKAGE_PREFIXES: readonly string[] = [
  'treewide', // changes across many packages, too many to name
  'doc', // the manual
  'docs',
  'ci', // the repository's own CI
  'release-notes',
  'maintainers', // maintainers/maintainer-list.nix and its scripts
  'lib', // the library of Nix functions
];

const NON_PACKAGES = new Set(NON_PACKAGE_PREFIXES.map((p) => p.toLowerCase()));

/** The attribute names the titles announce, each once, in the order they first appear. */
export function attrsFromCommitTitles(titles: readonly string[]): string[] {
  const seen = new Set<string>();
  for (const title of titles) for (const attr of attrsFromTitle(title)) seen.add(attr);
  return [...seen];
}

function attrsFromTitle(title: string): string[] {
  // Callers may pass whole commit messages; only the first line is the title.
  const first = title.split(/\r?\n/, 1)[0] ?? '';
  const colon = first.indexOf(':');
  if (colon < 0) return [];
  const names = first
    .slice(0, colon)
    .split(',')
    .map((n) => n.trim());
  if (!names.every(isAttrPath)) return [];
  return names.filter((n) => !isNonPackage(n));
}

function isNonPackage(name: string): boolean {
  const lower = name.toLowerCase();
  return NON_PACKAGES.has(lower) || NON_PACKAGES.has(lower.split('.', 1)[0]!);
}
