import { createHash } from 'node:crypto';
import { mkdirSync, readlinkSync, symlinkSync, unlinkSync } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';

/** Nix's state directory, where the collector looks for `gcroots/auto`. */
function nixStateDir(): string {
  return process.env.NIX_STATE_DIR ?? '/nix/var/nix';
}

/**
 * Keeps `.drv` files alive as indirect GC roots, the way `nix-store --add-root --indirect` does: a symlink
 * `dir/<drv name>` → the `.drv`, registered by a symlink in `gcroots/auto` pointing at it. Deleting the file in
 * `dir` releases the root. No Nix process runs per root (`nix-store -r --add-root` would build the derivation).
 */
export class GcRoots {
  private ready = false;

  /** `stateDir`: the state directory of the store the roots are for (the evaluation store's, or Nix's own). */
  constructor(
    readonly dir: string,
    private readonly stateDir = nixStateDir(),
  ) {}

  /**
   * Synchronous on purpose: an evaluation adds one root per derivation (100,000 for nixpkgs), and two `symlink`
   * system calls cost a few microseconds where the promise API's round trip through the thread pool cost ten times
   * that in the event loop, in the way of the evaluator's next request.
   */
  add(drvPath: string): void {
    if (!this.ready) {
      // A fresh store has no gcroots/auto until something first registers an indirect root.
      mkdirSync(this.dir, { recursive: true });
      mkdirSync(join(this.stateDir, 'gcroots', 'auto'), { recursive: true });
      this.ready = true;
    }
    const link = resolve(join(this.dir, basename(drvPath)));
    replaceSymlink(drvPath, link);
    replaceSymlink(link, autoRoot(link, this.stateDir));
  }
}

/**
 * Where the collector finds the indirect root `link`. A registration in another store's state directory (the
 * evaluation store's) is dropped by that store's collector once `link` is gone.
 */
function autoRoot(link: string, stateDir = nixStateDir()): string {
  const id = createHash('sha256').update(link).digest('hex').slice(0, 32);
  return join(stateDir, 'gcroots', 'auto', `ekaci-${id}`);
}

/**
 * Releases the roots of the commits' evaluations (`<rootsDir>/<commit>/`, one `GcRoots` directory each): their
 * .drv files become collectable. The registrations in `gcroots/auto` go too (Nix would drop them, dangling, at its
 * next collection anyway).
 */
export async function releaseCommitRoots(rootsDir: string, commits: readonly string[]): Promise<void> {
  for (const commit of commits) {
    const dir = resolve(join(rootsDir, commit));
    const links = await readdir(dir).catch(() => [] as string[]);
    for (const name of links) await rm(autoRoot(join(dir, name)), { force: true });
    await rm(dir, { recursive: true, force: true });
  }
}

function replaceSymlink(target: string, path: string): void {
  try {
    symlinkSync(target, path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
    if (readlinkSync(path) === target) return;
    unlinkSync(path);
    symlinkSync(target, path);
  }
}
