/**
 * The figures of bench/logs from what a run recorded, the checks that the followers got the builder's bytes, and
 * the table and JSON they are printed as.
 */
import { availableParallelism } from 'node:os';
import type { ProfileSummary, Stats } from './fleet-stats.js';
import { summarise } from './fleet-stats.js';
import type { BuilderAccount, LogShape } from './logs-builder.js';
import type { FollowResult, SpawnedResult } from './logs-followers.js';
import type { Mark, Seen } from './logs-reader.js';

export const TARGET_MB_PER_S = 100;
export const TARGET_FIRST_BYTE_MS = 100;
export const TARGET_LINE_P99_MS = 250;
export const MB = 1e6;

/** What one run recorded: the readers' results, the builder's accounts, and the coordinator's side. */
export interface RunRecord {
  shape: LogShape;
  /** Bytes from `START` to the end of `END`, as the log's shape says. */
  flood: number;
  followers: { results: FollowResult[]; cpuMs: number };
  cat: { results: SpawnedResult[]; cpuMs: number };
  pipe: { result: SpawnedResult; account: BuilderAccount };
  builder: BuilderAccount;
  nixAlone: { account: BuilderAccount; wallS: number } | null;
  /** The same builder under `nix-build` showing its log (read from a pipe): Nix's own ceiling for a shown log. */
  nixShown: { account: BuilderAccount; wallS: number } | null;
  stored: { sha256: string; bytes: number; fromStart: { sha256: string; bytes: number } | null };
  /** When the coordinator stored the log's bytes: [time (ms), bytes stored] per append. */
  storedAt: Array<[number, number]>;
  finalState: string;
  coordinator: {
    loop: { p50: number; p99: number; max: number };
    rssMiB: { peak: number; before: number };
    cpuMs: number;
    watchersAtEnd: number;
    profile: ProfileSummary | null;
  };
  agent: { cpuMs: number; profile: ProfileSummary | null };
  machineBusy: number;
  clockSkewMs: number;
  runMs: number;
}

export interface Figures {
  followers: {
    mbPerS: number[];
    firstByteMs: number[];
    flood: Stats;
    quiet: Stats;
    /** The flood's line latency split at the coordinator: builder → stored, stored → follower. */
    floodToStored: Stats;
    floodStoredToSeen: Stats;
    firstByteToStoredMs: number;
    attachedBeforeStartMs: number;
    cpuPercent: number;
  };
  cat: { mbPerS: number[]; firstByteMs: number[]; cpuPercent: number };
  pipe: { mbPerS: number; firstByteMs: number; flood: Stats; quiet: Stats };
  builder: {
    inRunMbPerS: number;
    pipeMbPerS: number;
    nixAlone: { mbPerS: number; wallS: number } | null;
    nixShown: { mbPerS: number; wallS: number } | null;
  };
  coordinator: {
    eventLoopDelayMs: { p50: number; p99: number; max: number };
    rssMiB: { peak: number; before: number };
    cpuPercent: number;
    watchersAtEnd: number;
    /** Chunks the coordinator stored (each woke every follower), and their mean size. */
    appends: number;
    meanAppendBytes: number;
  };
  agentCpuPercent: number;
  machineBusyPercent: number;
  clockSkewMs: number;
  runS: number;
  verified: {
    ok: boolean;
    followersMatching: number;
    builder: { sha256: string; bytes: number };
    stored: { sha256: string; bytes: number; fromStartMatches: boolean };
    flood: { expected: number; seen: number };
    finalState: string;
    notes: string[];
  };
  profiles: { coordinator: ProfileSummary; agent: ProfileSummary | null } | null;
  perFollower: Array<{ bytes: number; events: number; mbPerS: number; firstByteMs: number; floodP99Ms: number }>;
  /** Every TIMELINE_MS from the builder's first byte: MB the coordinator had stored, and flood markers printed. */
  timeline: Array<{ ms: number; storedMB: number; printedMB: number }>;
}

const TIMELINE_MS = 250;

const round = (v: number, digits = 1): number => Math.round(v * 10 ** digits) / 10 ** digits;
const rounded = (s: Stats): Stats => ({
  n: s.n,
  p50: round(s.p50),
  p90: round(s.p90),
  p99: round(s.p99),
  max: round(s.max),
});
const latency = (marks: Mark[]): Stats => rounded(summarise(marks.map(([printed, seen]) => seen - printed)));
const rate = (bytes: number, fromMs: number, toMs: number): number => round(bytes / MB / ((toMs - fromMs) / 1000));
/** How fast a builder printed under a plain `nix-build`, by its own clock, and the build's wall time. */
const nixRate = (
  bytes: number,
  run: { account: BuilderAccount; wallS: number },
): { mbPerS: number; wallS: number } => ({
  mbPerS: rate(bytes, run.account.startedAt, run.account.endedAt),
  wallS: round(run.wallS),
});
const ascending = (xs: number[]): number[] => [...xs].sort((a, b) => a - b);

export function figures(r: RunRecord): Figures {
  const results = r.followers.results;
  const complete = results.filter(
    (f): f is FollowResult & { start: Seen; end: Seen } => f.start !== null && f.end !== null,
  );
  const mbPerS = (f: (typeof complete)[number]): number => rate(r.flood, f.start.printedAt, f.end.seenAt);
  // When the coordinator had stored every byte before `offset`: the first append that reached it.
  const storedBy = (offset: number): number => {
    let lo = 0;
    let hi = r.storedAt.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (r.storedAt[mid]![1] >= offset) hi = mid;
      else lo = mid + 1;
    }
    return r.storedAt[lo]?.[0] ?? NaN;
  };
  const allMarks = results.flatMap((f) => f.marks);
  const first = complete[0];

  const notes: string[] = [];
  const matching = results.filter((f) => f.sha256 === r.stored.sha256 && f.bytes === r.stored.bytes).length;
  const fromStartMatches =
    r.stored.fromStart?.sha256 === r.builder.sha256 && r.stored.fromStart.bytes === r.builder.bytes;
  const floodSeen = first ? first.end.endOffset - first.start.offset : NaN;
  if (matching !== results.length) notes.push(`${results.length - matching} followers got other bytes than stored`);
  if (!fromStartMatches) notes.push('the stored log from START on is not what the builder wrote');
  if (floodSeen !== r.flood) notes.push(`the flood was ${floodSeen} bytes, ${r.flood} expected`);
  if (r.finalState !== 'succeeded') notes.push(`the build ended ${r.finalState}`);
  for (const f of results) {
    if (f.final?.state !== 'succeeded') notes.push(`a follower's end event says ${JSON.stringify(f.final)}`);
    if (f.marks.length !== r.shape.blocks || f.trickle.length !== r.shape.trickle) {
      notes.push(`a follower saw ${f.marks.length} flood and ${f.trickle.length} quiet markers`);
    }
  }
  if (r.cat.results.some((c) => c.sha256 !== r.stored.sha256)) notes.push('a cat reader got other bytes than stored');
  if (r.pipe.result.sha256 !== r.pipe.account.sha256) notes.push('the pipe baseline read other bytes than printed');
  if ([r.pipe.result, ...r.cat.results].some((p) => p.exitCode !== 0)) notes.push('a baseline process failed');

  const catSpan = Math.max(...r.cat.results.map((c) => c.doneAt - c.spawnedAt));
  return {
    followers: {
      mbPerS: ascending(complete.map(mbPerS)),
      firstByteMs: ascending(complete.map((f) => round(f.start.seenAt - f.start.printedAt, 2))),
      flood: latency(allMarks),
      quiet: latency(results.flatMap((f) => f.trickle)),
      floodToStored: rounded(summarise(allMarks.map(([printed, , end]) => storedBy(end) - printed))),
      floodStoredToSeen: rounded(summarise(allMarks.map(([, seen, end]) => seen - storedBy(end)))),
      firstByteToStoredMs: first ? round(storedBy(first.start.endOffset) - first.start.printedAt, 2) : NaN,
      attachedBeforeStartMs: first ? round(first.start.printedAt - Math.max(...results.map((f) => f.attachedAt))) : NaN,
      cpuPercent: Math.round((r.followers.cpuMs / r.runMs) * 100),
    },
    cat: {
      mbPerS: ascending(r.cat.results.map((c) => rate(r.flood, c.spawnedAt, c.end?.seenAt ?? NaN))),
      firstByteMs: ascending(r.cat.results.map((c) => round((c.firstByteAt ?? NaN) - c.spawnedAt, 2))),
      cpuPercent: Math.round((r.cat.cpuMs / catSpan) * 100),
    },
    pipe: {
      mbPerS: rate(r.flood, r.pipe.result.start?.printedAt ?? NaN, r.pipe.result.end?.seenAt ?? NaN),
      firstByteMs: round((r.pipe.result.start?.seenAt ?? NaN) - (r.pipe.result.start?.printedAt ?? NaN), 2),
      flood: latency(r.pipe.result.marks),
      quiet: latency(r.pipe.result.trickle),
    },
    builder: {
      inRunMbPerS: rate(r.flood, r.builder.startedAt, r.builder.endedAt),
      pipeMbPerS: rate(r.flood, r.pipe.account.startedAt, r.pipe.account.endedAt),
      nixAlone: r.nixAlone && nixRate(r.flood, r.nixAlone),
      nixShown: r.nixShown && nixRate(r.flood, r.nixShown),
    },
    coordinator: {
      eventLoopDelayMs: r.coordinator.loop,
      rssMiB: r.coordinator.rssMiB,
      cpuPercent: Math.round((r.coordinator.cpuMs / r.runMs) * 100),
      watchersAtEnd: r.coordinator.watchersAtEnd,
      appends: r.storedAt.length,
      meanAppendBytes: Math.round((r.storedAt.at(-1)?.[1] ?? 0) / Math.max(1, r.storedAt.length)),
    },
    agentCpuPercent: Math.round((r.agent.cpuMs / r.runMs) * 100),
    machineBusyPercent: Math.round(r.machineBusy * 100),
    clockSkewMs: round(r.clockSkewMs, 2),
    runS: round(r.runMs / 1000),
    verified: {
      ok: notes.length === 0,
      followersMatching: matching,
      builder: { sha256: r.builder.sha256, bytes: r.builder.bytes },
      stored: { sha256: r.stored.sha256, bytes: r.stored.bytes, fromStartMatches },
      flood: { expected: r.flood, seen: floodSeen },
      finalState: r.finalState,
      notes,
    },
    profiles: r.coordinator.profile ? { coordinator: r.coordinator.profile, agent: r.agent.profile } : null,
    timeline: timeline(r, first),
    perFollower: complete.map((f) => ({
      bytes: f.bytes,
      events: f.events,
      mbPerS: mbPerS(f),
      firstByteMs: round(f.start.seenAt - f.start.printedAt, 2),
      floodP99Ms: latency(f.marks).p99,
    })),
  };
}

/** How the log came in over time: what the coordinator had stored, and what the builder had printed (markers). */
function timeline(r: RunRecord, first: { start: Seen; marks: Mark[] } | undefined): Figures['timeline'] {
  if (!first) return [];
  const from = first.start.printedAt;
  const rows: Figures['timeline'] = [];
  const last = Math.max(r.storedAt.at(-1)?.[0] ?? from, ...first.marks.map((m) => m[0]));
  for (let t = from, s = 0, m = 0; t <= last + TIMELINE_MS; t += TIMELINE_MS) {
    while (s < r.storedAt.length && r.storedAt[s]![0] <= t) s++;
    while (m < first.marks.length && first.marks[m]![0] <= t) m++;
    rows.push({
      ms: Math.round(t - from),
      storedMB: round((r.storedAt[s - 1]?.[1] ?? 0) / MB),
      printedMB: round((first.marks[m - 1]?.[2] ?? 0) / MB),
    });
  }
  return rows;
}

/** The table: eka-ci beside its baseline, their ratio and the target, row by row. */
export function table(f: Figures, followers: number): string[] {
  const num = (v: number): string => (Number.isFinite(v) ? `${v < 10 ? v.toFixed(1) : Math.round(v)}` : 'n/a');
  const ms = (v: number): string => (Number.isFinite(v) ? `${num(v)} ms` : 'n/a');
  const pair = (s: Stats): string => `${ms(s.p50)} / ${ms(s.p99)}`;
  const ratio = (a: number, b: number): string => (Number.isFinite(a / b) && b !== 0 ? `${(a / b).toFixed(2)}×` : '');
  const met = (ok: boolean): string => (ok ? 'met' : 'MISSED');
  const median = (xs: number[]): number => summarise(xs).p50;
  const fl = f.followers;
  const minF = fl.mbPerS[0] ?? NaN;
  const minCat = f.cat.mbPerS[0] ?? NaN;
  const worstFirst = fl.firstByteMs.at(-1) ?? NaN;
  const p99 = Math.max(fl.flood.p99, fl.quiet.n > 0 ? fl.quiet.p99 : -Infinity);
  const c = f.coordinator;
  const rows: string[][] = [
    ['', `eka-ci, ${followers} followers`, 'baseline', 'ratio', 'target'],
    [
      'throughput per reader, min / median',
      `${num(minF)} / ${num(median(fl.mbPerS))} MB/s`,
      `${num(minCat)} / ${num(median(f.cat.mbPerS))} MB/s (cat ×${followers})`,
      ratio(minF, minCat),
      `≥ ${TARGET_MB_PER_S} MB/s ${met(minF >= TARGET_MB_PER_S)}`,
    ],
    [
      '  all readers together',
      `${num(fl.mbPerS.reduce((a, b) => a + b, 0))} MB/s`,
      `${num(f.cat.mbPerS.reduce((a, b) => a + b, 0))} MB/s`,
      '',
      '',
    ],
    [
      'first byte, median / worst',
      `${ms(median(fl.firstByteMs))} / ${ms(worstFirst)}`,
      `${ms(f.pipe.firstByteMs)} (pipe)`,
      ratio(worstFirst, f.pipe.firstByteMs),
      `< ${TARGET_FIRST_BYTE_MS} ms ${met(worstFirst < TARGET_FIRST_BYTE_MS)}`,
    ],
    ['  of which builder → stored', ms(fl.firstByteToStoredMs), '', '', ''],
    [
      'line visible, flood p50 / p99',
      pair(fl.flood),
      `${pair(f.pipe.flood)} (pipe)`,
      ratio(fl.flood.p99, f.pipe.flood.p99),
      `p99 < ${TARGET_LINE_P99_MS} ms ${met(p99 < TARGET_LINE_P99_MS)}`,
    ],
    ['  builder → stored, stored → seen', `${pair(fl.floodToStored)}, ${pair(fl.floodStoredToSeen)}`, '', '', ''],
    [
      'line visible, quiet p50 / p99',
      pair(fl.quiet),
      `${pair(f.pipe.quiet)} (pipe)`,
      ratio(fl.quiet.p99, f.pipe.quiet.p99),
      '',
    ],
    ['  worst line, flood / quiet', `${ms(fl.flood.max)} / ${ms(fl.quiet.max)}`, '', '', ''],
    [
      'builder prints',
      `${num(f.builder.inRunMbPerS)} MB/s`,
      `${num(f.builder.pipeMbPerS)} MB/s (pipe)` +
        (f.builder.nixAlone ? `, ${num(f.builder.nixAlone.mbPerS)} MB/s (nix-build -Q)` : ''),
      ratio(f.builder.inRunMbPerS, f.builder.nixAlone?.mbPerS ?? NaN),
      '',
    ],
    [
      '  against Nix showing the log',
      '',
      f.builder.nixShown ? `${num(f.builder.nixShown.mbPerS)} MB/s (nix-build, log read)` : 'not run',
      ratio(f.builder.inRunMbPerS, f.builder.nixShown?.mbPerS ?? NaN),
      '',
    ],
    [
      'coordinator event-loop delay p50/p99/max',
      `${ms(c.eventLoopDelayMs.p50)} / ${ms(c.eventLoopDelayMs.p99)} / ${ms(c.eventLoopDelayMs.max)}`,
      '',
      '',
      '',
    ],
    [
      'coordinator RSS peak (before), CPU',
      `${c.rssMiB.peak} MiB (${c.rssMiB.before}), ${c.cpuPercent} % of a core`,
      `${c.appends.toLocaleString('en-US')} chunks stored, ${c.meanAppendBytes.toLocaleString('en-US')} bytes each`,
      '',
      '',
    ],
    [
      'CPU: agent, followers; machine',
      `${f.agentCpuPercent} %, ${fl.cpuPercent} %; ${f.machineBusyPercent} % of ${availableParallelism()} cores busy`,
      `followers ${f.cat.cpuPercent} % (cat)`,
      '',
      '',
    ],
    [
      'followers got the builder’s bytes',
      `${f.verified.followersMatching} of ${followers}${f.verified.ok ? '' : ` — ${f.verified.notes.join('; ')}`}`,
      `${f.verified.builder.bytes.toLocaleString('en-US')} bytes, sha256 ${f.verified.builder.sha256.slice(0, 12)}…`,
      '',
      f.verified.ok ? 'ok' : 'FAILED',
    ],
    [
      'run',
      `${f.runS} s; attached ${ms(fl.attachedBeforeStartMs)} before the first byte`,
      `clocks ${ms(f.clockSkewMs)} apart`,
      '',
      '',
    ],
  ];
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((row) => row[i]!.length)));
  const lines = rows.map((row) =>
    row
      .map((s, i) => s.padEnd(widths[i]!))
      .join('  ')
      .trimEnd(),
  );
  for (const [who, p] of Object.entries(f.profiles ?? {})) {
    if (!p) continue;
    lines.push('', `where the ${who}'s time went (${(p.busyMs / 1000).toFixed(1)} s busy):`);
    for (const [title, items] of [
      ['by component (self time)', p.components],
      ["this repository's functions, with what they call outside it", p.charged],
    ] as const) {
      lines.push(`  ${title}`);
      for (const item of items.slice(0, 10))
        lines.push(`    ${`${Math.round(item.share * 100)} %`.padStart(5)}  ${item.name}`);
    }
  }
  return lines;
}
