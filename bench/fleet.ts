/**
 * bench/fleet: the coordinator at fleet scale. 100 protocol-level agents (real gRPC on loopback, 10 slots each,
 * every Assign answered at once with a result whose outputs are uploaded to the coordinator's cache; no Nix) work
 * through 20,000 and then 100,000 queued derivations of a nixpkgs-shaped DAG (bench/nixpkgs-dag.ts: a bootstrap
 * chain, sources, wide layers of packages with heavy fan-in on a few, a long thin top, thousand-input jobs).
 *
 * The agents (bench/fleet-agents.ts) are written against agent.proto loaded at run time with @grpc/proto-loader,
 * not the generated code: a client built from the .proto alone shows what a third-party agent needs. They run in a
 * child process, and each size runs its coordinator in a fresh process of its own (bench/fleet-run.ts), whose
 * event-loop delay, RSS and CPU are measured there. Figures, per size, and how they change from the first size to
 * the last:
 *
 * - assignments per second, sustained: over the middle 80 % of the assignments (the bootstrap chain at the start
 *   and the thin top at the end hand out one derivation at a time whatever the coordinator does);
 * - p99 time from a slot freeing (the Credit after a Finished) to its next Assign, at the agents, counting only
 *   waits the coordinator is to blame for: when the slot freed there was buildable work for every waiting slot, and
 *   for as long as there still was (a slot that then waits through a thin part of the DAG waits for the DAG);
 * - p99 event-loop delay of the coordinator's process while dispatching;
 * - the coordinator process's peak RSS (the closure ingest of the submit included).
 *
 * Every Assign answered at once means each slot is free again a few milliseconds later, so all slots are nearly
 * always waiting: by Little's law a slot then waits about slots ÷ rate (1,000 ÷ 1,000/s = 1 s) whatever the
 * dispatch latency. `--build-ms` holds each slot about that long per build (between half and one and a half times as
 * long, seeded, as real builds differ), so that the slot waits can be measured at an offered load (slots ÷ build
 * time) below what the coordinator sustains.
 *
 *   npm run bench:fleet [-- --sizes 20000,100000 --agents 100 --slots 10 --build-ms 0 --timeout 900 --profile]
 *   npm run bench:fleet -- --sizes 2000            (quick, for development)
 *
 * `--timeout` bounds each size's dispatch phase (seconds); a size that runs out reports what it measured so far.
 * `--profile` records a CPU profile of the coordinator while it dispatches (.bench/fleet-SIZE.cpuprofile, for
 * Chrome's DevTools) and prints where the time went; figures of a profiled run are a little worse.
 * Results go to stdout (a table, then one JSON line) and, with the per-second timeline, to .bench/fleet.json.
 */
import { fork, spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import type { RunOptions, RunResult } from './fleet-run.js';
import type { Stats } from './fleet-stats.js';

const TARGET_ASSIGNMENTS_PER_S = 1_000;
const TARGET_SLOT_WAIT_P99_MS = 50;
const TARGET_EVENT_LOOP_P99_MS = 100;
const TARGET_RSS_MIB = 1_024;

const { values } = parseArgs({
  options: {
    sizes: { type: 'string', default: '20000,100000' },
    agents: { type: 'string', default: '100' },
    slots: { type: 'string', default: '10' },
    'build-ms': { type: 'string', default: '0' },
    timeout: { type: 'string', default: '900' },
    seed: { type: 'string', default: '1' },
    profile: { type: 'boolean', default: false },
    'keep-leaked-fds': { type: 'boolean', default: false },
  },
});
const wholeNumber = (name: string, raw: string, min: number): number => {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) {
    process.stderr.write(`bench/fleet: --${name} must be a whole number ≥ ${min}, got "${raw}"\n`);
    process.exit(2);
  }
  return n;
};
const sizes = values.sizes.split(',').map((s) => wholeNumber('sizes', s.trim(), 500));
const base: Omit<RunOptions, 'size'> = {
  agents: wholeNumber('agents', values.agents, 1),
  slots: wholeNumber('slots', values.slots, 1),
  buildMs: wholeNumber('build-ms', values['build-ms'], 0),
  timeoutS: wholeNumber('timeout', values.timeout, 1),
  seed: wholeNumber('seed', values.seed, 0),
  profile: values.profile,
  closeLeakedLogs: !values['keep-leaked-fds'],
};
const root = fileURLToPath(new URL('..', import.meta.url));

const runs: RunResult[] = [];
for (const size of sizes) runs.push(await run({ ...base, size }));

// --- The table. ---
const ms = (v: number): string => (Number.isFinite(v) ? `${v < 10 ? v.toFixed(1) : Math.round(v)} ms` : 'n/a');
const num = (v: number): string => (Number.isFinite(v) ? Math.round(v).toLocaleString('en-US') : 'n/a');
const pq = (s: Stats): string => `${ms(s.p50)} / ${ms(s.p99)}`;
const met = (value: number, ok: boolean): string => (Number.isFinite(value) ? (ok ? 'met' : 'MISSED') : '');
type Row = [label: string, cell: (r: RunResult) => string, figure?: (r: RunResult) => number, target?: string];
const rows: Row[] = [
  ['queued derivations', (r) => num(r.size)],
  [
    'settled',
    (r) => `${r.finished ? 'all' : `${num(r.settled)} (${r.error ?? 'timed out'})`} in ${r.dispatchS} s`,
    (r) => r.dispatchS,
  ],
  [
    'assignments/s, sustained',
    (r) =>
      `${num(r.assignmentsPerSecond.sustained)} ${met(r.assignmentsPerSecond.sustained, r.assignmentsPerSecond.sustained >= TARGET_ASSIGNMENTS_PER_S)}`,
    (r) => r.assignmentsPerSecond.sustained,
    `≥ ${num(TARGET_ASSIGNMENTS_PER_S)}`,
  ],
  [
    'slot free → next Assign p99',
    (r) =>
      `${ms(r.slotToAssignMs.coordinatorBound.p99)} ${met(r.slotToAssignMs.coordinatorBound.p99, r.slotToAssignMs.coordinatorBound.p99 < TARGET_SLOT_WAIT_P99_MS)}`,
    (r) => r.slotToAssignMs.coordinatorBound.p99,
    `< ${TARGET_SLOT_WAIT_P99_MS} ms`,
  ],
  [
    'event-loop delay p99',
    (r) =>
      `${ms(r.eventLoopDelayMs.p99)} ${met(r.eventLoopDelayMs.p99, r.eventLoopDelayMs.p99 < TARGET_EVENT_LOOP_P99_MS)}`,
    (r) => r.eventLoopDelayMs.p99,
    `< ${TARGET_EVENT_LOOP_P99_MS} ms`,
  ],
  [
    'coordinator RSS, peak',
    (r) => `${num(r.rssMiB.processPeak)} MiB ${met(r.rssMiB.processPeak, r.rssMiB.processPeak <= TARGET_RSS_MIB)}`,
    (r) => r.rssMiB.processPeak,
    `≤ ${num(TARGET_RSS_MIB)} MiB`,
  ],
  ['  while dispatching (heap)', (r) => `${num(r.rssMiB.dispatchPeak)} MiB (${num(r.rssMiB.heapPeak)})`],
  [
    'assignments/s overall, best second',
    (r) => `${num(r.assignmentsPerSecond.overall)}, ${num(r.assignmentsPerSecond.peakSecond)}`,
  ],
  [
    'slot waits p50 / p99 (counted/all)',
    (r) =>
      `${pq(r.slotToAssignMs.coordinatorBound)} (${num(r.slotToAssignMs.coordinatorBound.n)}/${num(r.slotToAssignMs.all.n)})`,
  ],
  ['  every wait, p50 / p99', (r) => pq(r.slotToAssignMs.all)],
  ['Assign → Finished (upload) p50/p99', (r) => pq(r.leaseMs.build)],
  ['Finished → Ack p50 / p99', (r) => pq(r.leaseMs.finishedToAck)],
  [
    'event-loop delay max, worst second',
    (r) => `${ms(r.eventLoopDelayMs.max)}, p99 ${ms(r.eventLoopDelayMs.worstSecondP99)}`,
  ],
  [
    'coordinator CPU, loop busy',
    (r) => `${r.coordinatorCpuPercent} % of a core, ${pct(r.coordinatorEventLoopUtilization)}`,
  ],
  ['agents process CPU, loop busy', (r) => `${r.fleet.cpuPercent} % of a core, ${pct(r.fleet.eventLoopUtilization)}`],
  ['instantiate / submit (not measured)', (r) => `${r.setup.instantiateS} s / ${r.setup.submitS} s`],
  ['  longest stall during submit', (r) => ms(r.setup.submitLongestStallMs)],
  [
    'over-assigned, upload failures',
    (r) => `${r.fleet.overAssigned}, ${r.fleet.uploadFailures}${r.fleet.errors[0] ? ` (${r.fleet.errors[0]})` : ''}`,
  ],
  ['refused results, cancels', (r) => `${r.refused.count}, ${r.fleet.cancels}`],
  [
    'descriptors open at end, leaked closed',
    (r) => `${num(r.fds.openAtEnd)}, ${r.fds.closedByBench === null ? 'not closed' : num(r.fds.closedByBench)}`,
  ],
];
const columns = runs.length > 1;
const header = ['', ...runs.map((r) => num(r.size)), ...(columns ? ['change'] : []), 'target'];
const table = rows.map(([label, cell, figure, target]) => {
  const first = runs[0]!;
  const last = runs.at(-1)!;
  const change =
    figure && columns && Number.isFinite(figure(first)) && figure(first) !== 0
      ? `${(figure(last) / figure(first)).toFixed(2)}×`
      : '';
  return [label, ...runs.map(cell), ...(columns ? [change] : []), target ?? ''];
});
const widths = header.map((_, c) => Math.max(...[header, ...table].map((line) => line[c]!.length)));
const line = (cells: string[]): string =>
  cells
    .map((s, c) => s.padEnd(widths[c]!))
    .join('  ')
    .trimEnd();
console.log(
  `bench/fleet: ${base.agents} protocol agents × ${base.slots} slots, ` +
    `${base.buildMs === 0 ? 'immediate results' : `${base.buildMs} ms per build (±50 %)`}, ${availableParallelism()} CPUs`,
);
console.log(line(header));
for (const cells of table) console.log(line(cells));
for (const r of runs) {
  if (!r.profile) continue;
  console.log(
    `\nwhere the coordinator's time went at ${num(r.size)} (${(r.profile.busyMs / 1000).toFixed(1)} s busy, ${r.profile.file}):`,
  );
  for (const [title, items] of [
    ['by component (self time)', r.profile.components],
    ["this repository's functions, with what they call outside it", r.profile.charged],
    ["this repository's functions, inclusive", r.profile.inclusive],
  ] as const) {
    console.log(`  ${title}`);
    for (const item of items) console.log(`    ${pct(item.share).padStart(5)}  ${item.name}`);
  }
}

// --- The JSON line, and the whole record with the per-second timelines. ---
const summary = {
  bench: 'fleet',
  date: new Date().toISOString(),
  commit: spawnSync('git', ['-C', root, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).stdout.trim(),
  node: process.version,
  cpus: availableParallelism(),
  ...base,
  targets: {
    assignmentsPerSecond: TARGET_ASSIGNMENTS_PER_S,
    slotToAssignP99Ms: TARGET_SLOT_WAIT_P99_MS,
    eventLoopDelayP99Ms: TARGET_EVENT_LOOP_P99_MS,
    rssMiB: TARGET_RSS_MIB,
  },
  runs: runs.map(({ timeline: _, profile, ...r }) => ({
    ...r,
    profile: profile && {
      ...profile,
      components: profile.components.slice(0, 5),
      charged: profile.charged.slice(0, 5),
      inclusive: profile.inclusive.slice(0, 5),
    },
  })),
};
console.log(JSON.stringify(summary));
mkdirSync(join(root, '.bench'), { recursive: true });
writeFileSync(join(root, '.bench', 'fleet.json'), `${JSON.stringify({ ...summary, runs })}\n`);
process.exit(runs.every((r) => r.error === null) ? 0 : 1);

/** One size in a process of its own; a run that dies still yields a result row saying so. */
function run(options: RunOptions): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = fork(fileURLToPath(new URL('./fleet-run.ts', import.meta.url)), [JSON.stringify(options)], {
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    let result: RunResult | undefined;
    child.on('message', (m: RunResult) => (result = m));
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      if (result) resolve(result);
      else
        reject(
          new Error(`bench/fleet: the run of ${options.size} derivations exited (${code ?? signal}) without a result`),
        );
    });
  });
}

function pct(share: number): string {
  return Number.isFinite(share) ? `${Math.round(share * 100)} %` : 'n/a';
}
