/**
 * bench/logs: live build logs. One agent builds a real Nix derivation whose builder prints 200 MB of build log
 * (bench/logs-builder.ts: compiler-style lines, a marker line with the builder's clock every 512 KiB, then a few
 * quiet lines 50 ms apart); ten Server-Sent-Events followers are attached to the log before the builder prints its
 * first byte (the builder waits for a gate file the bench creates once they are). Measured, builder → Nix → agent →
 * coordinator → follower:
 *
 * - throughput to each follower: the flood's bytes ÷ (the follower seeing the last flood line − the builder printing
 *   the first), min and median over the followers;
 * - first byte: the builder printing its first line → a follower seeing it (median and worst);
 * - line visibility: each marker's print time (the builder's `date +%s%N`) → a follower seeing the whole line, p50
 *   and p99 over every marker and follower, during the flood and for the quiet lines after it (the builder prints
 *   those once every follower has seen the flood's end, so they measure the idle path, not the flood's backlog),
 *   split at the coordinator: builder → stored, stored → seen. The builder and the followers read the same
 *   kernel's realtime clock; the table says how far apart the two were seen;
 * - the coordinator's event-loop delay, RSS and CPU (it runs in this process; the agent and the followers each run
 *   in a process of their own: bench/logs-agent.ts, bench/logs-followers.ts);
 * - that every follower received exactly the bytes the builder printed: the builder records the SHA-256 and length
 *   of its output in `$out`; each follower's hash must equal that of the coordinator's stored log, whose part from
 *   the builder's first line must equal the builder's.
 *
 * Baselines, measured in the same run on the same bytes, by the same reader code:
 *
 * - `cat ×10`: ten `cat` of the stored log at once, each read through a pipe (throughput; first byte counted from
 *   starting `cat`);
 * - `pipe`: the builder's script run by `/bin/sh` outside Nix, read through a pipe: what the builder itself can
 *   print, and how soon a line is seen with nothing in between (latency);
 * - `nix-build -Q`: the same derivation (another name) built outside eka-ci with its log not shown: how fast Nix
 *   takes the builder's output into its own copy of the log;
 * - `nix-build`, log read: the same again with the log shown, read from a pipe and dropped. Nix (2.8) hands a shown
 *   log on one line at a time, and the builder can print no faster than that: this is the ceiling for any client of
 *   Nix that shows a build's log live, eka-ci's agent among them.
 *
 *   npm run bench:logs [-- --mb 200 --followers 10 --mark-kib 512 --trickle 40 --client lean|ekaci
 *                          --nix-option NAME=VALUE … --skip-nix-baseline --profile --timeout 900]
 *   npm run bench:logs -- --mb 20 --trickle 10          (quick, for development)
 *
 * `--client ekaci` follows with the project's own client code (fetch and common/sse.ts, as `ekaci logs --follow`)
 * instead of a lean reader of the raw response. `--nix-option` sets a Nix setting for the agent's nix-daemon (by
 * `NIX_CONFIG`, as a builder host's nix.conf would) and for the `nix-build` baseline alike: `compress-build-log=false`
 * shows what Nix's own copy of the log costs. `--profile` records CPU profiles of the coordinator and the agent
 * (.bench/logs-coordinator.cpuprofile, .bench/logs-agent.cpuprofile) and prints where their time went.
 * Results go to stdout (a table, then one JSON line) and to .bench/logs.json, with each follower's figures and what
 * the coordinator had stored every 250 ms. The exit status is 1 when a check failed (a follower got other bytes, the
 * build failed), not when a target was missed.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { basename, join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { silentLogger } from '../common/logging.js';
import { compileCoordinatorConfig } from '../coordinator/config.js';
import { Coordinator } from '../coordinator/coordinator.js';
import type { AgentCommand, AgentReport } from './logs-agent.js';
import {
  BUILDER_SCRIPT,
  MARKER,
  builderEnv,
  floodBytes,
  logShape,
  parseBuilderOutput,
  writeBuilderNix,
} from './logs-builder.js';
import { Child } from './logs-child.js';
import type { FollowerCommand, FollowerReport } from './logs-followers.js';
import { busyShare, fileHash, machineCpu, nixBuild, startProfiler, stopProfiler } from './logs-host.js';
import {
  type Figures,
  MB,
  type RunRecord,
  TARGET_FIRST_BYTE_MS,
  TARGET_LINE_P99_MS,
  TARGET_MB_PER_S,
  figures,
  table,
} from './logs-report.js';
import { realtime } from './bench-env.js';

// The coordinator's cap on a log (build_max_log_bytes, also Nix's max-build-log-size) is raised to this many times
// the log, so that the bench measures streaming and never the limit.
const LOG_LIMIT_FACTOR = 4;
// How often the coordinator's RSS is sampled, how often the bench looks whether the build was assigned or has
// settled, and how often it says how far the log has come.
const SAMPLE_MS = 100;
const POLL_MS = 20;
const PROGRESS_MS = 10_000;
// Where Nix keeps the log of every build it ran (its default log directory; the agent's own daemon uses it too).
const NIX_LOG_DIR = '/nix/var/log/nix/drvs';
const FINAL_STATES = new Set(['succeeded', 'failed', 'timed-out', 'cancelled', 'dependency-failed', 'unbuildable']);

// --- Options. ---
const { values } = parseArgs({
  options: {
    mb: { type: 'string', default: '200' },
    followers: { type: 'string', default: '10' },
    'mark-kib': { type: 'string', default: '512' },
    trickle: { type: 'string', default: '40' },
    client: { type: 'string', default: 'lean' },
    'nix-option': { type: 'string', multiple: true, default: [] },
    'skip-nix-baseline': { type: 'boolean', default: false },
    profile: { type: 'boolean', default: false },
    timeout: { type: 'string', default: '900' },
  },
});
const fail = (message: string): never => {
  process.stderr.write(`bench/logs: ${message}\n`);
  process.exit(2);
};
const wholeNumber = (name: string, raw: string, min: number): number => {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) fail(`--${name} must be a whole number ≥ ${min}, got "${raw}"`);
  return n;
};
const client: 'lean' | 'ekaci' =
  values.client === 'lean' ? 'lean' : values.client === 'ekaci' ? 'ekaci' : fail('--client is lean or ekaci');
const options = {
  mb: wholeNumber('mb', values.mb, 1),
  followers: wholeNumber('followers', values.followers, 1),
  markKiB: wholeNumber('mark-kib', values['mark-kib'], 4),
  trickle: wholeNumber('trickle', values.trickle, 0),
  client,
  nixOptions: Object.fromEntries(
    values['nix-option'].map((o) => {
      const eq = o.indexOf('=');
      return eq > 0 ? [o.slice(0, eq), o.slice(eq + 1)] : fail(`--nix-option takes NAME=VALUE, got "${o}"`);
    }),
  ) as Record<string, string>,
  nixBaseline: !values['skip-nix-baseline'],
  profile: values.profile,
  timeoutS: wholeNumber('timeout', values.timeout, 10),
};

const root = fileURLToPath(new URL('..', import.meta.url));
const benchDir = join(root, '.bench');
mkdirSync(benchDir, { recursive: true });
const progress = (message: string): boolean => process.stderr.write(`bench/logs: ${message}\n`);
const now = realtime;
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const deadline = Date.now() + options.timeoutS * 1000;
const shape = logShape(options.mb * MB, options.markKiB * 1024, options.trickle);
const flood = floodBytes(shape);

const WORK_PREFIX = 'ekaci-bench-logs-';
// A work directory without a pid file this old is left over from a run that died (or from before runs wrote one).
const PID_GRACE_MS = 60_000;
removeAbandonedWork();
const work = mkdtempSync(join(tmpdir(), WORK_PREFIX));
// The builder runs as a Nix build user: it must be able to look for the gate.
chmodSync(work, 0o711);
writeFileSync(join(work, 'pid'), String(process.pid));
const gate = join(work, 'gate');
let coordinator: Coordinator | undefined;
// The bench's derivations: Nix keeps a log of each (uncompressed with compress-build-log=false: the whole 200 MB).
const built: string[] = [];
let agent: Child<AgentCommand, AgentReport> | undefined;
let followers: Child<FollowerCommand, FollowerReport> | undefined;

/** Stops what the run started (the agent takes its nix-daemon and builder with it) and removes its files. */
async function cleanUp(): Promise<void> {
  if (agent) {
    agent.send({ type: 'stop' });
    await agent.stop();
  }
  if (followers) {
    followers.send({ type: 'stop' });
    await followers.stop();
  }
  await coordinator?.stopNow();
  rmSync(work, { recursive: true, force: true });
  for (const drvPath of built) removeNixLog(drvPath);
}
// Ctrl-C reaches this process twice (from the terminal and relayed by tsx): the first starts the clean-up.
let stopping = false;
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    if (stopping) return;
    stopping = true;
    progress(`${signal}: stopping`);
    void cleanUp().finally(() => process.exit(130));
  });
}

let result: Figures | undefined;
let error: string | null = null;
try {
  result = figures(await run());
} catch (err) {
  error = err instanceof Error ? err.message : String(err);
  progress(`FAILED: ${error}`);
} finally {
  await cleanUp();
}

// --- The table, the JSON line, the record. ---
console.log(
  `bench/logs: ${((shape.blocks * shape.blockBytes) / MB).toFixed(0)} MB of build log in lines of ~110 bytes, ` +
    `a marker every ${options.markKiB} KiB, ${options.followers} SSE followers (${options.client} client), ` +
    `${availableParallelism()} CPUs` +
    (Object.keys(options.nixOptions).length > 0 ? `, Nix ${JSON.stringify(options.nixOptions)}` : ''),
);
if (result) for (const line of table(result, options.followers)) console.log(line);
const summary = {
  bench: 'logs',
  date: new Date().toISOString(),
  commit: spawnSync('git', ['-C', root, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).stdout.trim(),
  node: process.version,
  cpus: availableParallelism(),
  options,
  log: { floodBytes: flood, blocks: shape.blocks, blockBytes: shape.blockBytes, trickle: shape.trickle },
  targets: { mbPerS: TARGET_MB_PER_S, firstByteMs: TARGET_FIRST_BYTE_MS, lineP99Ms: TARGET_LINE_P99_MS },
  error,
  figures: result && { ...result, profiles: undefined, perFollower: undefined, timeline: undefined },
};
console.log(JSON.stringify(summary));
writeFileSync(join(benchDir, 'logs.json'), `${JSON.stringify({ ...summary, figures: result })}\n`);
process.exit(error === null && result?.verified.ok === true ? 0 : 1);

/**
 * Removes the directories of runs whose process is gone: Ctrl-C under tsx ends a busy run with SIGKILL when it does
 * not answer within 30 ms, before it can clean up (its agent and followers stop by themselves).
 */
function removeAbandonedWork(): void {
  const alive = (pid: number): boolean => {
    try {
      process.kill(pid, 0);
      return true;
    } catch (err) {
      return (err as NodeJS.ErrnoException).code === 'EPERM';
    }
  };
  for (const name of readdirSync(tmpdir())) {
    if (!name.startsWith(WORK_PREFIX)) continue;
    const dir = join(tmpdir(), name);
    let pid: number | undefined;
    try {
      pid = Number(readFileSync(join(dir, 'pid'), 'utf8'));
    } catch {
      // A run that has only just made its directory has not written its pid yet.
      if (Date.now() - statSync(dir).mtimeMs < PID_GRACE_MS) continue;
    }
    if (pid === undefined || !Number.isInteger(pid) || !alive(pid)) rmSync(dir, { recursive: true, force: true });
  }
}

/** Removes the log Nix kept of a derivation the bench built (in Nix's default log directory, compressed or not). */
function removeNixLog(drvPath: string): void {
  const name = basename(drvPath);
  for (const file of [name, `${name}.bz2`]) rmSync(join(NIX_LOG_DIR, name.slice(0, 2), file.slice(2)), { force: true });
}

async function run(): Promise<RunRecord> {
  progress(`${shape.blocks} blocks of ${shape.blockBytes} bytes, ${options.followers} followers; instantiating…`);
  const nixDir = join(work, 'nix');
  const pipeDir = join(work, 'pipe');
  for (const dir of [nixDir, pipeDir]) mkdirSync(dir);
  const nixFile = writeBuilderNix(nixDir, randomBytes(6).toString('hex'), {
    live: { shape, gate },
    alone: { shape: { ...shape, trickle: 0 }, gate: '' },
    shown: { shape: { ...shape, trickle: 0 }, gate: '' },
  });
  const inst = spawnSync(
    'nix-instantiate',
    ['--option', 'substituters', '', nixFile, '-A', 'live', '-A', 'alone', '-A', 'shown'],
    { encoding: 'utf8' },
  );
  if (inst.status !== 0) throw new Error(`nix-instantiate failed: ${inst.stderr.slice(-2000)}`);
  const [liveDrv, aloneDrv, shownDrv] = inst.stdout.trim().split('\n') as [string, string, string];
  built.push(liveDrv, aloneDrv, shownDrv);

  followers = new Child('the followers', fileURLToPath(new URL('./logs-followers.ts', import.meta.url)));
  const { clockSkewMs } = await followers.next('ready', deadline);

  // --- Baseline: the builder's script outside Nix, through a pipe. ---
  progress('baseline: the builder → a pipe → a reader…');
  const pipeOut = join(pipeDir, 'out');
  followers.send({
    type: 'pipe',
    script: BUILDER_SCRIPT,
    env: { ...builderEnv(shape, ''), out: pipeOut },
    cwd: pipeDir,
  });
  const piped = await followers.next('piped', deadline);
  const pipe = { result: piped.result, account: parseBuilderOutput(readFileSync(pipeOut, 'utf8')) };

  // --- The coordinator, the agent, the build, the followers. ---
  progress('starting the coordinator and the agent…');
  const token = `ekaci_bench-logs-${randomBytes(16).toString('hex')}`;
  const c = new Coordinator(
    compileCoordinatorConfig(
      {
        data_dir: join(work, 'data'),
        build_max_log_bytes: LOG_LIMIT_FACTOR * (flood + MB),
        web: { port: 0, public: false },
        grpc: { port: 0 },
        api_tokens: [{ name: 'bench', token }],
      },
      'bench/logs',
    ),
    silentLogger(),
  );
  coordinator = c;
  await c.start();
  const nixConfig = Object.entries(options.nixOptions).map(([k, v]) => `${k} = ${v}`);
  agent = new Child('the agent', fileURLToPath(new URL('./logs-agent.ts', import.meta.url)), {
    ...process.env,
    ...(nixConfig.length === 0 ? {} : { NIX_CONFIG: [process.env.NIX_CONFIG ?? '', ...nixConfig].join('\n') }),
  });
  agent.send({
    type: 'start',
    target: c.grpcTarget,
    token: c.localAgentToken('bench-logs'),
    spoolDir: join(work, 'spool'),
    profileFile: options.profile ? join(benchDir, 'logs-agent.cpuprofile') : null,
  });
  await agent.next('ready', deadline);

  await c.manager.submit([{ attr: 'live', drvPath: liveDrv }], 'bench/logs');
  while (c.store.attemptsOf(liveDrv).length === 0) {
    if (Date.now() > deadline) throw new Error('the build was never assigned');
    await sleep(POLL_MS);
  }
  const logPath = c.store.attemptsOf(liveDrv)[0]!.log_path;
  const hash = liveDrv.slice('/nix/store/'.length, '/nix/store/'.length + 32);
  followers.send({
    type: 'follow',
    url: `http://127.0.0.1:${c.httpPort}/api/v1/derivations/${hash}/log?follow=1`,
    token,
    count: options.followers,
    client: options.client,
  });
  await followers.next('attached', deadline);

  // --- Measured: from opening the gate until every follower has had the end of the log. ---
  const storedAt: Array<[number, number]> = [];
  const unwatch = c.logs.watch(logPath, (event) => {
    if (event === 'appended') storedAt.push([now(), c.logs.storedBytes(logPath)]);
  });
  const profiler = options.profile ? await startProfiler() : null;
  const loop = monitorEventLoopDelay({ resolution: 10 });
  const rssBefore = process.memoryUsage().rss;
  let rssPeak = rssBefore;
  const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, process.memoryUsage().rss)), SAMPLE_MS);
  const ticker = setInterval(
    () => progress(`${(c.logs.storedBytes(logPath) / MB).toFixed(0)} MB stored…`),
    PROGRESS_MS,
  );
  const cpu = process.cpuUsage();
  const machine = machineCpu();
  agent.send({ type: 'mark' });
  loop.enable();
  const gateAt = now();
  progress(`${options.followers} followers attached; the builder prints…`);
  writeFileSync(gate, '');
  await followers.next('caught-up', deadline);
  writeFileSync(`${gate}.quiet`, '');
  const followed = await followers.next('followed', deadline).finally(() => clearInterval(ticker));
  const runMs = now() - gateAt;
  loop.disable();
  clearInterval(sampler);
  unwatch();
  const coordinatorCpu = process.cpuUsage(cpu);
  const machineBusy = busyShare(machine, machineCpu());
  const coordinatorProfile = profiler
    ? await stopProfiler(profiler, join(benchDir, 'logs-coordinator.cpuprofile'), root)
    : null;
  agent.send({ type: 'stop' });
  const agentStopped = await agent.next('stopped', deadline);

  let finalState = 'unknown';
  while (!FINAL_STATES.has(finalState) && Date.now() < deadline) {
    finalState = c.store.derivation(liveDrv)?.state ?? 'unknown';
    await sleep(POLL_MS);
  }
  const outPath = spawnSync('nix-store', ['-q', '--outputs', liveDrv], { encoding: 'utf8' }).stdout.trim();
  const builder = parseBuilderOutput(readFileSync(outPath, 'utf8'));
  const startOffset = readFileSync(logPath).subarray(0, MB).indexOf(`${MARKER}START `);

  // --- Baseline: the same bytes through `cat`, as many readers at once. ---
  progress(`baseline: ${options.followers} × cat of the stored log…`);
  followers.send({ type: 'cat', file: logPath, count: options.followers });
  const cat = await followers.next('catted', deadline);

  // --- Baselines: Nix alone, its log not shown (-Q) and shown (read line by line, as any Nix client shows it). ---
  let nixAlone: RunRecord['nixAlone'] = null;
  let nixShown: RunRecord['nixShown'] = null;
  if (options.nixBaseline) {
    progress('baseline: nix-build -Q of the same builder…');
    let t = now();
    let out = await nixBuild(aloneDrv, options.nixOptions, false, deadline);
    nixAlone = { account: parseBuilderOutput(readFileSync(out, 'utf8')), wallS: (now() - t) / 1000 };
    progress('baseline: nix-build of the same builder, its log read from a pipe…');
    t = now();
    out = await nixBuild(shownDrv, options.nixOptions, true, deadline);
    nixShown = { account: parseBuilderOutput(readFileSync(out, 'utf8')), wallS: (now() - t) / 1000 };
  }

  const loopMs = (ns: number): number => Math.round(ns / 1e5) / 10;
  return {
    shape,
    flood,
    followers: followed,
    cat,
    pipe,
    builder,
    nixAlone,
    nixShown,
    stored: {
      ...(await fileHash(logPath, 0)),
      fromStart: startOffset < 0 ? null : await fileHash(logPath, startOffset),
    },
    storedAt,
    finalState,
    coordinator: {
      loop: { p50: loopMs(loop.percentile(50)), p99: loopMs(loop.percentile(99)), max: loopMs(loop.max) },
      rssMiB: { peak: Math.round(rssPeak / 2 ** 20), before: Math.round(rssBefore / 2 ** 20) },
      cpuMs: (coordinatorCpu.user + coordinatorCpu.system) / 1000,
      watchersAtEnd: c.logs.watcherCount,
      profile: coordinatorProfile,
    },
    agent: { cpuMs: agentStopped.cpuMs, profile: agentStopped.profile },
    machineBusy,
    clockSkewMs,
    runMs,
  };
}
