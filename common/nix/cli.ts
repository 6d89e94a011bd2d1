import { spawn } from 'node:child_process';
import { NixCommandError } from '../errors.js';

/** Options that keep a Nix call from reaching for cache.nixos.org (unreachable builders spend ≈5 s retrying). */
export const NO_SUBSTITUTERS = ['--option', 'substituters', ''];

export const NIX_EXPERIMENTAL = ['--extra-experimental-features', 'nix-command flakes'];

export interface NixResult {
  stdout: string;
  stderr: string;
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface NixRunOptions {
  input?: string;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
}

/** Runs a Nix command to completion and returns its output, whatever its exit status. */
export function runNix(command: string, args: string[], options: NixRunOptions = {}): Promise<NixResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(command, args, {
      env: options.env ?? process.env,
      cwd: options.cwd,
      stdio: [options.input === undefined ? 'ignore' : 'pipe', 'pipe', 'pipe'],
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout?.on('data', (b: Buffer) => out.push(b));
    child.stderr?.on('data', (b: Buffer) => err.push(b));
    child.on('error', reject);
    child.on('close', (code, signal) =>
      resolve({
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
        code,
        signal,
      }),
    );
    if (options.input !== undefined && child.stdin) child.stdin.end(options.input);
  });
}

/** Runs a Nix command and returns stdout; a non-zero exit becomes a NixCommandError quoting stderr's last lines. */
export async function runNixChecked(command: string, args: string[], options: NixRunOptions = {}): Promise<string> {
  const r = await runNix(command, args, options);
  if (r.code !== 0) {
    throw new NixCommandError(
      `${command} ${args.slice(0, 3).join(' ')}… failed (exit ${r.code ?? r.signal}): ${lastLines(r.stderr, 5)}`,
      r.code,
      r.stderr,
    );
  }
  return r.stdout;
}

// The kernel refuses a command line (with its environment) over ARG_MAX, 2 MiB on Linux and 1 MiB on macOS, with
// E2BIG. Store paths are passed in batches of at most this many bytes, which leaves room for any environment.
const ARG_BATCH_BYTES = 256 * 1024;

/**
 * Splits arguments (store paths) into batches whose command lines stay far below ARG_MAX, whatever their number:
 * a nixpkgs closure has tens of thousands of paths.
 */
export function argBatches(args: readonly string[], maxBytes = ARG_BATCH_BYTES): string[][] {
  const batches: string[][] = [];
  let batch: string[] = [];
  let bytes = 0;
  for (const a of args) {
    const size = Buffer.byteLength(a) + 1 + 8; // the string, its NUL, its pointer in argv
    if (batch.length > 0 && bytes + size > maxBytes) {
      batches.push(batch);
      batch = [];
      bytes = 0;
    }
    batch.push(a);
    bytes += size;
  }
  if (batch.length > 0) batches.push(batch);
  return batches;
}

export function lastLines(text: string, n: number): string {
  return text.trimEnd().split('\n').slice(-n).join('\n');
}

/** Nix's error without its warnings and the "--show-trace" hint, which mean nothing to an eka-ci user. */
export function nixErrorText(stderr: string): string {
  const lines = stderr.split('\n').filter((l) => !/^warning:|^\(use '--show-trace'/.test(l));
  return lastLines(lines.join('\n'), 6);
}
