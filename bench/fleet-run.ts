/**
 * bench/fleet-run: one size of bench/fleet, in a process of its own so that its RSS, CPU and event loop are the
 * coordinator's (and not those of an earlier size). Started by bench/fleet.ts with the options as JSON in argv[2];
 * progress goes to stderr, the result back over the IPC channel.
 *
 * 1. Generates the nixpkgs-shaped DAG and instantiates it (not measured). The names carry the size and seed only:
 *    the agents never build anything, so no output ever becomes valid and a later run reuses the `.drv` files.
 * 2. Starts a coordinator (production defaults, loopback ports, a fresh data directory) and submits every
 *    derivation as one build request, as an evaluation of a package set does (timed, not part of the figures).
 * 3. Starts the protocol agents (bench/fleet-agents.ts) in a child process and measures until every derivation has
 *    settled or `timeoutS` has passed: event-loop delay, RSS and CPU here; assignments and slot waits at the agents.
 */
import { fork, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { silentLogger } from '../common/logging.js';
import { compileCoordinatorConfig } from '../coordinator/config.js';
import { Coordinator } from '../coordinator/coordinator.js';
import type { FleetMessage, FleetReport, FleetStart } from './fleet-agents.js';
import {
  type ProfileSummary,
  type Stats,
  assignmentRates,
  slotWaits,
  summarise,
  summariseProfile,
} from './fleet-stats.js';
import { NODE_NAME, nixpkgsDag, writeNixpkgsDag } from './nixpkgs-dag.js';
import { realtime } from './bench-env.js';

export interface RunOptions {
  size: number;
  agents: number;
  slots: number;
  buildMs: number;
  timeoutS: number;
  profile: boolean;
  seed: number;
  /** Close the log files the coordinator leaks (see LEAK_SWEEP_MS), so that a run can outlast them. */
  closeLeakedLogs: boolean;
}

export interface RunResult {
  size: number;
  dag: { criticalPath: number; edges: number; maxInputs: number; maxDependents: number; widestLayer: number };
  setup: { instantiateS: number; submitS: number; submitLongestStallMs: number };
  /** Every derivation settled before the timeout. */
  finished: boolean;
  error: string | null;
  dispatchS: number;
  settled: number;
  states: Record<string, number>;
  attempts: Record<string, number>;
  refused: { count: number; first: string | null };
  assignments: number;
  assignmentsPerSecond: { sustained: number; overall: number; peakSecond: number };
  slotToAssignMs: { coordinatorBound: Stats; all: Stats };
  /** Agent side: Assign to Finished sent (reading the .drv and uploading), Finished to its Ack. */
  leaseMs: { build: Stats; finishedToAck: Stats };
  eventLoopDelayMs: { p50: number; p99: number; max: number; worstSecondP99: number };
  rssMiB: { dispatchPeak: number; processPeak: number; heapPeak: number };
  /**
   * Descriptors open in the coordinator's process at the end, and how many leaked log files the bench closed on its
   * behalf (null: it did not, `--keep-leaked-fds`).
   */
  fds: { openAtEnd: number; closedByBench: number | null };
  coordinatorCpuPercent: number;
  coordinatorEventLoopUtilization: number;
  fleet: Omit<FleetReport, 'type' | 'leases' | 'slots'>;
  /** Per second of the dispatch phase. */
  timeline: Array<{ assigned: number; buildable: number; waiting: number; rssMiB: number; loopP99Ms: number }>;
  profile: (ProfileSummary & { file: string }) | null;
}

const root = fileURLToPath(new URL('..', import.meta.url));
const options = JSON.parse(process.argv[2] ?? '{}') as RunOptions;
const { size } = options;
// After the last derivation settled, the Ack of its result is still on its way to the agent.
const LAST_ACK_GRACE_MS = 300;
const SAMPLE_MS = 1_000;
// BuildManager.finished closes a lease's log file, then reopens it through LogStore.storedBytes and never closes it
// again: one descriptor per build. With this host's limit (20,000, not raisable here) the coordinator dies of EMFILE
// before 20,000 builds. Unless told not to, the bench closes them every few seconds (LogStore.closeAll; a log still
// written to is reopened on its next chunk) and counts them.
const LEAK_SWEEP_MS = 5_000;
const POLL_MS = 50;
// V8's default sampling interval; finer costs the coordinator noticeably at this load.
const PROFILE_INTERVAL_US = 1_000;
const now = realtime;
const progress = (message: string): boolean => process.stderr.write(`bench/fleet [${size}]: ${message}\n`);
const round = (v: number, digits = 1): number => Math.round(v * 10 ** digits) / 10 ** digits;
const mib = (bytes: number): number => Math.round(bytes / 2 ** 20);

// --- 1. The DAG, instantiated. ---
const dag = nixpkgsDag(size, options.seed);
const benchDir = join(root, '.bench');
mkdirSync(benchDir, { recursive: true });
const file = writeNixpkgsDag(benchDir, dag, `fleet${size}s${options.seed}`);
progress(
  `instantiating ${size} derivations (critical path ${dag.criticalPath}, ${dag.edges} edges, widest layer ` +
    `${dag.widestLayer}, up to ${dag.maxInputs} inputs and ${dag.maxDependents} dependents)…`,
);
let t = performance.now();
const inst = spawnSync('nix-instantiate', ['--option', 'substituters', '', file], {
  encoding: 'utf8',
  maxBuffer: 1 << 30,
  stdio: ['ignore', 'pipe', 'pipe'],
});
if (inst.status !== 0) throw new Error(`nix-instantiate failed: ${inst.stderr.slice(-2000)}`);
const instantiateS = (performance.now() - t) / 1000;
const roots = inst.stdout.split('\n').filter(Boolean);
const nodeOf = (drvPath: string): number => Number(NODE_NAME.exec(drvPath)?.[1] ?? NaN);
if (roots.length !== size || roots.some((r) => !(nodeOf(r) >= 0))) throw new Error('unexpected nix-instantiate output');
const system = JSON.parse(
  spawnSync('nix-instantiate', ['--eval', '--json', '--expr', 'builtins.currentSystem'], { encoding: 'utf8' }).stdout,
) as string;

// --- 2. The coordinator, and every derivation queued. ---
const dataDir = mkdtempSync(join(tmpdir(), `ekaci-bench-fleet-${size}-`));
const coordinator = new Coordinator(
  compileCoordinatorConfig({ data_dir: dataDir, web: { port: 0 }, grpc: { port: 0 } }, 'bench/fleet'),
  silentLogger(),
);
await coordinator.start();
const tokens = Array.from({ length: options.agents }, (_, i) => coordinator.localAgentToken(`fleet-${i}`));
let refused = 0;
let firstRefusal: string | null = null;
coordinator.manager.on('refused', (_agent: string, _lease: string, reason: string) => {
  refused++;
  firstRefusal ??= reason;
});
progress(`submitting ${size} derivations (closure read, .drv files pushed to the cache)…`);
const submitLoop = monitorEventLoopDelay({ resolution: 10 });
submitLoop.enable();
t = performance.now();
await coordinator.manager.submit(
  roots.map((drvPath) => ({ attr: `n${nodeOf(drvPath)}`, drvPath })),
  'bench/fleet',
);
const submitS = (performance.now() - t) / 1000;
submitLoop.disable();

// --- 3. The fleet, and the measurements. ---
const agentsProcess = fork(fileURLToPath(new URL('./fleet-agents.ts', import.meta.url)), [], {
  stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  execArgv: process.execArgv.filter((a) => !a.startsWith('--cpu-prof')),
});
const inbox: FleetMessage[] = [];
const waiters = new Set<() => void>();
const deliver = (m: FleetMessage): void => {
  inbox.push(m);
  for (const wake of waiters) wake();
  waiters.clear();
};
agentsProcess.on('message', deliver);
agentsProcess.on('exit', (code) => deliver({ type: 'failed', error: `the agents' process exited (${code})` }));
/** The next message of this type from the agents' process; its failure report (kept in the inbox) ends the run. */
async function next<T extends FleetMessage['type']>(type: T): Promise<Extract<FleetMessage, { type: T }>> {
  for (;;) {
    const i = inbox.findIndex((m) => m.type === type);
    if (i >= 0) return inbox.splice(i, 1)[0] as Extract<FleetMessage, { type: T }>;
    const failure = failed();
    if (failure !== undefined) throw new Error(failure);
    await new Promise<void>((resolve) => waiters.add(resolve));
  }
}
function failed(): string | undefined {
  const m = inbox.find((m) => m.type === 'failed');
  return m?.type === 'failed' ? m.error : undefined;
}

const profiler = options.profile ? new Session() : null;
if (profiler) {
  profiler.connect();
  await profiler.post('Profiler.enable');
  await profiler.post('Profiler.setSamplingInterval', { interval: PROFILE_INTERVAL_US });
  await profiler.post('Profiler.start');
}
const loop = monitorEventLoopDelay({ resolution: 10 });
const secondLoop = monitorEventLoopDelay({ resolution: 10 });
loop.enable();
secondLoop.enable();
const samples: Array<{ rssMiB: number; heapMiB: number; loopP99Ms: number }> = [];
const sampler = setInterval(() => {
  const m = process.memoryUsage();
  samples.push({ rssMiB: mib(m.rss), heapMiB: mib(m.heapUsed), loopP99Ms: secondLoop.percentile(99) / 1e6 });
  secondLoop.reset();
}, SAMPLE_MS);
const openFds = (): number => readdirSync('/proc/self/fd').length;
let closedByBench = 0;
const leakSweep = setInterval(() => {
  if (!options.closeLeakedLogs) return;
  const before = openFds();
  coordinator.logs.closeAll();
  closedByBench += before - openFds();
}, LEAK_SWEEP_MS);
const cpuBefore = process.cpuUsage();
const eluBefore = performance.eventLoopUtilization();
const start = now();
const startMessage: FleetStart = {
  type: 'start',
  target: coordinator.grpcTarget,
  tokens,
  slots: options.slots,
  system,
  buildMs: options.buildMs,
  seed: options.seed,
};
agentsProcess.send(startMessage);
progress(`${options.agents} agents × ${options.slots} slots connecting; dispatching (timeout ${options.timeoutS} s)…`);

let error: string | null = null;
const deadline = start + options.timeoutS * 1000;
try {
  await next('connected');
  let lastReport = now();
  while (coordinator.manager.pendingCount > 0 && now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    const failure = failed();
    if (failure !== undefined) throw new Error(failure);
    if (now() - lastReport > 30_000) {
      lastReport = now();
      progress(`${size - coordinator.manager.pendingCount} settled after ${((now() - start) / 1000).toFixed(0)} s`);
    }
  }
  await new Promise((resolve) => setTimeout(resolve, LAST_ACK_GRACE_MS));
} catch (err) {
  error = err instanceof Error ? err.message : String(err);
  progress(`FAILED: ${error}`);
}
const end = now();
const cpu = process.cpuUsage(cpuBefore);
const elu = performance.eventLoopUtilization(eluBefore).utilization;
clearInterval(sampler);
clearInterval(leakSweep);
const fds = { openAtEnd: openFds(), closedByBench: options.closeLeakedLogs ? closedByBench : null };
loop.disable();
secondLoop.disable();
let profile: RunResult['profile'] = null;
if (profiler) {
  const { profile: raw } = await profiler.post('Profiler.stop');
  const out = join(benchDir, `fleet-${size}.cpuprofile`);
  writeFileSync(out, JSON.stringify(raw));
  profile = { file: out, ...summariseProfile(raw, root) };
  profiler.disconnect();
}
const pending = coordinator.manager.pendingCount;
const count = (sql: string): Record<string, number> =>
  Object.fromEntries(
    (coordinator.db.prepare(sql).all() as Array<{ state: string; n: number }>).map((r) => [r.state, r.n]),
  );
const states = count('SELECT state, COUNT(*) AS n FROM derivations GROUP BY state');
const attempts = count('SELECT state, COUNT(*) AS n FROM attempts GROUP BY state');

agentsProcess.send({ type: 'stop' });
const report = await next('report').catch((err: unknown) => {
  error ??= err instanceof Error ? err.message : String(err);
  return null;
});
agentsProcess.removeAllListeners('exit');
await coordinator.stopNow();
rmSync(dataDir, { recursive: true, force: true });

// --- The figures. ---
const leases = report?.leases ?? [];
const assignedAt = leases.map((l) => l[2]);
const rates = assignmentRates(assignedAt);
const waits = slotWaits(dag.deps, nodeOf, leases, report?.slots ?? [], start, end);
const perSecond = waits.perSecond.map(() => 0);
for (const a of assignedAt) {
  const i = Math.floor((a - start) / 1000);
  if (i >= 0 && i < perSecond.length) perSecond[i]!++;
}
const seconds = waits.perSecond.map((s, i) => ({
  assigned: perSecond[i]!,
  ...s,
  rssMiB: samples[i]?.rssMiB ?? NaN,
  loopP99Ms: round(samples[i]?.loopP99Ms ?? NaN),
}));
const dispatchMs = end - start;
const result: RunResult = {
  size,
  dag: {
    criticalPath: dag.criticalPath,
    edges: dag.edges,
    maxInputs: dag.maxInputs,
    maxDependents: dag.maxDependents,
    widestLayer: dag.widestLayer,
  },
  setup: {
    instantiateS: round(instantiateS),
    submitS: round(submitS),
    submitLongestStallMs: Math.round(submitLoop.max / 1e6),
  },
  finished: pending === 0 && error === null,
  error,
  dispatchS: round(dispatchMs / 1000),
  settled: size - pending,
  states,
  attempts,
  refused: { count: refused, first: firstRefusal },
  assignments: leases.length,
  assignmentsPerSecond: {
    sustained: Math.round(rates.sustained),
    overall: Math.round((leases.length / dispatchMs) * 1000),
    peakSecond: rates.peakSecond,
  },
  slotToAssignMs: { coordinatorBound: rounded(waits.coordinatorBound), all: rounded(waits.all) },
  leaseMs: {
    build: rounded(summarise(leases.filter((l) => l[3] >= 0).map((l) => l[3] - l[2]))),
    finishedToAck: rounded(summarise(leases.filter((l) => l[4] >= 0).map((l) => l[4] - l[3]))),
  },
  eventLoopDelayMs: {
    p50: round(loop.percentile(50) / 1e6),
    p99: round(loop.percentile(99) / 1e6),
    max: round(loop.max / 1e6),
    worstSecondP99: round(Math.max(0, ...samples.map((s) => s.loopP99Ms))),
  },
  rssMiB: {
    dispatchPeak: Math.max(0, ...samples.map((s) => s.rssMiB)),
    processPeak: Math.round(process.resourceUsage().maxRSS / 1024),
    heapPeak: Math.max(0, ...samples.map((s) => s.heapMiB)),
  },
  fds,
  coordinatorCpuPercent: Math.round(((cpu.user + cpu.system) / 1000 / dispatchMs) * 100),
  coordinatorEventLoopUtilization: round(elu, 2),
  fleet: report
    ? {
        cpuPercent: Math.round(report.cpuPercent),
        eventLoopUtilization: round(report.eventLoopUtilization, 2),
        overAssigned: report.overAssigned,
        uploadFailures: report.uploadFailures,
        errors: report.errors,
        cancels: report.cancels,
        drains: report.drains,
        unacked: report.unacked,
      }
    : {
        cpuPercent: NaN,
        eventLoopUtilization: NaN,
        overAssigned: 0,
        uploadFailures: 0,
        errors: [],
        cancels: 0,
        drains: 0,
        unacked: 0,
      },
  timeline: seconds,
  profile,
};
if (process.send) process.send(result, () => process.exit(0));
else {
  console.log(JSON.stringify(result));
  process.exit(0);
}

function rounded(s: Stats): Stats {
  return { n: s.n, p50: round(s.p50), p90: round(s.p90), p99: round(s.p99), max: round(s.max) };
}
