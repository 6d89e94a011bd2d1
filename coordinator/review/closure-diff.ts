import { storePathName } from '../../common/nix/store-path.js';
import type { DependencyChange } from './model.js';

/**
 * Output names nixpkgs gives non-default outputs, which Nix appends to the store path name (`openssl-3.0.13-bin`).
 * `nix store diff-closures` strips any trailing `-[a-z]+`, which also eats version suffixes such as `-unstable`;
 * a known list is wrong less often. `out` never appears as a suffix but costs nothing to list.
 */
const OUTPUT_SUFFIXES: ReadonlySet<string> = new Set([
  'bin',
  'dev',
  'lib',
  'man',
  'doc',
  'devdoc',
  'info',
  'static',
  'debug',
  'out',
  'lib32',
  'lib64',
]);

export interface DrvName {
  name: string;
  /** '' for names without a version (`source`, `hook`). */
  version: string;
}

/**
 * Splits a derivation name as Nix's `DrvName` does: the version starts after the first `-` that is followed by
 * something other than a letter (`perl5.38.2-URI-5.21` → `perl5.38.2-URI` / `5.21`).
 */
export function splitDrvName(drvName: string): DrvName {
  for (let i = 0; i < drvName.length - 1; i++) {
    if (drvName[i] === '-' && !/[A-Za-z]/.test(drvName[i + 1] ?? '')) {
      return { name: drvName.slice(0, i), version: drvName.slice(i + 1) };
    }
  }
  return { name: drvName, version: '' };
}

/**
 * Package name and version of a store path name, without the output suffix: `openssl-3.0.13-bin` →
 * `openssl` / `3.0.13`. The suffix is only stripped when a version precedes it, so an unversioned `foo-lib` stays
 * the package `foo-lib` rather than becoming the output `lib` of a package `foo`.
 */
export function splitStorePathName(pathName: string): DrvName {
  const dash = pathName.lastIndexOf('-');
  if (dash > 0 && OUTPUT_SUFFIXES.has(pathName.slice(dash + 1))) {
    const stripped = splitDrvName(pathName.slice(0, dash));
    if (stripped.version !== '') return stripped;
  }
  return splitDrvName(pathName);
}

/** Version sets per package name. */
function versionsByName(paths: readonly string[]): Map<string, Set<string>> {
  const grouped = new Map<string, Set<string>>();
  for (const path of paths) {
    const { name, version } = splitStorePathName(storePathName(path));
    let versions = grouped.get(name);
    if (versions === undefined) grouped.set(name, (versions = new Set()));
    versions.add(version);
  }
  return grouped;
}

const versionOrder = new Intl.Collator('en', { numeric: true }).compare;

function sortedVersions(versions: Set<string> | undefined): string[] {
  return [...(versions ?? [])].sort(versionOrder);
}

function sameSet(a: Set<string>, b: Set<string>): boolean {
  return a.size === b.size && [...a].every((v) => b.has(v));
}

/**
 * Runtime-dependency differences between two closures, in the manner of `nix store diff-closures`: store paths are
 * grouped by package name (outputs folded together), and a package is reported when it appears (`added`), goes
 * (`removed`), or its set of versions differs (`changed`, e.g. `[2.38]` → `[2.39]`). A dependency rebuilt at the
 * same version — a new hash, same name and version — is not a change. Sorted by name.
 *
 * Unversioned packages are present with the version ''. Throws RangeError on anything that is not a store path.
 */
export function diffClosures(base: readonly string[], head: readonly string[]): DependencyChange[] {
  const before = versionsByName(base);
  const after = versionsByName(head);
  const names = [...new Set([...before.keys(), ...after.keys()])].sort();
  const changes: DependencyChange[] = [];
  for (const name of names) {
    const b = before.get(name);
    const h = after.get(name);
    if (b !== undefined && h !== undefined && sameSet(b, h)) continue;
    const kind = b === undefined ? 'added' : h === undefined ? 'removed' : 'changed';
    changes.push({ name, base: sortedVersions(b), head: sortedVersions(h), kind });
  }
  return changes;
}

/**
 * The runtime closure of `paths`: the paths themselves and everything they reference, transitively. Iterative, so
 * a deep closure cannot overflow the stack; references to a path already seen (including a path's reference to
 * itself) are followed once. Lookups run one at a time, in case `references` talks to a daemon over one connection.
 * Sorted.
 */
export async function runtimeClosure(
  paths: readonly string[],
  references: (path: string) => readonly string[] | Promise<readonly string[]>,
): Promise<string[]> {
  const seen = new Set<string>(paths);
  const pending = [...seen];
  for (let path = pending.pop(); path !== undefined; path = pending.pop()) {
    for (const ref of await references(path)) {
      if (seen.has(ref)) continue;
      seen.add(ref);
      pending.push(ref);
    }
  }
  return [...seen].sort();
}
