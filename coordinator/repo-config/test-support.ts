import { execFile } from 'node:child_process';
import { mkdir, realpath, symlink, writeFile } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import { TempDirs } from '../../common/nix/test-support.js';

/** Real directories (and real git repositories) for the repo-config tests. */

const run = promisify(execFile);

// The tests must not depend on the user's git identity or hooks, nor on a global config that disables symlinks.
const GIT_ENV = {
  ...process.env,
  GIT_CONFIG_GLOBAL: '/dev/null',
  GIT_CONFIG_NOSYSTEM: '1',
  GIT_AUTHOR_NAME: 'eka-ci test',
  GIT_AUTHOR_EMAIL: 'test@eka-ci.invalid',
  GIT_COMMITTER_NAME: 'eka-ci test',
  GIT_COMMITTER_EMAIL: 'test@eka-ci.invalid',
};

export const temp = new TempDirs();

/** A file's content, or a symbolic link to `link` (written exactly as given, relative or absolute). */
export type Entry = string | { link: string };

/** A fresh directory holding `entries`; its real path, so tests can compare resolved paths. */
export async function makeTree(entries: Record<string, Entry>): Promise<string> {
  const dir = await realpath(await temp.make('ekaci-repo-'));
  for (const [path, entry] of Object.entries(entries)) {
    const target = join(dir, path);
    await mkdir(dirname(target), { recursive: true });
    if (typeof entry === 'string') await writeFile(target, entry);
    else await symlink(entry.link, target);
  }
  return dir;
}

/** `entries` committed to a git repository, then cloned: the clone is what a worktree checkout looks like. */
export async function makeClonedRepo(entries: Record<string, Entry>): Promise<string> {
  const origin = await makeTree(entries);
  await run('git', ['init', '-q', '-b', 'main'], { cwd: origin, env: GIT_ENV });
  await run('git', ['add', '-A'], { cwd: origin, env: GIT_ENV });
  await run('git', ['commit', '-q', '-m', 'eka-ci config'], { cwd: origin, env: GIT_ENV });
  const clone = join(await realpath(await temp.make('ekaci-clone-')), 'checkout');
  await run('git', ['clone', '-q', origin, clone], { env: GIT_ENV });
  return clone;
}

export function json(value: unknown): string {
  return JSON.stringify(value, null, 2);
}
