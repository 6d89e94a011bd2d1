import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** A whole number ≥ 1 from the environment (a benchmark's size), or `fallback`; `fail` reports a bad value. */
export function envInt(name: string, fallback: number, fail: (message: string) => never): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) fail(`${name} must be a whole number ≥ 1, got "${raw}"`);
  return n;
}

/**
 * The newest source file newer than dist/cli/ekaci.js, if any: what bin/ekaci.js runs is dist/, and a stale build
 * would be measured without anyone noticing. `fail` reports a missing dist/.
 */
export function staleDist(root: string, fail: (message: string) => never): string | undefined {
  const built = join(root, 'dist', 'cli', 'ekaci.js');
  if (!existsSync(built)) fail('dist/ is missing: run npm run build first');
  const builtAt = statSync(built).mtimeMs;
  const listed = spawnSync(
    'git',
    [
      '-C',
      root,
      'ls-files',
      '--cached',
      '--others',
      '--exclude-standard',
      '--',
      'cli',
      'coordinator',
      'common',
      'agent',
    ],
    { encoding: 'utf8', maxBuffer: 1 << 26 },
  );
  if (listed.status !== 0) fail(`git ls-files failed: ${listed.stderr}`);
  return listed.stdout
    .split('\n')
    .filter((f) => f.endsWith('.ts') && !f.endsWith('.test.ts') && existsSync(join(root, f)))
    .find((f) => statSync(join(root, f)).mtimeMs > builtAt);
}

let realtimeAnchor = Date.now() - performance.now();

/**
 * Milliseconds since 1970 on the realtime clock — the builder's `date +%s%N`, and every other process's — with the
 * resolution of `performance.now()`. `performance.timeOrigin + performance.now()` is the realtime clock only at the
 * process's start: it then runs on the monotonic clock, which this machine's realtime clock moves against (5 ms a
 * second, measured), so that a line's latency drifted by seconds over a long run, and two processes started a
 * minute apart disagreed by a quarter of a second. This follows `Date.now()`, and steps below its millisecond with
 * `performance.now()`.
 */
export function realtime(): number {
  const monotonic = performance.now();
  const real = Date.now();
  const t = realtimeAnchor + monotonic;
  if (t >= real && t < real + 1) return t;
  realtimeAnchor = real - monotonic;
  return real;
}
