import { execFileSync, spawn } from 'node:child_process';
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

/** Runs `ekaci` (from the TypeScript sources) to completion. */
export function ekaci(args: string[]): Promise<CliRun> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'cli', 'ekaci.ts'), ...args], { cwd: ROOT });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (b: Buffer) => (stdout += b.toString()));
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  return new Promise((resolve) => child.on('close', (code) => resolve({ code, stdout, stderr })));
}
