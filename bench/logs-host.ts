/**
 * What bench/logs asks of the host around the run: hashes of files, a `nix-build` outside eka-ci, the machine's
 * CPU time, and CPU profiles of this process.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, readFileSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { type ProfileSummary, summariseProfile } from './fleet-stats.js';

// V8's default sampling interval.
const PROFILE_INTERVAL_US = 1_000;

/** SHA-256 and length of a file from `offset`. */
export function fileHash(path: string, offset: number): Promise<{ sha256: string; bytes: number }> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    let bytes = 0;
    createReadStream(path, { start: offset })
      .on('data', (chunk: Buffer | string) => {
        hash.update(chunk);
        bytes += chunk.length;
      })
      .on('error', reject)
      .on('end', () => resolve({ sha256: hash.digest('hex'), bytes }));
  });
}

/**
 * Builds a derivation with `nix-build` and `--option NAME VALUE` for each of `options`; resolves with its output
 * path. With `showLog` false it runs `-Q` (the log is not shown: Nix only writes its own copy); with `showLog` true
 * Nix prints the log line by line, as every Nix client that shows a build does, and this process reads it from a
 * pipe and drops it. Killed at `deadline` (ms since 1970).
 */
export function nixBuild(
  drvPath: string,
  options: Record<string, string>,
  showLog: boolean,
  deadline: number,
): Promise<string> {
  const optionArgs = Object.entries(options).flatMap(([k, v]) => ['--option', k, v]);
  const quiet = showLog ? [] : ['-Q'];
  return new Promise((resolve, reject) => {
    const child = spawn(
      'nix-build',
      [...quiet, '--no-out-link', '--option', 'substituters', '', ...optionArgs, drvPath],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let out = '';
    let errTail = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (errTail = (errTail + d.toString()).slice(-2000)));
    const timer = setTimeout(() => child.kill('SIGTERM'), Math.max(0, deadline - Date.now()));
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolve(out.trim().split('\n').at(-1)!);
      else reject(new Error(`nix-build failed (${code}): ${errTail}`));
    });
  });
}

export interface CpuReading {
  busy: number;
  total: number;
}

/** The machine's CPU time so far, all cores, from /proc/stat (idle and iowait are not busy). */
export function machineCpu(): CpuReading {
  const fields = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = fields.reduce((a, b) => a + b, 0);
  return { busy: total - fields[3]! - fields[4]!, total };
}

/** The share of all cores that was busy between two readings. */
export function busyShare(earlier: CpuReading, later: CpuReading): number {
  return (later.busy - earlier.busy) / (later.total - earlier.total);
}

export async function startProfiler(): Promise<Session> {
  const session = new Session();
  session.connect();
  await session.post('Profiler.enable');
  await session.post('Profiler.setSamplingInterval', { interval: PROFILE_INTERVAL_US });
  await session.post('Profiler.start');
  return session;
}

/** Stops a profiler, writes the profile to `file` (for Chrome's DevTools) and says where the time went. */
export async function stopProfiler(session: Session, file: string, root: string): Promise<ProfileSummary> {
  const { profile } = await session.post('Profiler.stop');
  writeFileSync(file, JSON.stringify(profile));
  session.disconnect();
  return summariseProfile(profile, root);
}
