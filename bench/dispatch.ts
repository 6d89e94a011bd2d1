/**
 * bench/dispatch: 1,000 trivial derivations built by `ekaci build` (embedded coordinator, one local agent with
 * N slots) against `nix-build -jN` of a fresh copy of the same DAG, in the same run. Prints the ratio and the
 * peak RSS of the process running the coordinator. With `--runs R` the pair runs R times, one after the other, each
 * in a process of its own (fresh DAGs, `ekaci build` starting cold as the command does), and the median ratio is
 * the figure: on a shared 2-core machine one pair varies by ±0.1× and more.
 *
 *   npm run bench:dispatch [-- --count 1000 --jobs 2 --runs 3]
 */
import { fork, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { buildCommand } from '../cli/build-command.js';
import { writeDag } from './dag.js';

const { values } = parseArgs({
  options: {
    count: { type: 'string', default: '1000' },
    jobs: { type: 'string', default: '2' },
    runs: { type: 'string', default: '1' },
  },
});
const count = Number(values.count);
const jobs = Number(values.jobs);
const runs = Number(values.runs);
if (!(runs >= 1)) throw new Error(`--runs must be a positive number, got ${values.runs}`);

interface Pair {
  baseline: number;
  ekaci: number;
  rssMiB: number;
}

/**
 * One pair in this process: `nix-build -jN` of a fresh DAG, then `ekaci build` of another; seconds of each, and the
 * peak RSS of this process.
 */
async function pair(): Promise<Pair> {
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
  let exit: number;
  try {
    exit = await buildCommand(ekaciFile, {
      attr: [],
      agents: '1',
      maxJobs: String(jobs),
      dataDir: join(dir, 'ekaci-data'),
      json: true,
    });
  } finally {
    process.stdout.write = realStdout;
  }
  const ekaci = (performance.now() - t1) / 1000;
  if (exit !== 0) throw new Error(`ekaci build exited ${exit}`);
  return { baseline, ekaci, rssMiB: process.resourceUsage().maxRSS / 1024 };
}

/** A pair in a process of its own: `ekaci build` starts cold each time, as the command does. */
function pairInChild(): Promise<Pair> {
  return new Promise((resolve, reject) => {
    const child = fork(fileURLToPath(import.meta.url), ['--count', String(count), '--jobs', String(jobs)], {
      env: { ...process.env, EKACI_BENCH_DISPATCH_CHILD: '1' },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    let result: Pair | undefined;
    child.on('message', (m: Pair) => (result = m));
    child.on('error', reject);
    child.on('exit', (code) =>
      result ? resolve(result) : reject(new Error(`a run exited (${code}) without a result`)),
    );
  });
}

if (process.env.EKACI_BENCH_DISPATCH_CHILD === '1') {
  const r = await pair();
  await new Promise<void>((resolve) => process.send!(r, () => resolve()));
} else {
  const results: Pair[] = [];
  for (let run = 1; run <= runs; run++) {
    const r = runs === 1 ? await pair() : await pairInChild();
    results.push(r);
    if (runs > 1) {
      console.log(
        `run ${run}: nix-build ${r.baseline.toFixed(2)} s, ekaci build ${r.ekaci.toFixed(2)} s, ` +
          `${(r.ekaci / r.baseline).toFixed(2)}×`,
      );
    }
  }
  const ratios = results.map((r) => r.ekaci / r.baseline).sort((a, b) => a - b);
  const mid = Math.floor(ratios.length / 2);
  const median = ratios.length % 2 === 1 ? ratios[mid]! : (ratios[mid - 1]! + ratios[mid]!) / 2;
  const seconds = (pick: (r: Pair) => number): string => `${results.map((r) => pick(r).toFixed(2)).join(', ')} s`;
  const range = runs > 1 ? ` (median of ${runs}; ${ratios[0]!.toFixed(2)}–${ratios.at(-1)!.toFixed(2)}×)` : '';
  console.log(`derivations:          ${count} (${jobs} build slots on each side)`);
  console.log(`nix-build -j${jobs}:          ${seconds((r) => r.baseline)}`);
  console.log(`ekaci build:          ${seconds((r) => r.ekaci)}`);
  console.log(`ratio ekaci/nix-build: ${median.toFixed(2)}×${range} (target ≤ 1.2×)`);
  console.log(
    `coordinator peak RSS: ${Math.max(...results.map((r) => r.rssMiB)).toFixed(0)} MiB ` +
      '(process with the coordinator and its in-process agent)',
  );
}
