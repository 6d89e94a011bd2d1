import { createHash } from 'node:crypto';
import { mkdirSync, readlinkSync, symlinkSync, unlinkSync } from 'node:fs';
import { readdir, rm } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';

/** Nix's state directory, where the collector looks for `gcroots/auto`. */
function nixStateDir(): string {
  return process.env.NIX_STATE_DIR ?? '/nix/var/nix';
}

/**
 * Registers an indirect root: makes the collector of a store follow `link` (a symlink of ours to a store path).
 * Directly, by a symlink in the store's `gcroots/auto` (`directRegistrar`), where the coordinator may write the
 * store's state directory (its evaluation store, a store it owns); else through the store's nix-daemon
 * (wopAddIndirectRoot), as an unprivileged user of a multi-user host must.
 */
export type RootRegistrar = (link: string) => void | Promise<void>;

/** Registration by a symlink in `<stateDir>/gcroots/auto` (Nix's own state directory by default). */
export function directRegistrar(stateDir = nixStateDir()): RootRegistrar {
  let ready = false;
  return (link) => {
    // A fresh store has no gcroots/auto until something first registers an indirect root.
    if (!ready) mkdirSync(join(stateDir, 'gcroots', 'auto'), { recursive: true });
    ready = true;
    replaceSymlink(link, autoRoot(link, stateDir));
  };
}

/**
 * Keeps `.drv` files alive as indirect GC roots, the way `nix-store --add-root --indirect` does: a symlink
 * `dir/<drv name>` → the `.drv`, registered with the store's collector (see RootRegistrar). Deleting the file in
 * `dir` releases the root. No Nix process runs per root (`nix-store -r --add-root` would build the derivation).
 */
export class GcRoots {
  private ready = false;

  constructor(
    readonly dir: string,
    private readonly register: RootRegistrar = directRegistrar(),
  ) {}

  /**
   * Synchronous where the registration is: an evaluation adds a root per chunk of attributes, and two `symlink`
   * system calls cost a few microseconds where the promise API's round trip through the thread pool cost ten times
   * that in the event loop, in the way of the evaluator's next request.
   */
  add(storePath: string): void | Promise<void> {
    if (!this.ready) {
      mkdirSync(this.dir, { recursive: true });
      this.ready = true;
    }
    const link = resolve(join(this.dir, basename(storePath)));
    replaceSymlink(storePath, link);
    return this.register(link);
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
    // A multi-user host's gcroots/auto is root's: there the registrations stay, dangling, until the collector drops
    // them, as it drops any whose link is gone.
    for (const name of links) await rm(autoRoot(join(dir, name)), { force: true }).catch(() => undefined);
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
