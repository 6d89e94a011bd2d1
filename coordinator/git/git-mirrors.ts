import { chmod, mkdir, readdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '../../common/logging.js';
import { ASKPASS_SCRIPT, baseGitEnv, runGit, type GitAuth } from './git-process.js';
import { type FileAtCommit, Mirror, type MirrorContext } from './mirror.js';
import { parseRepoUrl } from './repo-url.js';

export type { GitAuth } from './git-process.js';
export type { FileAtCommit } from './mirror.js';

/**
 * Ceiling on one fetch. The first fetch of a nixpkgs-sized repository moves ≈4 GiB; 30 minutes allows for that on a
 * slow link, while a stalled connection fails much sooner through git's http low-speed limit.
 */
export const FETCH_TIMEOUT_MS = 30 * 60_000;

/**
 * Ceiling on a local command (worktree add/remove, init). Checking out is bound by the disk: 20,000 small files took
 * 0.33 s on tmpfs and 12–16 s on this machine's ext4 under load; nixpkgs has ≈45,000.
 */
export const LOCAL_GIT_TIMEOUT_MS = 10 * 60_000;

export interface GitMirrorsOptions {
  /** eka-ci's own directory under the coordinator's data dir; nothing else may write here. */
  dir: string;
  logger: Logger;
  /** The environment git runs in (PATH, proxies, CA bundles); the coordinator's own by default. */
  env?: NodeJS.ProcessEnv;
  fetchTimeoutMs?: number;
}

export interface FetchOptions {
  /** Sent only when the server asks (401), only to that host, through an askpass helper: see `ASKPASS_SCRIPT`. */
  auth?: GitAuth;
  /**
   * The URL of the repository this one is a fork of (a pull request's base): the fork's mirror borrows the base
   * mirror's objects (git alternates), so fetching a fork's pull request brings only what the fork adds, not a second
   * copy of the whole history.
   */
  objectsFrom?: string;
}

/** Where the mirrors under a git directory (`<data dir>/git`) keep `url`'s bare mirror. */
export function mirrorDirFor(gitDir: string, url: string): string {
  return join(gitDir, 'mirrors', parseRepoUrl(url).mirrorName);
}

/** A worktree of one commit, shared by everyone who asked for that commit until the last one releases it. */
export interface Checkout {
  dir: string;
  commit: string;
  /** The bare mirror whose objects the worktree uses (git reads it through the worktree's `.git` file). */
  gitDir: string;
  /** Gives up this holder's share; the last release removes the worktree. Calling it again does nothing. */
  release(): Promise<void>;
}

/**
 * One worktree per commit, keyed by sha alone: a sha names the same tree in every repository, so a fork's pull
 * request and its upstream share one checkout (each caller's repository is still asked whether it has the commit).
 *
 * - `creating`: `git worktree add` is running; later callers wait for it and share the result, or its error.
 * - `ready`: held by `holders` callers.
 * - `removing`: the last holder released it; a caller asking for the commit now waits, then creates it anew.
 */
interface SharedCheckout {
  state: 'creating' | 'ready' | 'removing';
  holders: number;
  mirror: Mirror;
  created: Promise<void>;
  removed?: Promise<void>;
}

/**
 * The coordinator's git layer: a bare mirror per repository, fetched on demand (only the revisions asked for), and
 * reference-counted worktrees of single commits.
 *
 * Layout under `dir`: `mirrors/<slug>-<hash>.git`, `worktrees/<sha>`, `askpass.sh`. Checkouts live only in memory,
 * so every worktree found on disk at construction is a leftover of a crash and is removed before any other call runs.
 * One GitMirrors per `dir`.
 */
export class GitMirrors {
  readonly dir: string;
  private readonly logger: Logger;
  private readonly context: MirrorContext;
  private readonly mirrors = new Map<string, Mirror>();
  private readonly checkouts = new Map<string, SharedCheckout>();
  private readonly started: Promise<void>;

  constructor(options: GitMirrorsOptions) {
    this.dir = options.dir;
    this.logger = options.logger;
    this.context = {
      env: baseGitEnv(options.env ?? process.env),
      askpass: join(this.dir, 'askpass.sh'),
      fetchTimeoutMs: options.fetchTimeoutMs ?? FETCH_TIMEOUT_MS,
      localTimeoutMs: LOCAL_GIT_TIMEOUT_MS,
      logger: this.logger,
    };
    this.started = this.prepare();
    // Every public method awaits `started` and reports its failure; this only stops an unawaited one crashing us.
    void this.started.catch(() => undefined);
  }

  /** Resolves once leftovers of an earlier run are cleaned up; every method waits for this itself. */
  ready(): Promise<void> {
    return this.started;
  }

  /** The bare mirror's directory for `url` (which need not exist yet). */
  mirrorDir(url: string): string {
    return mirrorDirFor(this.dir, url);
  }

  /**
   * Fetches `revs` (full commit shas or ref names: `refs/pull/1/head`, `refs/heads/main`, `main`, `HEAD`) in one
   * round trip and returns each one's commit sha. Commits already in the mirror are not fetched again.
   */
  async fetch(url: string, revs: readonly string[], options: FetchOptions = {}): Promise<Map<string, string>> {
    await this.started;
    const mirror = this.mirrorFor(url);
    if (options.objectsFrom !== undefined) await mirror.borrowObjectsOf(this.mirrorFor(options.objectsFrom));
    return mirror.fetch(revs, options.auth);
  }

  /** The full sha of the commit `rev` names, fetched if the mirror lacks it. */
  async ensureCommit(url: string, rev: string, options: FetchOptions = {}): Promise<string> {
    const shas = await this.fetch(url, [rev], options);
    return shas.get(rev)!;
  }

  /** The titles of the commits in `head` but not in `base` (full shas the mirror has), newest first, at most `limit`. */
  async commitTitles(url: string, base: string, head: string, limit: number): Promise<string[]> {
    await this.started;
    return this.mirrorFor(url).titles(base, head, limit);
  }

  /**
   * The files the change from `base` to `head` touches (see `Mirror.changedFiles`), both fetched first if the mirror
   * lacks them. For a fork, the head's mirror must borrow the base repository's objects (`fetch` with `objectsFrom`).
   */
  async changedFiles(url: string, base: string, head: string, options: FetchOptions = {}): Promise<string[]> {
    const shas = await this.fetch(url, [base, head], options);
    return this.mirrorFor(url).changedFiles(shas.get(base)!, shas.get(head)!);
  }

  /** A file of the commit `rev` names, read from the mirror without a worktree (see `Mirror.fileAt`). */
  async fileAt(url: string, rev: string, path: string, options: FetchOptions = {}): Promise<FileAtCommit> {
    const commit = await this.ensureCommit(url, rev, options);
    return this.mirrorFor(url).fileAt(commit, path);
  }

  /** A worktree of the commit `rev` names; concurrent calls for one commit share a single worktree. */
  async checkout(url: string, rev: string, options: FetchOptions = {}): Promise<Checkout> {
    const commit = await this.ensureCommit(url, rev, options);
    return this.acquire(this.mirrorFor(url), commit);
  }

  private async acquire(mirror: Mirror, commit: string): Promise<Checkout> {
    for (;;) {
      const existing = this.checkouts.get(commit);
      if (existing?.state === 'removing') {
        await existing.removed;
        continue;
      }
      const shared = existing ?? this.create(mirror, commit);
      shared.holders += 1;
      await shared.created;
      return this.handle(commit, shared);
    }
  }

  private create(mirror: Mirror, commit: string): SharedCheckout {
    const path = this.worktreeDir(commit);
    const started = Date.now();
    const shared: SharedCheckout = {
      state: 'creating',
      holders: 0,
      mirror,
      created: mirror.addWorktree(path, commit).then(
        () => {
          shared.state = 'ready';
          this.logger.debug({ commit, path, ms: Date.now() - started }, 'worktree added');
        },
        (err: unknown) => {
          this.checkouts.delete(commit);
          throw err;
        },
      ),
    };
    this.checkouts.set(commit, shared);
    return shared;
  }

  private handle(commit: string, shared: SharedCheckout): Checkout {
    let released = false;
    return {
      dir: this.worktreeDir(commit),
      commit,
      gitDir: shared.mirror.dir,
      release: () => {
        if (released) return Promise.resolve();
        released = true;
        return this.release(commit, shared);
      },
    };
  }

  private release(commit: string, shared: SharedCheckout): Promise<void> {
    shared.holders -= 1;
    if (shared.holders > 0) return Promise.resolve();
    shared.state = 'removing';
    const path = this.worktreeDir(commit);
    shared.removed = shared.mirror
      .removeWorktree(path)
      .then(
        () => this.logger.debug({ commit, path }, 'worktree removed'),
        // The caller cannot act on this; the next checkout of the commit, or the next start, clears the leftover.
        (err: unknown) => this.logger.error({ err, commit, path }, 'could not remove worktree'),
      )
      .finally(() => {
        if (this.checkouts.get(commit) === shared) this.checkouts.delete(commit);
      });
    return shared.removed;
  }

  private mirrorFor(url: string): Mirror {
    const location = parseRepoUrl(url);
    let mirror = this.mirrors.get(location.mirrorName);
    if (!mirror) {
      mirror = new Mirror(location, join(this.dir, 'mirrors', location.mirrorName), this.context);
      this.mirrors.set(location.mirrorName, mirror);
    }
    return mirror;
  }

  private worktreeDir(commit: string): string {
    return join(this.dir, 'worktrees', commit);
  }

  /** Removes what a crashed run left: every worktree directory, half-created mirrors, and git's records of both. */
  private async prepare(): Promise<void> {
    const mirrorsDir = join(this.dir, 'mirrors');
    const worktreesDir = join(this.dir, 'worktrees');
    await mkdir(mirrorsDir, { recursive: true });
    await mkdir(worktreesDir, { recursive: true });
    await writeFile(this.context.askpass, ASKPASS_SCRIPT, { mode: 0o700 });
    await chmod(this.context.askpass, 0o700);
    const stale = await readdir(worktreesDir);
    await Promise.all(stale.map((name) => rm(join(worktreesDir, name), { recursive: true, force: true })));
    const mirrors = await readdir(mirrorsDir);
    for (const name of mirrors) {
      const dir = join(mirrorsDir, name);
      if (name.startsWith('.tmp-')) {
        await rm(dir, { recursive: true, force: true });
        continue;
      }
      const pruned = await runGit([`--git-dir=${dir}`, 'worktree', 'prune'], {
        env: this.context.env,
        timeoutMs: this.context.localTimeoutMs,
      });
      if (pruned.code !== 0) this.logger.warn({ mirror: dir, stderr: pruned.stderr }, 'git worktree prune failed');
    }
    if (stale.length > 0) this.logger.info({ worktrees: stale.length }, 'removed worktrees left by an earlier run');
  }
}
