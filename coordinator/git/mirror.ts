import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { GitCommandError, GitFetchError, GitRevisionError } from './errors.js';
import { fetchEnv, gitReason, redact, remoteConfig, runGit, type GitAuth, type GitResult } from './git-process.js';
import { Mutex } from './mutex.js';
import type { RepoLocation } from './repo-url.js';
import { ABBREVIATED_SHA, parseRevision, refspec, type Revision } from './revision.js';

/** A file of a commit (`Mirror.fileAt`). */
export type FileAtCommit = { kind: 'file'; text: string } | { kind: 'missing' } | { kind: 'other'; what: string };

export interface MirrorContext {
  env: NodeJS.ProcessEnv;
  askpass: string;
  fetchTimeoutMs: number;
  localTimeoutMs: number;
  logger: Logger;
}

/**
 * A transfer slower than this many bytes per second for `HTTP_LOW_SPEED_TIME_S` is abandoned: a stalled connection
 * then fails within a minute instead of holding the mirror's lock until the whole fetch timeout.
 */
const HTTP_LOW_SPEED_LIMIT = 1000;
const HTTP_LOW_SPEED_TIME_S = 60;

/**
 * - `absent`: no bare repository on disk yet (or its creation failed; the next use tries again).
 * - `creating`: `git init --bare` into a temporary directory that is then renamed into place, so a crash never leaves
 *   a half-made mirror under the real name.
 * - `ready`: fetches and worktree changes run, one at a time, under the mirror's lock.
 */
export type MirrorState = 'absent' | 'creating' | 'ready';

const TRANSITIONS: Record<MirrorState, readonly MirrorState[]> = {
  absent: ['creating', 'ready'],
  creating: ['ready', 'absent'],
  ready: [],
};

/**
 * The bare mirror of one repository. Everything that writes to it (fetch, worktree add/remove/prune) holds its lock:
 * git guards its own files with `*.lock` files and makes a concurrent second writer fail rather than wait.
 */
// Commit ids remembered per mirror (about 100 bytes each): a day of a busy repository's pull requests and bases.
const MAX_REMEMBERED_COMMITS = 10_000;

export class Mirror {
  private state: MirrorState = 'absent';
  private opening: Promise<void> | undefined;
  private readonly lock = new Mutex();
  /**
   * Commits fetched by sha, which stay in the mirror (their `refs/ekaci/commits/` ref keeps them from gc): asking for
   * one again costs no `git cat-file` process, and a busy coordinator asks for the same bases all day. Commits found
   * only through a branch are not remembered: a force-push could let gc take them.
   */
  private readonly present = new Set<string>();
  /** Other mirrors borrow this one's objects: it never prunes (`borrowObjectsOf`). */
  private lends = false;

  constructor(
    readonly location: RepoLocation,
    readonly dir: string,
    private readonly context: MirrorContext,
  ) {}

  /** Makes every revision present and returns its commit sha; a commit already present costs no network. */
  async fetch(revs: readonly string[], auth: GitAuth | undefined): Promise<Map<string, string>> {
    const parsed = [...new Set(revs)].map((rev) => this.parse(rev));
    const shas = new Map<string, string>();
    if (parsed.length === 0) return shas;
    await this.open();
    const pending = await this.withoutPresentCommits(parsed, shas);
    if (pending.length === 0) return shas;
    return this.lock.run(async () => {
      // Another caller may have fetched these while we waited for the lock.
      const missing = await this.withoutPresentCommits(pending, shas);
      if (missing.length > 0) await this.fetchFromRemote(missing, auth);
      for (const revision of missing) {
        shas.set(revision.text, await this.resolveLocal(revision));
        // Fetched by its sha, the commit now has a ref of its own: it stays, whatever happens to branches.
        if (revision.kind === 'commit') this.remember(revision.sha);
      }
      return shas;
    });
  }

  /**
   * The titles (first lines of the messages) of the commits reachable from `head` but not from `base`, newest first,
   * at most `limit`. Both must be commits the mirror has (read-only, so no lock).
   */
  async titles(base: string, head: string, limit: number): Promise<string[]> {
    const [from, to] = [this.parse(base), this.parse(head)];
    if (from.kind !== 'commit' || to.kind !== 'commit') {
      throw new GitRevisionError(
        `commit titles need two full commit shas, got ${base} and ${head}`,
        this.location.display,
        head,
      );
    }
    await this.open();
    const range = `${from.sha}..${to.sha}`;
    const out = await this.git(['log', '--format=%s', `--max-count=${limit}`, range], `list the commits ${range}`);
    return out.split('\n').filter((line) => line !== '');
  }

  /**
   * The paths of the files the change from `base` to `head` touches: `git diff base...head`, from their merge base,
   * so what the base branch did meanwhile does not count. A rename is its old and its new path (a file moved out of
   * `doc/` is not a documentation-only change). Both must be full commit shas the mirror has (read-only, so no lock).
   */
  async changedFiles(base: string, head: string): Promise<string[]> {
    const [from, to] = this.fullShas('changed files', base, head);
    await this.open();
    const range = `${from}...${to}`;
    const out = await this.git(
      ['diff', '--name-only', '--no-renames', '--no-ext-diff', '-z', range, '--'],
      `list the files changed in ${range}`,
    );
    return out.split('\0').filter((path) => path !== '');
  }

  /**
   * A file of a commit the mirror has, without a worktree. Symbolic links are followed inside the repository
   * (`cat-file --follow-symlinks`); one that leads out of it, loops or names a directory is `other`.
   */
  async fileAt(commit: string, path: string): Promise<FileAtCommit> {
    const [sha] = this.fullShas('a file', commit);
    await this.open();
    const out = await this.git(
      ['cat-file', '--batch', '--follow-symlinks'],
      `read ${path} at ${sha}`,
      true,
      `${sha}:${path}\n`,
    );
    const newline = out.indexOf('\n');
    const header = (newline < 0 ? out : out.slice(0, newline)).split(' ');
    if (header[1] === 'blob') return { kind: 'file', text: out.slice(newline + 1, -1) };
    if (header.at(-1) === 'missing' || header[0] === 'dangling' || header[0] === 'notdir') return { kind: 'missing' };
    if (header[1] === 'tree') return { kind: 'other', what: 'a directory' };
    if (header[0] === 'symlink') return { kind: 'other', what: 'a symbolic link out of the repository' };
    if (header[0] === 'loop') return { kind: 'other', what: 'a loop of symbolic links' };
    return { kind: 'other', what: `a ${header[1] ?? header[0] ?? 'thing'} object` };
  }

  private fullShas(what: string, ...revs: string[]): string[] {
    return revs.map((rev) => {
      const revision = this.parse(rev);
      if (revision.kind !== 'commit') {
        throw new GitRevisionError(
          `${what} need full commit shas, got ${revs.join(' and ')}`,
          this.location.display,
          rev,
        );
      }
      return revision.sha;
    });
  }

  /**
   * Makes this mirror read objects it lacks from `lender`'s (git alternates: `objects/info/alternates`), so a fetch
   * into it brings only what `lender` does not have — git counts the lender's refs as what it has. The lender is
   * told never to prune unreachable objects (`gc.pruneExpire=never`): one that a force-push left unreachable there
   * may be what a borrower's commits build on. Nothing happens when both are the same repository.
   */
  async borrowObjectsOf(lender: Mirror): Promise<void> {
    if (lender === this || lender.dir === this.dir) return;
    await lender.open();
    if (!lender.lends) {
      await lender.lock.run(() => lender.git(['config', 'gc.pruneExpire', 'never'], 'keep objects others borrow'));
      lender.lends = true;
    }
    await this.open();
    await this.lock.run(async () => {
      const file = join(this.dir, 'objects', 'info', 'alternates');
      const objects = join(lender.dir, 'objects');
      const listed = existsSync(file) ? (await readFile(file, 'utf8')).split('\n') : [];
      if (listed.includes(objects)) return;
      await mkdir(dirname(file), { recursive: true });
      await writeFile(file, [...listed.filter((line) => line !== ''), objects, ''].join('\n'));
      this.context.logger.info(
        { repo: this.location.display, from: lender.location.display },
        'mirror borrows objects',
      );
    });
  }

  /** Adds a detached worktree of `commit` at `path`, replacing whatever a failed earlier removal left there. */
  addWorktree(path: string, commit: string): Promise<void> {
    return this.lock.run(async () => {
      if (existsSync(path)) {
        await rm(path, { recursive: true, force: true });
        await this.git(['worktree', 'prune'], 'prune worktrees');
      }
      await this.git(['worktree', 'add', '--detach', '--quiet', path, commit], `check out ${commit}`);
    });
  }

  /** Removes the worktree at `path`; a worktree git no longer knows (deleted by hand) is removed from disk anyway. */
  removeWorktree(path: string): Promise<void> {
    return this.lock.run(async () => {
      const removed = await this.run(['worktree', 'remove', '--force', path]);
      if (removed.code !== 0) {
        this.context.logger.warn({ path, stderr: gitReason(removed.stderr) }, 'git worktree remove failed; deleting');
        await rm(path, { recursive: true, force: true });
      }
      await this.git(['worktree', 'prune'], 'prune worktrees');
    });
  }

  private parse(rev: string): Revision {
    const parsed = parseRevision(rev);
    if (typeof parsed === 'string') {
      throw new GitRevisionError(
        `cannot fetch '${rev}' from ${this.location.display}: ${parsed}, so it is neither a ref name nor a full commit sha`,
        this.location.display,
        rev,
      );
    }
    return parsed;
  }

  private open(): Promise<void> {
    if (this.state === 'ready') return Promise.resolve();
    this.opening ??= this.create().finally(() => (this.opening = undefined));
    return this.opening;
  }

  private async create(): Promise<void> {
    if (existsSync(join(this.dir, 'HEAD'))) return this.transition('ready');
    this.transition('creating');
    const temporary = join(dirname(this.dir), `.tmp-${basename(this.dir)}-${randomBytes(4).toString('hex')}`);
    try {
      await mkdir(dirname(this.dir), { recursive: true });
      await this.git(['init', '--bare', '--quiet', temporary], 'create the mirror', false);
      await rename(temporary, this.dir);
      this.transition('ready');
      this.context.logger.info({ repo: this.location.display, mirror: this.dir }, 'created git mirror');
    } catch (err) {
      await rm(temporary, { recursive: true, force: true });
      this.transition('absent');
      throw err;
    }
  }

  private transition(to: MirrorState): void {
    if (!TRANSITIONS[this.state].includes(to)) {
      throw new IllegalStateError(`git mirror ${this.dir} cannot go from ${this.state} to ${to}`);
    }
    this.state = to;
  }

  private async withoutPresentCommits(revisions: Revision[], shas: Map<string, string>): Promise<Revision[]> {
    const missing: Revision[] = [];
    for (const revision of revisions) {
      if (revision.kind === 'commit' && (await this.hasCommit(revision.sha))) shas.set(revision.text, revision.sha);
      else missing.push(revision);
    }
    return missing;
  }

  private async hasCommit(sha: string): Promise<boolean> {
    if (this.present.has(sha)) return true;
    return (await this.run(['cat-file', '-e', `${sha}^{commit}`])).code === 0;
  }

  private remember(sha: string): void {
    if (this.present.size >= MAX_REMEMBERED_COMMITS) this.present.delete(this.present.values().next().value!);
    this.present.add(sha);
  }

  private async fetchFromRemote(revisions: Revision[], auth: GitAuth | undefined): Promise<void> {
    const started = Date.now();
    const args = [
      ...remoteConfig(auth),
      // Auto-gc in the foreground, inside this lock: a detached gc would hold git's lock files while we fetch again.
      ...['-c', 'gc.autoDetach=false', '-c', 'maintenance.autoDetach=false'],
      ...['-c', `http.lowSpeedLimit=${HTTP_LOW_SPEED_LIMIT}`, '-c', `http.lowSpeedTime=${HTTP_LOW_SPEED_TIME_S}`],
      ...['fetch', '--quiet', '--no-tags', '--no-write-fetch-head', '--end-of-options'],
      this.location.fetchUrl,
      ...revisions.map(refspec),
    ];
    const env = fetchEnv(this.context.env, this.context.askpass, auth);
    const result = await this.run(args, env, this.context.fetchTimeoutMs);
    if (result.code !== 0) throw this.fetchFailure(revisions, result, auth);
    const revs = revisions.map((r) => r.text);
    this.context.logger.info({ repo: this.location.display, revs, ms: Date.now() - started }, 'fetched');
  }

  private fetchFailure(revisions: Revision[], result: GitResult, auth: GitAuth | undefined): Error {
    const names = revisions.map((r) => `'${r.text}'`).join(', ');
    const repo = this.location.display;
    if (result.timedOut) {
      return new GitFetchError(
        `fetching ${names} from ${repo} timed out after ${this.context.fetchTimeoutMs / 1000} s: the server stalled, ` +
          'or the transfer needs more time than the fetch timeout allows',
      );
    }
    const stderr = this.location.hidden.reduce(
      (text, part) => text.split(part).join('?…'),
      redact(result.stderr, auth),
    );
    const missing = /couldn't find remote ref (\S+)|not our ref ([0-9a-f]+)/.exec(stderr);
    if (missing) {
      const name = missing[1] ?? missing[2];
      const revision = revisions.find((r) => r.text === name || (r.kind === 'commit' && r.sha === name));
      if (revision) return this.unknownRevision(revision);
    }
    const needsCredentials = /Authentication failed|could not read (Username|Password)|returned error: 40[13]/.test(
      stderr,
    );
    const hint = needsCredentials ? ' — the repository needs credentials, or refused the ones given' : '';
    return new GitFetchError(
      `could not fetch ${names} from ${repo} (git exit ${result.code ?? 'by signal'}): ${gitReason(stderr)}${hint}`,
    );
  }

  private unknownRevision(revision: Revision): GitRevisionError {
    const repo = this.location.display;
    const what =
      revision.kind === 'commit'
        ? `no commit ${revision.sha} that it will serve`
        : `no branch, tag or ref named '${revision.text}'` +
          (ABBREVIATED_SHA.test(revision.text) ? ' (abbreviated commit ids cannot be fetched: use the full sha)' : '');
    return new GitRevisionError(`revision '${revision.text}' not found: ${repo} has ${what}`, repo, revision.text);
  }

  private async resolveLocal(revision: Revision): Promise<string> {
    if (revision.kind === 'commit') {
      if (await this.hasCommit(revision.sha)) return revision.sha;
    } else {
      const resolved = await this.run([
        'rev-parse',
        '--verify',
        '--quiet',
        '--end-of-options',
        `${revision.localRef}^{commit}`,
      ]);
      if (resolved.code === 0) return resolved.stdout.trim();
    }
    const repo = this.location.display;
    throw new GitRevisionError(`revision '${revision.text}' in ${repo} is not a commit`, repo, revision.text);
  }

  /** Runs a local command that must succeed. */
  private async git(args: string[], what: string, inMirror = true, input?: string): Promise<string> {
    const result = await this.run(args, this.context.env, this.context.localTimeoutMs, inMirror, input);
    if (result.code !== 0) {
      const why = result.timedOut ? `timed out after ${this.context.localTimeoutMs} ms` : gitReason(result.stderr);
      throw new GitCommandError(`could not ${what} in the mirror of ${this.location.display}: ${why}`);
    }
    return result.stdout;
  }

  private run(
    args: string[],
    env = this.context.env,
    timeoutMs = this.context.localTimeoutMs,
    inMirror = true,
    input?: string,
  ): Promise<GitResult> {
    // A hook configured globally (core.hooksPath) must not run in eka-ci's mirrors or worktrees.
    const prefix = inMirror ? [`--git-dir=${this.dir}`, '-c', 'core.hooksPath=/dev/null'] : [];
    return runGit([...prefix, ...args], { env, timeoutMs, ...(input === undefined ? {} : { input }) });
  }
}
