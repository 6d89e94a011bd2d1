/**
 * Real-Nix fixtures for tests: temporary directories, trivial derivations built in the machine's store, and a
 * second store in a private mount namespace.
 */
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, runNix, runNixChecked, type NixResult } from './cli.js';

export const NIX = NIX_EXPERIMENTAL;

export class TempDirs {
  private readonly dirs: string[] = [];

  async make(prefix = 'ekaci-cache-'): Promise<string> {
    const dir = await mkdtemp(join(tmpdir(), prefix));
    this.dirs.push(dir);
    return dir;
  }

  async removeAll(): Promise<void> {
    await Promise.all(this.dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
  }
}

/**
 * The process environment with Nix's narinfo disk cache redirected into `dir`: otherwise answers cached from one
 * test's cache ("not there", "there") would leak into the next test that happens to reuse a URL.
 */
export function nixEnv(dir: string): NodeJS.ProcessEnv {
  return { ...process.env, XDG_CACHE_HOME: join(dir, 'xdg-cache') };
}

export interface Built {
  drv: string;
  out: string;
  /** The output paths of the dependencies, which `out` references. */
  deps: string[];
  /** Unique to this build; the top derivation's build log contains `built <nonce>`. */
  nonce: string;
}

/**
 * Instantiates and builds a derivation with `depCount` dependencies whose output references them all. The nonce
 * makes every call a path nobody has built or cached before.
 */
export async function buildTrivial(dir: string, env: NodeJS.ProcessEnv, depCount = 0): Promise<Built> {
  const nonce = randomUUID().slice(0, 8);
  const deps = Array.from({ length: depCount }, (_, i) => `(mk "dep${i}" "echo dep${i} ${nonce} > $out" {})`).join(' ');
  const expr = `
    let mk = name: script: extra: derivation ({
      name = "ekaci-cache-test-\${name}-${nonce}";
      system = builtins.currentSystem;
      builder = "/bin/sh";
      args = [ "-c" script ];
    } // extra);
    deps = [ ${deps} ];
    in mk "top" "echo built ${nonce} >&2; echo hi ${nonce} $deps > $out" { deps = deps; }
  `;
  const file = join(dir, `${nonce}.nix`);
  await writeFile(file, expr);
  const drv = (await runNixChecked('nix-instantiate', [file, ...NO_SUBSTITUTERS], { env })).trim();
  const out = (await runNixChecked('nix-store', ['-r', drv, ...NO_SUBSTITUTERS], { env })).trim();
  const refs = (await runNixChecked('nix-store', ['-q', '--references', out], { env })).split('\n').filter(Boolean);
  return { drv, out, deps: refs, nonce };
}

/**
 * Runs a Nix command against a store of its own: a private mount namespace with an empty directory over /nix.
 * Debian's Nix lives in /usr, so it still runs, but nothing of the machine's store is visible to it.
 */
export function inFreshStore(emptyDir: string, env: NodeJS.ProcessEnv, command: string[]): Promise<NixResult> {
  const ownEnv = {
    ...env,
    // Another host has its own narinfo disk cache. Sharing it would hand this store the narinfos exactly as the
    // uploading agent sent them, before the coordinator re-signed them.
    XDG_CACHE_HOME: join(emptyDir, '.xdg-cache'),
    // Build users are machine-wide but their locks live in each store: two stores would both take nixbld1, and
    // Nix kills every process of a build user before building, i.e. the other store's build. Build as root.
    NIX_CONFIG: 'build-users-group =',
  };
  return runNix('unshare', ['-m', 'sh', '-c', 'mount --bind "$0" /nix && exec "$@"', emptyDir, ...command], {
    env: ownEnv,
  });
}

/**
 * `nix-store --realise path` in an empty store (see `inFreshStore`) that substitutes from `cache` alone — a binary
 * cache's URL or directory — trusting only `publicKey`.
 */
export function realiseFromCache(
  emptyDir: string,
  env: NodeJS.ProcessEnv,
  path: string,
  cache: { url: string; publicKey: string },
): Promise<NixResult> {
  return inFreshStore(emptyDir, env, [
    'nix-store',
    '--realise',
    path,
    ...['--option', 'substituters', cache.url, '--option', 'trusted-public-keys', cache.publicKey],
  ]);
}
