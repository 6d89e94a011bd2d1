import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '..', '..');

export const GIT_ENV = {
  ...process.env,
  GIT_AUTHOR_NAME: 'eka-ci test',
  GIT_AUTHOR_EMAIL: 'test@eka-ci.invalid',
  GIT_COMMITTER_NAME: 'eka-ci test',
  GIT_COMMITTER_EMAIL: 'test@eka-ci.invalid',
};

/** Runs git in a test repository with a fixed identity; returns its trimmed stdout. */
export function git(repo: string, ...args: string[]): string {
  return execFileSync('git', ['-C', repo, ...args], { env: GIT_ENV, encoding: 'utf8' }).trim();
}

export interface CliRun {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Starts an eka-ci command (`ekaci`, `ekaci-coordinator`) from the TypeScript sources, as the leader of its own
 * process group so that `killGroup` also reaches what it started.
 */
export function startCli(
  args: string[],
  options: { program?: string; env?: NodeJS.ProcessEnv } = {},
): { child: ChildProcess; done: Promise<CliRun> } {
  const program = join(ROOT, 'cli', `${options.program ?? 'ekaci'}.ts`);
  const child = spawn(process.execPath, ['--import', 'tsx', program, ...args], {
    cwd: ROOT,
    env: { ...process.env, ...options.env },
    detached: true,
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const done = new Promise<CliRun>((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
  return { child, done };
}

/** Runs `ekaci` to completion. */
export function ekaci(args: string[]): Promise<CliRun> {
  return startCli(args).done;
}

/** SIGKILL to a child's whole process group; a group already gone is fine. */
export function killGroup(c: ChildProcess): void {
  try {
    if (c.pid !== undefined) process.kill(-c.pid, 'SIGKILL');
  } catch {
    // already gone
  }
}
