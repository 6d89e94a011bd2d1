/**
 * bench/webhook: how soon a pull request shows that eka-ci picked it up. An embedded coordinator (one local agent),
 * configured as a GitHub App against the GitHub stand-in, receives signed `pull_request` webhooks (`opened` and
 * `synchronize`, alternately) at a fixed rate, each for its own pull request and its own head commit of one small
 * real repository (examples/review, plus one empty commit per pull request on top of its head). Measured per
 * delivery: from sending the webhook to the first check-run request (`POST /repos/{owner}/{repo}/check-runs`) for
 * that pull request's head reaching the stand-in; and the HTTP response time of the webhook POST itself.
 *
 * Prints p50/p95/p99/max (a delivery without a check run within 30 s of the last send counts as infinitely late),
 * where the time goes (delivery queue, handler, check-run reporter), and the backlogs, event-loop delay and
 * processes seen once a second; writes everything to .bench/webhook.json. Target: p99 < 100 ms.
 *
 *   [BENCH_RATE=50 BENCH_SECONDS=60] npm run bench:webhook
 *   node --cpu-prof --cpu-prof-dir=/tmp/prof --import tsx bench/webhook.ts     (the same, with a CPU profile)
 *
 * Every head commit is distinct, so every pull request is evaluated (evaluations are cached per commit): the
 * coordinator works through a realistic backlog while deliveries keep arriving. Everything runs in this one Node
 * process (sender, coordinator, stand-in; git and nix are child processes), so the stand-in's own work shares the
 * coordinator's event loop. The stand-in's rate-limit budget is lifted: 50 pull requests a second spend GitHub's
 * 5,000 requests an hour in well under a minute, and what is measured here is latency, not budget handling.
 */
import { ChildProcess, spawnSync } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import type { Octokit } from '@octokit/core';
import { EVALUATION_CHECK } from '../coordinator/github/check-report.js';
import type { CheckRunSpec, CheckTarget } from '../coordinator/github/check-runs.js';
import {
  FakeGitHub,
  INSTALLATION,
  WEBHOOK_SECRET,
  pullRequestPayload,
  startGitHubCoordinator,
  webhookUrl,
} from '../test/support/github-app.js';
import { postWebhook, signWebhook } from '../test/support/github-standin.js';
import { envInt } from './bench-env.js';
import { tempDir } from '../test/support/nix-project.js';

const root = fileURLToPath(new URL('..', import.meta.url));
const REPO = 'acme/pkgs';
const CHECK_RUNS_PATH = `/repos/${REPO}/check-runs`;
const COMMITS_PATH = new RegExp(`^/repos/${REPO}/pulls/(\\d+)/commits$`);
// The warm-up pull request; measured ones are numbered from FIRST_PR.
const WARMUP_PR = 1;
const FIRST_PR = 101;
const TARGET_P99_MS = 100;
const GRACE_MS = 30_000;
const SAMPLE_MS = 1_000;
// The bench stops sending when the machine runs this low on memory: a guard against a coordinator that stops
// bounding its evaluations (the pipeline runs a few at a time; the rest wait as queued runs).
const MIN_AVAILABLE_MIB = 2_048;

const rate = envInt('BENCH_RATE', 50, fail);
const seconds = envInt('BENCH_SECONDS', 60, fail);
const count = rate * seconds;
const intervalMs = 1000 / rate;

const dataParent = tempDir('ekaci-bench-webhook-');
process.stderr.write(`bench/webhook: ${count} deliveries (${rate}/s for ${seconds} s); files in ${dataParent}\n`);

const github = await FakeGitHub.start();
const repo = github.makeRepo(REPO, join(root, 'examples', 'review'));
const [base, head] = repo.commits as [string, string];
const heads = makeHeads(join(github.root, REPO), head, count);
github.api.setRateLimit(1_000_000_000, Math.floor(Date.now() / 1000) + 86_400);
github.api.setPermission(REPO, 'alice', 'write');
const addPull = (number: number, sha: string): void =>
  github.api.addPull(REPO, {
    number,
    title: `bench: pull request ${number}`,
    user: 'alice',
    authorAssociation: 'MEMBER',
    headSha: sha,
    headRef: `bench-${number}`,
    baseSha: base,
    baseRef: 'main',
    commits: [{ sha, message: `bench: pull request ${number}` }],
  });
addPull(WARMUP_PR, head);
heads.forEach((sha, i) => addPull(FIRST_PR + i, sha));

// The production defaults (check runs updated at most every 5 s), not the test's 0.2 s.
const system = await startGitHubCoordinator(github, join(dataParent, 'data'), { github: {} });
const service = system.coordinator.github!;

// --- Instrumentation: every child process this process starts, and how long spawn() held the event loop (it is
// synchronous: it returns once the child has been forked and has run exec). ---
const spawns: { at: number; what: string; ms: number }[] = [];
const proto = ChildProcess.prototype as unknown as { spawn: (this: ChildProcess, o: SpawnOptions) => unknown };
const spawnChild = proto.spawn;
proto.spawn = function (this: ChildProcess, o: SpawnOptions) {
  const t = performance.now();
  try {
    return spawnChild.call(this, o);
  } finally {
    const what = `${o.file} ${o.args.slice(1).find((a) => /^[a-z][a-z-]*$/.test(a)) ?? ''}`.trim();
    spawns.push({ at: Date.now(), what, ms: performance.now() - t });
  }
};

// --- Instrumentation: when each delivery's handler started and ended, when its first check run was set. ---
const handlerStart = new Map<string, number>();
const handlerEnd = new Map<string, number>();
const firstSet = new Map<string, number>();
const handle = service.events.handle.bind(service.events);
service.events.handle = async (d) => {
  const sha = headShaOf(d.payload);
  if (sha !== undefined && !handlerStart.has(sha)) handlerStart.set(sha, Date.now());
  try {
    await handle(d);
  } finally {
    if (sha !== undefined && !handlerEnd.has(sha)) handlerEnd.set(sha, Date.now());
  }
};
const set = service.reporter.set.bind(service.reporter);
service.reporter.set = (target: CheckTarget, spec: CheckRunSpec, options?: { rerun?: boolean }) => {
  if (!firstSet.has(target.headSha)) firstSet.set(target.headSha, Date.now());
  set(target, spec, options);
};
// Round trips of the installation's requests (the Octokit the reporter and the handlers share), by operation.
const roundTrips = new Map<string, { at: number; ms: number }[]>();
const reporterApi = (service.reporter as unknown as { api: { octokit(id: number): Promise<Octokit> } }).api;
const octokit = await reporterApi.octokit(INSTALLATION);
octokit.hook.wrap('request', async (req, options) => {
  const op = `${options.method} ${options.url.replace(options.baseUrl ?? '', '')}`;
  const t = performance.now();
  try {
    return await req(options);
  } finally {
    const list = roundTrips.get(op) ?? [];
    list.push({ at: Date.now(), ms: performance.now() - t });
    roundTrips.set(op, list);
  }
});

// --- Warm-up, not measured: token, first clone of the repository, evaluation of the base. ---
process.stderr.write('warm-up: one pull request until its evaluation check completes…\n');
const warmupSent = Date.now();
const warm = await post(webhookBody({ action: 'opened', number: WARMUP_PR, head }), `warmup-${randomUUID()}`);
if (warm.status !== 202) fail(`the warm-up delivery got ${warm.status}: ${warm.body}`);
await github.api.waitFor(
  () =>
    github.api.checkRuns(REPO, head).some((r) => r.name === EVALUATION_CHECK && r.status === 'completed') || undefined,
  'the warm-up evaluation',
);
const warmupSeconds = (Date.now() - warmupSent) / 1000;

// --- The deliveries, built before the clock starts: JSON and signature are GitHub's work, not eka-ci's. ---
interface Delivery {
  number: number;
  head: string;
  action: 'opened' | 'synchronize';
  body: string;
  signature: string;
  id: string;
  /** ms after the start of the send phase when it was due, and when it went out. */
  dueMs: number;
  sentMs?: number;
  /** Date.now() when sent, on the stand-in's clock. */
  sentAt?: number;
  status?: number;
  responseMs?: number;
  error?: string;
}
const deliveries: Delivery[] = heads.map((sha, i) => {
  const action = i % 2 === 0 ? 'opened' : 'synchronize';
  const number = FIRST_PR + i;
  const body = webhookBody({ action, number, head: sha });
  return {
    number,
    head: sha,
    action,
    body,
    signature: signWebhook(WEBHOOK_SECRET, body),
    id: randomUUID(),
    dueMs: i * intervalMs,
  };
});
const byHead = new Map(deliveries.map((d) => [d.head, d]));

// --- Once a second: backlogs, event loop, processes, memory. ---
interface Sample {
  t: number;
  queuePending: number;
  queueProcessing: number;
  queueDone: number;
  checkRunsDirty: number;
  checkRunsUncreated: number;
  eventLoopP99Ms: number;
  eventLoopMaxMs: number;
  cpuPercent: number;
  /** Share of the second the event loop was busy (performance.eventLoopUtilization). */
  eventLoopBusy: number;
  rssMiB: number;
  nixProcesses: number;
  gitProcesses: number;
  memAvailableMiB: number;
}
const samples: Sample[] = [];
const loop = monitorEventLoopDelay({ resolution: 10 });
loop.enable();
let aborted: string | undefined;
let phaseStart = performance.now();
let lastCpu = process.cpuUsage();
let lastCpuAt = performance.now();
let lastElu = performance.eventLoopUtilization();
const sampler = setInterval(() => {
  const counts = service.queue.counts();
  const checks = system.coordinator.db
    .prepare('SELECT SUM(dirty) AS dirty, SUM(github_id IS NULL) AS uncreated FROM check_runs')
    .get() as { dirty: number | null; uncreated: number | null };
  const cpu = process.cpuUsage(lastCpu);
  const now = performance.now();
  const procs = descendants();
  const sample: Sample = {
    t: (now - phaseStart) / 1000,
    queuePending: counts.pending,
    queueProcessing: counts.processing,
    queueDone: counts.done,
    checkRunsDirty: checks.dirty ?? 0,
    checkRunsUncreated: checks.uncreated ?? 0,
    eventLoopP99Ms: loop.percentile(99) / 1e6,
    eventLoopMaxMs: loop.max / 1e6,
    cpuPercent: ((cpu.user + cpu.system) / 1000 / (now - lastCpuAt)) * 100,
    eventLoopBusy: performance.eventLoopUtilization(lastElu).utilization,
    rssMiB: Math.round(process.memoryUsage.rss() / 1024 / 1024),
    nixProcesses: procs.filter((c) => c.startsWith('nix')).length,
    gitProcesses: procs.filter((c) => c.startsWith('git')).length,
    memAvailableMiB: memAvailableMiB(),
  };
  samples.push(sample);
  loop.reset();
  lastCpu = process.cpuUsage();
  lastCpuAt = now;
  lastElu = performance.eventLoopUtilization();
  if (sample.memAvailableMiB < MIN_AVAILABLE_MIB && !aborted) {
    aborted = `only ${sample.memAvailableMiB} MiB of memory available at ${sample.t.toFixed(0)} s`;
    process.stderr.write(`bench/webhook: ${aborted}: no more deliveries\n`);
  }
}, SAMPLE_MS);

// --- The send phase: a fixed-rate scheduler (each delivery due at start + i/rate; late ones catch up, none wait
// for an answer), as GitHub delivers: it does not wait for one delivery to be answered before sending the next. ---
process.stderr.write(`sending ${count} deliveries at ${rate}/s…\n`);
const requestsBefore = github.api.requests.length;
phaseStart = performance.now();
const phaseStartAt = Date.now();
const answers: Promise<void>[] = [];
await new Promise<void>((resolve) => {
  let next = 0;
  const tick = (): void => {
    const now = performance.now() - phaseStart;
    while (next < count && deliveries[next]!.dueMs <= now && !aborted) answers.push(send(deliveries[next++]!));
    if (next >= count || aborted) return resolve();
    setTimeout(tick, Math.max(0, deliveries[next]!.dueMs - (performance.now() - phaseStart)));
  };
  tick();
});
const sendSeconds = (performance.now() - phaseStart) / 1000;
const lastSentAt = Date.now();
await Promise.all(answers);
const sent = deliveries.filter((d) => d.sentAt !== undefined);

// --- Wait until every sent delivery has its first check run, or 30 s after the last send. ---
process.stderr.write(
  `sent ${sent.length} in ${sendSeconds.toFixed(1)} s; waiting up to ${GRACE_MS / 1000} s for check runs…\n`,
);
let firstPost = firstCheckRunPosts();
while (Date.now() < lastSentAt + GRACE_MS && sent.some((d) => !firstPost.has(d.head))) {
  await new Promise((resolve) => setTimeout(resolve, 100));
  firstPost = firstCheckRunPosts();
}
clearInterval(sampler);
loop.disable();

// --- Figures. ---
const totals = sent.map((d) => {
  const at = firstPost.get(d.head)?.at;
  return at === undefined ? Infinity : at - d.sentAt!;
});
const missing = totals.filter((t) => t === Infinity).length;
const stats = summarise(totals);
const responses = summarise(sent.filter((d) => d.responseMs !== undefined).map((d) => d.responseMs!));
const statuses = countBy(sent.map((d) => (d.status === undefined ? `error: ${d.error}` : String(d.status))));
const lag = summarise(sent.map((d) => d.sentMs! - d.dueMs));
const stage = (from: (d: Delivery) => number | undefined, to: (d: Delivery) => number | undefined): Stats =>
  summarise(
    sent.flatMap((d) => {
      const a = from(d);
      const b = to(d);
      return a === undefined || b === undefined ? [] : [b - a];
    }),
  );
const titlesAt = commitTitleRequests();
const stages = {
  queueWait: stage(
    (d) => d.sentAt,
    (d) => handlerStart.get(d.head),
  ),
  handlerToSet: stage(
    (d) => handlerStart.get(d.head),
    (d) => firstSet.get(d.head),
  ),
  setToPost: stage(
    (d) => firstSet.get(d.head),
    (d) => firstPost.get(d.head)?.at,
  ),
  handler: stage(
    (d) => handlerStart.get(d.head),
    (d) => handlerEnd.get(d.head),
  ),
  setToTitles: stage(
    (d) => firstSet.get(d.head),
    (d) => titlesAt.get(d.number),
  ),
};
const window = github.api.requests.slice(requestsBefore);
const inSend = window.filter((r) => r.at >= phaseStartAt && r.at <= lastSentAt);
const checkPosts = inSend.filter((r) => r.method === 'POST' && r.path === CHECK_RUNS_PATH).length;
const checkPatches = inSend.filter((r) => r.method === 'PATCH' && r.path.startsWith(`${CHECK_RUNS_PATH}/`)).length;
const rtt = (op: string): Stats =>
  summarise((roundTrips.get(op) ?? []).filter((r) => r.at >= phaseStartAt).map((r) => r.ms));
const rttPost = rtt(`POST /repos/{owner}/{repo}/check-runs`);
const rttPatch = rtt(`PATCH /repos/{owner}/{repo}/check-runs/{check_run_id}`);
const rttTitles = rtt(`GET /repos/{owner}/{repo}/pulls/{pull_number}/commits`);
const sendSpawns = spawns.filter((p) => p.at >= phaseStartAt && p.at <= lastSentAt);
const spawnMs = sendSpawns.reduce((a, p) => a + p.ms, 0);
const spawnKinds = Object.entries(countBy(sendSpawns.map((p) => p.what)))
  .sort((a, b) => b[1] - a[1])
  .map(([what, n]) => `${n} ${what}`)
  .join(', ');
// The reporter sends check runs not yet created in (owner, repo, head sha, name) order: with a backlog, a late sha
// waits for every earlier one. The p95 of each quarter of the deliveries, by head sha, shows it.
const bySha = sent.map((d, i) => ({ sha: d.head, total: totals[i]! })).sort((a, b) => (a.sha < b.sha ? -1 : 1));
const quarters = [0, 1, 2, 3].map((q) =>
  summarise(bySha.slice((q * bySha.length) / 4, ((q + 1) * bySha.length) / 4).map((x) => x.total)),
);
const peak = (key: keyof Sample): number => Math.max(0, ...samples.map((s) => s[key]));
const failedStandIn = window.filter((r) => r.status >= 400).length;
const met = stats.p99 < TARGET_P99_MS;

const ms = (v: number): string => (v === Infinity ? `> ${GRACE_MS / 1000} s` : `${v.toFixed(v < 10 ? 1 : 0)} ms`);
const pct = (s: Stats): string => `p50 ${ms(s.p50)}, p95 ${ms(s.p95)}, p99 ${ms(s.p99)}, max ${ms(s.max)}`;
const rows: [string, string][] = [
  ['deliveries', `${sent.length} of ${count} (${rate}/s for ${seconds} s), opened/synchronize alternately`],
  ['', `each its own pull request (#${FIRST_PR}…) and head commit of ${REPO} (examples/review)`],
  ['CPUs', String(availableParallelism())],
  ['warm-up (not measured)', `${warmupSeconds.toFixed(1)} s for one pull request to finish evaluating`],
  ['send phase', `${sendSeconds.toFixed(1)} s; scheduler lag p99 ${ms(lag.p99)}, max ${ms(lag.max)}`],
  [
    'webhook responses',
    Object.entries(statuses)
      .map(([s, n]) => `${n}× ${s}`)
      .join(', '),
  ],
  ['webhook POST response', `p50 ${ms(responses.p50)}, p99 ${ms(responses.p99)}, max ${ms(responses.max)}`],
  ['delivery → first check run', pct(stats)],
  [`target p99 < ${TARGET_P99_MS} ms`, met ? 'met' : 'MISSED'],
  [
    `no check run within ${GRACE_MS / 1000} s`,
    `${missing} of ${sent.length}${aborted ? ` (aborted: ${aborted})` : ''}`,
  ],
  ['  by head sha, in quarters', quarters.map((q) => `p95 ${ms(q.p95)}`).join(' | ')],
  ['where the time goes', '(per delivery; each stage over the deliveries that reached it)'],
  ['  sent → handler starts', pct(stages.queueWait)],
  ['  handler → check run set', pct(stages.handlerToSet)],
  ['  set → POST at stand-in', pct(stages.setToPost)],
  ['  handler, start to end', pct(stages.handler)],
  ['  set → commit-titles GET', pct(stages.setToTitles)],
  ['round trips (in process)', ''],
  ['  POST check-runs', `${rttPost.n}: ${pct(rttPost)}`],
  ['  PATCH check-runs', `${rttPatch.n}: ${pct(rttPatch)}`],
  ['  GET pulls/N/commits', `${rttTitles.n}: ${pct(rttTitles)}`],
  [
    'check-run requests',
    `${checkPosts} POST + ${checkPatches} PATCH while sending (${((checkPosts + checkPatches) / sendSeconds).toFixed(0)}/s)`,
  ],
  [
    'stand-in refusals',
    `${failedStandIn} requests ≥ 400 since the send phase began; ${github.api.invalid.length} invalid`,
  ],
  ['peak delivery queue', `${peak('queuePending')} pending`],
  [
    'peak check-run backlog',
    `${peak('checkRunsDirty')} unsent states, ${peak('checkRunsUncreated')} check runs not yet created`,
  ],
  ['event loop delay', `worst second: p99 ${ms(peak('eventLoopP99Ms'))}, max ${ms(peak('eventLoopMaxMs'))}`],
  [
    'event loop busy',
    `${(mean(samples.filter((s) => s.t <= sendSeconds).map((s) => s.eventLoopBusy)) * 100).toFixed(0)} % while sending; process CPU peak ${peak('cpuPercent').toFixed(0)} % of a core`,
  ],
  ['peak RSS', `${peak('rssMiB')} MiB (the whole process: coordinator, stand-in, sender)`],
  [
    'spawned while sending',
    `${sendSpawns.length} processes (${spawnKinds}); spawn() held the event loop ${(spawnMs / 1000).toFixed(1)} s ` +
      `(${((spawnMs / 1000 / sendSeconds) * 100).toFixed(0)} % of the send phase), ${ms(summarise(sendSpawns.map((p) => p.ms)).p50)} each (p50)`,
  ],
  ['peak child processes', `${peak('nixProcesses')} nix, ${peak('gitProcesses')} git`],
  ['least memory available', `${Math.min(...samples.map((s) => s.memAvailableMiB))} MiB`],
];
const width = Math.max(...rows.map(([k]) => k.length));
for (const [k, v] of rows) console.log(`${k.padEnd(width)}  ${v}`);

const results = {
  bench: 'webhook',
  date: new Date().toISOString(),
  commit: spawnSync('git', ['-C', root, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).stdout.trim(),
  node: process.version,
  cpus: availableParallelism(),
  rate,
  seconds,
  sent: sent.length,
  aborted: aborted ?? null,
  targetP99Ms: TARGET_P99_MS,
  met,
  missing,
  deliveryToFirstCheckRunMs: finite(stats),
  byHeadShaQuarterMs: quarters.map(finite),
  webhookResponseMs: finite(responses),
  schedulerLagMs: finite(lag),
  stagesMs: Object.fromEntries(Object.entries(stages).map(([k, s]) => [k, finite(s)])),
  roundTripsMs: { postCheckRun: finite(rttPost), patchCheckRun: finite(rttPatch), commitTitles: finite(rttTitles) },
  checkRunRequestsWhileSending: { post: checkPosts, patch: checkPatches },
  standInRefusals: failedStandIn,
  spawnsWhileSending: {
    count: sendSpawns.length,
    blockedMs: round(spawnMs),
    byCommand: countBy(sendSpawns.map((p) => p.what)),
  },
  standInInvalid: github.api.invalid.length,
  samples,
  // Per delivery, in order: [pr, head sha, sent (ms after the send phase began), response ms, first check run ms or
  // null, handler start, first set, handler end (ms after send, or null)].
  deliveries: sent.map((d) => {
    const rel = (v: number | undefined): number | null => (v === undefined ? null : v - d.sentAt!);
    return [
      d.number,
      d.head,
      round(d.sentMs!),
      d.responseMs === undefined ? null : round(d.responseMs),
      rel(firstPost.get(d.head)?.at),
      rel(handlerStart.get(d.head)),
      rel(firstSet.get(d.head)),
      rel(handlerEnd.get(d.head)),
    ];
  }),
};
mkdirSync(join(root, '.bench'), { recursive: true });
writeFileSync(join(root, '.bench', 'webhook.json'), `${JSON.stringify(results)}\n`);
await shutdown();
process.exit(0);

// ---------------------------------------------------------------------------------------------------------------

interface SpawnOptions {
  file: string;
  args: string[];
}

interface Stats {
  n: number;
  p50: number;
  p95: number;
  p99: number;
  max: number;
}

/** Nearest-rank percentiles; Infinity (no check run) sorts last and shows as such. */
function summarise(values: number[]): Stats {
  const sorted = [...values].sort((a, b) => a - b);
  const at = (p: number): number =>
    sorted.length === 0 ? NaN : sorted[Math.max(0, Math.ceil(p * sorted.length) - 1)]!;
  return { n: sorted.length, p50: at(0.5), p95: at(0.95), p99: at(0.99), max: at(1) };
}

/** JSON has no Infinity: a percentile beyond the grace period is null. */
function finite(s: Stats): Record<string, number | null> {
  return Object.fromEntries(
    (Object.entries(s) as [string, number][]).map(([k, v]) => [k, Number.isFinite(v) ? round(v) : null]),
  );
}

function mean(values: number[]): number {
  return values.length === 0 ? NaN : values.reduce((a, b) => a + b, 0) / values.length;
}

function round(v: number): number {
  return Math.round(v * 100) / 100;
}

function countBy(values: string[]): Record<string, number> {
  const counts: Record<string, number> = {};
  for (const v of values) counts[v] = (counts[v] ?? 0) + 1;
  return counts;
}

function webhookBody(o: { action: string; number: number; head: string }): string {
  return JSON.stringify(pullRequestPayload({ ...o, repo: REPO, cloneUrl: repo.cloneUrl, base }));
}

function headShaOf(payload: unknown): string | undefined {
  const sha = (payload as { pull_request?: { head?: { sha?: unknown } } } | null)?.pull_request?.head?.sha;
  return typeof sha === 'string' ? sha : undefined;
}

/** The first check-run creation the stand-in saw for each head commit (its body is parsed once it has arrived). */
function firstCheckRunPosts(): Map<string, { at: number }> {
  const first = new Map<string, { at: number }>();
  for (const r of github.api.requests) {
    if (r.method !== 'POST' || r.path !== CHECK_RUNS_PATH) continue;
    const sha = (r.body as { head_sha?: unknown } | undefined)?.head_sha;
    if (typeof sha !== 'string' || !byHead.has(sha)) continue;
    const known = first.get(sha);
    if (!known || r.at < known.at) first.set(sha, { at: r.at });
  }
  return first;
}

/** When the OfBorg commit-titles request of each pull request reached the stand-in. */
function commitTitleRequests(): Map<number, number> {
  const first = new Map<number, number>();
  for (const r of github.api.requests) {
    const m = r.method === 'GET' ? COMMITS_PATH.exec(r.path) : null;
    if (m && !first.has(Number(m[1]))) first.set(Number(m[1]), r.at);
  }
  return first;
}

/** Sends one delivery as GitHub does, and records when it went out and how long the answer took. */
function send(d: Delivery): Promise<void> {
  d.sentMs = performance.now() - phaseStart;
  d.sentAt = Date.now();
  const t = performance.now();
  return post(d.body, d.id, d.signature).then(
    (r) => {
      d.responseMs = performance.now() - t;
      d.status = r.status;
    },
    (err: Error) => {
      d.error = err.message;
    },
  );
}

function post(body: string, deliveryId: string, signature?: string) {
  return postWebhook(webhookUrl(system), WEBHOOK_SECRET, 'pull_request', body, {
    deliveryId,
    ...(signature ? { signature } : {}),
  });
}

/**
 * `n` empty commits on a branch `bench` on top of `parent` (one `git fast-import`), each a head commit of its own:
 * the same tree as the demo's head, a different commit id.
 */
function makeHeads(dir: string, parent: string, n: number): string[] {
  const marks = join(dirname(dir), `marks-${randomUUID()}`);
  const when = Math.floor(Date.now() / 1000);
  let stream = '';
  for (let i = 0; i < n; i++) {
    const message = `bench: pull request ${FIRST_PR + i}\n`;
    stream += `commit refs/heads/bench\nmark :${i + 1}\ncommitter Bench <bench@eka-ci.invalid> ${when} +0000\n`;
    stream += `data ${Buffer.byteLength(message)}\n${message}${i === 0 ? `from ${parent}\n` : ''}\n`;
  }
  const r = spawnSync('git', ['-C', dir, 'fast-import', '--quiet', `--export-marks=${marks}`], {
    input: stream,
    encoding: 'utf8',
  });
  if (r.status !== 0) fail(`git fast-import failed: ${r.stderr}`);
  const shas = new Map(
    readFileSync(marks, 'utf8')
      .trim()
      .split('\n')
      .map((line) => {
        const [mark = '', sha = ''] = line.split(' ');
        return [Number(mark.slice(1)), sha] as const;
      }),
  );
  rmSync(marks, { force: true });
  return Array.from({ length: n }, (_, i) => shas.get(i + 1)!);
}

/** The commands of this process's descendants (git, nix, …), from /proc. */
function descendants(): string[] {
  const children = new Map<number, { ppid: number; comm: string }>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const close = stat.lastIndexOf(')');
      const comm = stat.slice(stat.indexOf('(') + 1, close);
      const ppid = Number(stat.slice(close + 2).split(' ')[1]);
      children.set(Number(entry), { ppid, comm });
    } catch {
      // The process ended while we looked.
    }
  }
  const mine = new Set([process.pid]);
  const found: string[] = [];
  let grew = true;
  while (grew) {
    grew = false;
    for (const [pid, p] of children) {
      if (mine.has(pid) || !mine.has(p.ppid)) continue;
      mine.add(pid);
      found.push(p.comm);
      grew = true;
    }
  }
  return found;
}

function memAvailableMiB(): number {
  const m = /MemAvailable:\s+(\d+) kB/.exec(readFileSync('/proc/meminfo', 'utf8'));
  return m ? Math.round(Number(m[1]) / 1024) : Infinity;
}

async function shutdown(): Promise<void> {
  // Evaluations still running are abandoned (stopNow); their nix processes end when their pipes close.
  await Promise.race([system.stop(), new Promise((resolve) => setTimeout(resolve, 10_000))]);
  await github.close();
  rmSync(dataParent, { recursive: true, force: true });
  rmSync(github.root, { recursive: true, force: true });
}

function fail(message: string): never {
  process.stderr.write(`bench/webhook FAILED: ${message}\n(files kept in ${dataParent})\n`);
  process.exit(1);
}
