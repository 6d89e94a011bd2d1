import { existsSync } from 'node:fs';
import { mkdir, readFile, readdir, rename, writeFile } from 'node:fs/promises';
import { basename, join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { GitRevisionError } from './errors.js';
import { GitMirrors } from './git-mirrors.js';
import { TempDirs, TestRepo, testGitEnv } from './test-support.js';

const temp = new TempDirs();
let source: TestRepo;
let first: string;
let second: string;
let pull: string;

beforeAll(async () => {
  source = await TestRepo.create(join(await temp.make('ekaci-git-src-'), 'source'));
  first = await source.commit('first', { 'default.nix': '{ }: 1\n', 'pkgs/a.nix': 'a\n' });
  second = await source.commit('second', { 'default.nix': '{ }: 2\n', 'pkgs/b/c.nix': 'c\n' });
  await source.git('checkout', '--quiet', '-b', 'feature', first);
  pull = await source.commit('a pull request', { 'pkgs/a.nix': 'a from a fork\n' });
  await source.git('checkout', '--quiet', 'main');
  // GitHub publishes pull requests under refs/pull/N/head, outside refs/heads.
  await source.git('update-ref', 'refs/pull/1/head', pull);
});
afterAll(() => temp.removeAll());

interface Traced {
  mirrors: GitMirrors;
  /** The git commands run so far, from git's own GIT_TRACE. */
  commands: () => Promise<string[]>;
}

async function newMirrors(dir?: string): Promise<Traced> {
  const root = dir ?? (await temp.make('ekaci-git-mirrors-'));
  const trace = join(await temp.make('ekaci-git-trace-'), 'trace');
  const mirrors = new GitMirrors({ dir: root, logger: silentLogger(), env: testGitEnv({ GIT_TRACE: trace }) });
  const commands = async () =>
    existsSync(trace)
      ? (await readFile(trace, 'utf8')).split('\n').filter((line) => line.includes('trace: built-in: git '))
      : [];
  return { mirrors, commands };
}

/** Every file of a directory (relative path → content), git's own metadata aside. */
async function filesIn(dir: string): Promise<Record<string, string>> {
  const files: Record<string, string> = {};
  for (const entry of await readdir(dir, { recursive: true, withFileTypes: true })) {
    const path = relative(dir, join(entry.parentPath, entry.name));
    if (entry.isFile() && path !== '.git') files[path] = await readFile(join(dir, path), 'utf8');
  }
  return files;
}

async function filesOfCommit(repo: TestRepo, commit: string): Promise<Record<string, string>> {
  const files: Record<string, string> = {};
  for (const path of (await repo.git('ls-tree', '-r', '--name-only', commit)).split('\n')) {
    files[path] = (await repo.git('show', `${commit}:${path}`)) + '\n';
  }
  return files;
}

describe('GitMirrors.commitTitles', () => {
  it('lists the titles of the commits the head has and the base has not, newest first, up to a limit', async () => {
    const { mirrors } = await newMirrors();
    await mirrors.fetch(source.dir, [first, second, pull]);
    await source.git('checkout', '--quiet', '-b', 'titles', second);
    const third = await source.commit('hello: 1.0 -> 2.0\n\nThe body is not the title.', { 'hello.nix': '2\n' });
    await source.git('checkout', '--quiet', 'main');
    await mirrors.ensureCommit(source.dir, third);
    expect(await mirrors.commitTitles(source.dir, first, third, 10)).toEqual(['hello: 1.0 -> 2.0', 'second']);
    expect(await mirrors.commitTitles(source.dir, first, third, 1)).toEqual(['hello: 1.0 -> 2.0']);
    expect(await mirrors.commitTitles(source.dir, second, pull, 10)).toEqual(['a pull request']);
    await expect(mirrors.commitTitles(source.dir, 'main', third, 10)).rejects.toBeInstanceOf(GitRevisionError);
  });
});

describe('GitMirrors.ensureCommit', () => {
  it('fetches a branch tip and an older commit by its full sha', async () => {
    const { mirrors } = await newMirrors();

    expect(await mirrors.ensureCommit(source.dir, 'main')).toBe(second);
    expect(await mirrors.ensureCommit(source.dir, 'refs/heads/main')).toBe(second);
    expect(await mirrors.ensureCommit(`file://${source.dir}`, first)).toBe(first);
    expect(await mirrors.ensureCommit(source.dir, first.toUpperCase())).toBe(first);
  });

  it('fetches pull-request refs such as refs/pull/1/head', async () => {
    const { mirrors } = await newMirrors();

    expect(await mirrors.ensureCommit(source.dir, 'refs/pull/1/head')).toBe(pull);
  });

  it('fetches several revisions in one round trip', async () => {
    const { mirrors, commands } = await newMirrors();

    const shas = await mirrors.fetch(source.dir, ['main', 'refs/pull/1/head', first]);

    expect(shas).toEqual(
      new Map([
        ['main', second],
        ['refs/pull/1/head', pull],
        [first, first],
      ]),
    );
    expect((await commands()).filter((c) => c.includes(' fetch '))).toHaveLength(1);
  });

  it('answers for a commit it already has without touching the source', async () => {
    const copy = await TestRepo.create(join(await temp.make('ekaci-git-copy-'), 'copy'));
    const only = await copy.commit('only', { 'a.txt': 'a\n' });
    const { mirrors, commands } = await newMirrors();
    await mirrors.ensureCommit(copy.dir, only);
    const fetches = (await commands()).filter((c) => c.includes(' fetch ')).length;

    await rename(copy.dir, `${copy.dir}-gone`);

    expect(await mirrors.ensureCommit(copy.dir, only)).toBe(only);
    expect((await commands()).filter((c) => c.includes(' fetch '))).toHaveLength(fetches);
  });

  it('names the repository and the revision when a branch does not exist', async () => {
    const { mirrors } = await newMirrors();

    const err = await mirrors.ensureCommit(source.dir, 'no-such-branch').catch((e: unknown) => e);

    expect(err).toBeInstanceOf(GitRevisionError);
    expect(err).toMatchObject({ code: 'EKACI_ERR_GIT_REVISION', repository: source.dir, revision: 'no-such-branch' });
    expect((err as Error).message).toContain(`'no-such-branch' not found: ${source.dir} has no branch, tag or ref`);
  });

  it('names the repository and the sha when a commit does not exist', async () => {
    const { mirrors } = await newMirrors();
    const missing = 'deadbeef'.repeat(5);

    await expect(mirrors.ensureCommit(source.dir, missing)).rejects.toThrow(
      `revision '${missing}' not found: ${source.dir} has no commit ${missing}`,
    );
    await expect(mirrors.ensureCommit(source.dir, first.slice(0, 12))).rejects.toThrow('use the full sha');
  });

  it('refuses revisions that could be read as options or are not ref names, before running git', async () => {
    const { mirrors, commands } = await newMirrors();

    for (const rev of ['--upload-pack=touch /tmp/x', 'a..b', 'main:refs/heads/x', 'has space', '']) {
      await expect(mirrors.ensureCommit(source.dir, rev)).rejects.toBeInstanceOf(GitRevisionError);
    }
    expect((await commands()).filter((c) => c.includes(' fetch '))).toEqual([]);
  });

  it('serialises concurrent fetches into one mirror so that git never trips over its own lock files', async () => {
    const { mirrors } = await newMirrors();

    const shas = await Promise.all(
      ['main', 'feature', 'refs/pull/1/head', first, 'HEAD'].map((rev) => mirrors.ensureCommit(source.dir, rev)),
    );

    expect(shas).toEqual([second, pull, pull, first, second]);
  });

  it('keeps one mirror for every spelling of a local repository', async () => {
    const { mirrors } = await newMirrors();

    expect(mirrors.mirrorDir(`file://${source.dir}/`)).toBe(mirrors.mirrorDir(source.dir));
    await mirrors.ensureCommit(`${source.dir}/`, 'main');
    expect(await readdir(join(mirrors.dir, 'mirrors'))).toEqual([basename(mirrors.mirrorDir(source.dir))]);
  });
});

describe('GitMirrors.checkout', () => {
  it('checks out exactly the files of the commit', async () => {
    const { mirrors } = await newMirrors();

    const checkout = await mirrors.checkout(source.dir, first);

    expect(checkout).toMatchObject({ commit: first, dir: join(mirrors.dir, 'worktrees', first) });
    expect(await filesIn(checkout.dir)).toEqual(await filesOfCommit(source, first));
    expect(await filesOfCommit(source, first)).toEqual({ 'default.nix': '{ }: 1\n', 'pkgs/a.nix': 'a\n' });
    await checkout.release();
  });

  it("fetches a fork's pull request borrowing the base mirror's objects: only what the fork adds is copied", async () => {
    const history = await TestRepo.create(join(await temp.make('ekaci-git-history-'), 'base'));
    for (let i = 0; i < 20; i++)
      await history.commit(`change ${i}`, { [`pkgs/p${i}.nix`]: `${i}\n`, 'default.nix': `${i}\n` });
    const fork = await TestRepo.create(join(await temp.make('ekaci-git-fork-'), 'fork'));
    await fork.git('pull', '--quiet', history.dir, 'main');
    const forked = await fork.commit('the fork changes one file', { 'pkgs/p3.nix': 'from the fork\n' });
    const { mirrors } = await newMirrors();
    await mirrors.ensureCommit(history.dir, 'main');

    await mirrors.ensureCommit(fork.dir, forked, { objectsFrom: history.dir });
    const objects = async (url: string): Promise<number> => {
      const counts = await new TestRepo(mirrors.mirrorDir(url)).git('count-objects', '-v');
      const n = (key: string): number => Number(new RegExp(`^${key}: (\\d+)$`, 'm').exec(counts)![1]);
      return n('count') + n('in-pack');
    };
    expect(await objects(history.dir)).toBeGreaterThan(60); // 20 commits, their trees and files
    // The fork's commit, its root tree, pkgs/ and the one changed file.
    expect(await objects(fork.dir)).toBeLessThanOrEqual(4);
    const checkout = await mirrors.checkout(fork.dir, forked, { objectsFrom: history.dir });
    expect(await readFile(join(checkout.dir, 'pkgs/p3.nix'), 'utf8')).toBe('from the fork\n');
    expect(await readFile(join(checkout.dir, 'pkgs/p19.nix'), 'utf8')).toBe('19\n');
    await checkout.release();
    expect(await new TestRepo(mirrors.mirrorDir(history.dir)).git('config', 'gc.pruneExpire')).toBe('never');
  });

  it('shares one worktree between concurrent checkouts of a commit and removes it after the last release', async () => {
    const { mirrors, commands } = await newMirrors();

    const [a, b] = await Promise.all([mirrors.checkout(source.dir, 'main'), mirrors.checkout(source.dir, second)]);

    expect(a.dir).toBe(b.dir);
    expect((await commands()).filter((c) => c.includes(' worktree add '))).toHaveLength(1);
    await a.release();
    await a.release();
    expect(await filesIn(b.dir)).toEqual(await filesOfCommit(source, second));
    await b.release();
    expect(existsSync(b.dir)).toBe(false);
    const worktrees = await new TestRepo(mirrors.mirrorDir(source.dir)).git('worktree', 'list', '--porcelain');
    expect(worktrees).not.toContain(second);
  });

  it('checks out different commits of one repository concurrently', async () => {
    const { mirrors } = await newMirrors();

    const checkouts = await Promise.all(
      [first, second, 'refs/pull/1/head'].map((rev) => mirrors.checkout(source.dir, rev)),
    );

    expect(new Set(checkouts.map((c) => c.dir)).size).toBe(3);
    expect(await filesIn(checkouts[2]!.dir)).toEqual(await filesOfCommit(source, pull));
    await Promise.all(checkouts.map((c) => c.release()));
    expect(await readdir(join(mirrors.dir, 'worktrees'))).toEqual([]);
  });

  it('creates a fresh worktree for a checkout that arrives while the last one is being removed', async () => {
    const { mirrors, commands } = await newMirrors();
    const old = await mirrors.checkout(source.dir, first);

    const [, again] = await Promise.all([old.release(), mirrors.checkout(source.dir, first)]);

    expect(await filesIn(again.dir)).toEqual(await filesOfCommit(source, first));
    expect((await commands()).filter((c) => c.includes(' worktree add '))).toHaveLength(2);
    await again.release();
  });

  it('removes the worktrees a crashed run left behind when it is constructed', async () => {
    const { mirrors } = await newMirrors();
    const left = await mirrors.checkout(source.dir, first);
    const orphan = join(mirrors.dir, 'worktrees', 'not-a-worktree');
    await mkdir(orphan);
    await writeFile(join(orphan, 'file'), 'x');

    const { mirrors: restarted } = await newMirrors(mirrors.dir);
    await restarted.ready();

    expect(await readdir(join(mirrors.dir, 'worktrees'))).toEqual([]);
    const worktrees = await new TestRepo(restarted.mirrorDir(source.dir)).git('worktree', 'list', '--porcelain');
    expect(worktrees).not.toContain(left.dir);
    const checkout = await restarted.checkout(source.dir, first);
    expect(await filesIn(checkout.dir)).toEqual(await filesOfCommit(source, first));
    await checkout.release();
  });
});
