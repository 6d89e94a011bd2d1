/**
 * bench/dispatch: 1,000 trivial derivations built by `ekaci build` (embedded coordinator, one local agent with
 * N slots) against `nix-build -jN` of a fresh copy of the same DAG, in the same run. Prints the ratio and the
 * peak RSS of the process running the coordinator.
 *
 *   npm run bench:dispatch [-- --count 1000 --jobs 2]
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { buildCommand } from '../cli/build-command.js';
import { writeDag } from './dag.js';

const { values } = parseArgs({
  options: { count: { type: 'string', default: '1000' }, jobs: { type: 'string', default: '2' } },
});
const count = Number(values.count);
const jobs = Number(values.jobs);
const dir = mkdtempSync(join(tmpdir(), 'ekaci-bench-dispatch-'));
const tag = (): string => randomBytes(5).toString('hex');

const baselineFile = writeDag(dir, tag(), count);
const t0 = performance.now();
const nixBuild = spawnSync(
  'nix-build',
  ['--option', 'substituters', '', '-j', String(jobs), '--no-out-link', baselineFile],
  { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' },
);
const baseline = (performance.now() - t0) / 1000;
if (nixBuild.status !== 0) throw new Error(`nix-build failed: ${nixBuild.stderr.slice(-2000)}`);

const ekaciFile = writeDag(dir, tag(), count);
const realStdout = process.stdout.write.bind(process.stdout);
process.stdout.write = () => true; // keep the result table out of the report
const t1 = performance.now();
const exit = await buildCommand(ekaciFile, {
  attr: [],
  agents: '1',
  maxJobs: String(jobs),
  dataDir: join(dir, 'ekaci-data'),
  json: true,
});
const ekaci = (performance.now() - t1) / 1000;
process.stdout.write = realStdout;
if (exit !== 0) throw new Error(`ekaci build exited ${exit}`);

const rssMiB = process.resourceUsage().maxRSS / 1024;
console.log(`derivations:          ${count} (${jobs} build slots on each side)`);
console.log(`nix-build -j${jobs}:          ${baseline.toFixed(2)} s`);
console.log(`ekaci build:          ${ekaci.toFixed(2)} s`);
console.log(`ratio ekaci/nix-build: ${(ekaci / baseline).toFixed(2)}× (target ≤ 1.2×)`);
console.log(`coordinator peak RSS: ${rssMiB.toFixed(0)} MiB (process with the coordinator and its in-process agent)`);
