/**
 * The arithmetic of bench/fleet: percentiles, the sustained assignment rate, which slot waits count against the
 * coordinator, and a CPU profile boiled down to the functions and components the time went to.
 */
import type { LeaseRecord, SlotRecord } from './fleet-agents.js';

export interface Stats {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

/** Nearest-rank percentiles. */
export function summarise(values: readonly number[]): Stats {
  const sorted = Float64Array.from(values).sort();
  const at = (p: number): number =>
    sorted.length === 0 ? NaN : sorted[Math.max(0, Math.ceil(p * sorted.length) - 1)]!;
  return { n: sorted.length, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: at(1) };
}

// The steady-state middle of a run: from the 10th to the 90th percentile of assignments. The start is the
// bootstrap chain (one buildable derivation at a time), the end the thin top of the DAG; neither says anything
// about how fast the coordinator hands out work.
const STEADY_FROM = 0.1;
const STEADY_TO = 0.9;

/** Assignments per second over the steady-state middle, and the busiest single second. */
export function assignmentRates(assignedAt: readonly number[]): { sustained: number; peakSecond: number } {
  const t = Float64Array.from(assignedAt).sort();
  if (t.length < 2) return { sustained: NaN, peakSecond: t.length };
  const from = Math.floor(t.length * STEADY_FROM);
  const to = Math.ceil(t.length * STEADY_TO) - 1;
  const sustained = ((to - from) / (t[to]! - t[from]!)) * 1000;
  let peakSecond = 0;
  for (let i = 0, j = 0; i < t.length; i++) {
    while (t[i]! - t[j]! >= 1000) j++;
    peakSecond = Math.max(peakSecond, i - j + 1);
  }
  return { sustained, peakSecond };
}

export interface SlotWaits {
  /**
   * Waits of slots that, when they freed, had at least as much buildable work as there were slots waiting; each
   * counted for the part of it during which that still held (see `slotWaits`).
   */
  coordinatorBound: Stats;
  /** Every wait, whole, those the DAG imposed (nothing buildable) included. */
  all: Stats;
  /** Per second of the dispatch phase: buildable derivations and free slots waiting at its start. */
  perSecond: Array<{ buildable: number; waiting: number }>;
}

/**
 * Time from a slot freeing to its next Assign, counting only what the coordinator is to blame for. A wait counts if,
 * when the slot freed, the coordinator held at least as many buildable derivations as there were free slots waiting
 * (this one included), so that every waiting slot could have been given work; and it counts for the time during
 * which that held. A slot that freed as the last wide layer was being handed out, and then waited through the thin
 * top of the DAG for work that did not exist yet, is the coordinator's only until the buildable work ran out.
 *
 * "Buildable" is reconstructed from the agents' clocks: a derivation is buildable from the Ack of the last of its
 * inputs' results (the coordinator acknowledges a result after committing it and queueing what it unblocked) until
 * its Assign arrives — a little later on both ends than the coordinator's own view, never earlier.
 */
export function slotWaits(
  deps: readonly (readonly number[])[],
  nodeOf: (drvPath: string) => number,
  leases: readonly LeaseRecord[],
  slots: readonly SlotRecord[],
  from: number,
  end: number,
): SlotWaits {
  const byNode: LeaseRecord[][] = deps.map(() => []);
  for (const l of leases) byNode[nodeOf(l[0])]!.push(l);
  for (const list of byNode) list.sort((a, b) => a[2] - b[2]);
  // When each derivation's success reached its agent: its last lease's Ack, if that lease succeeded.
  const doneAt = byNode.map((list) => {
    const last = list.at(-1);
    return last && last[5] === 1 && last[4] >= 0 ? last[4] : Infinity;
  });
  // [time, Δbuildable, Δwaiting, query]: at equal times changes come before queries. A query is a slot freeing
  // (its index), a slot's Assign (-3 - index), or the start of a second (SECOND).
  const SECOND = -2;
  const events: Array<[number, number, number, number]> = [];
  const interval = (a: number, b: number): void => {
    if (a >= b) return;
    events.push([a, 1, 0, -1], [b, -1, 0, -1]);
  };
  byNode.forEach((list, i) => {
    let readyAt = deps[i]!.reduce((t, j) => Math.max(t, doneAt[j]!), -Infinity);
    for (const l of list) {
      interval(readyAt, l[2]);
      // A lease that did not count (failed, refused, lost) makes the derivation buildable again.
      readyAt = l[4] >= 0 ? l[4] : Infinity;
    }
    if (list.length === 0 || list.at(-1)![5] !== 1) interval(readyAt, end);
  });
  const assignedAt = (s: SlotRecord): number => (s[2] >= 0 ? s[2] : end);
  slots.forEach((s, k) => {
    events.push([s[1], 0, 1, -1], [assignedAt(s), 0, -1, -1], [s[1], 0, 0, k], [assignedAt(s), 0, 0, -3 - k]);
  });
  const seconds = Math.max(0, Math.ceil((end - from) / 1000));
  for (let s = 0; s < seconds; s++) events.push([from + s * 1000, 0, 0, SECOND]);
  events.sort((a, b) => a[0] - b[0] || Number(a[3] !== -1) - Number(b[3] !== -1));

  const all: number[] = [];
  const perSecond: SlotWaits['perSecond'] = [];
  // How long, up to now, every waiting slot could have had work: a slot's counted wait is its growth over the wait.
  let bound = 0;
  const boundAtFree = new Map<number, number>();
  const counted: number[] = [];
  let buildable = 0;
  let waiting = 0;
  let at = -Infinity;
  for (const [time, db, dw, q] of events) {
    if (waiting > 0 && buildable >= waiting && time > at) bound += time - at;
    at = time;
    buildable += db;
    waiting += dw;
    if (q >= 0) {
      const s = slots[q]!;
      all.push(assignedAt(s) - s[1]);
      if (buildable >= waiting) boundAtFree.set(q, bound);
    } else if (q <= -3) {
      const since = boundAtFree.get(-3 - q);
      if (since !== undefined) counted.push(bound - since);
    } else if (q === SECOND) perSecond.push({ buildable, waiting });
  }
  return { coordinatorBound: summarise(counted), all: summarise(all), perSecond };
}

/** The parts of a V8 CPU profile (`Profiler.stop`, a `.cpuprofile` file) read here. */
export interface CpuProfile {
  nodes: Array<{
    id: number;
    callFrame: { functionName: string; url: string; lineNumber: number };
    children?: number[];
  }>;
  samples?: number[];
  startTime: number;
  endTime: number;
}

export interface ProfileSummary {
  /** Non-idle time the profile covers. */
  busyMs: number;
  /** Time spent in each component (self time): a file of this repository, a package, Node's internals, GC. */
  components: Array<{ name: string; ms: number; share: number }>;
  /**
   * This repository's functions by self time, with the time of what they called outside it (SQLite, file system,
   * gRPC, Koa) charged to them: what each of our functions costs, its system calls included.
   */
  charged: Array<{ name: string; ms: number; share: number }>;
  /** This repository's functions by time spent in them and everything they called. */
  inclusive: Array<{ name: string; ms: number; share: number }>;
}

const TOP = 15;

/** Boils a CPU profile down to where the time went; `root` is stripped from file names. */
export function summariseProfile(profile: CpuProfile, root: string): ProfileSummary {
  const samples = profile.samples ?? [];
  const msPerSample = samples.length === 0 ? 0 : (profile.endTime - profile.startTime) / 1000 / samples.length;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const prefix = `file://${root.replace(/\/$/, '')}/`;
  const ours = (url: string): boolean => url.startsWith(prefix) && !url.includes('/node_modules/');
  // Line numbers are left out: under tsx they are those of the transpiled code, not of the source.
  const fnName = (id: number): string => {
    const f = byId.get(id)!.callFrame;
    return `${f.url.slice(prefix.length)}:${f.functionName || '(anonymous)'}`;
  };
  const component = (id: number): string => {
    const { url, functionName } = byId.get(id)!.callFrame;
    if (url === '') return functionName.startsWith('(') ? functionName : '(native)';
    const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
    if (pkg) return pkg[1]!;
    if (url.startsWith('node:')) return 'node: (internals)';
    return url.startsWith(prefix) ? url.slice(prefix.length) : url;
  };
  const components = new Map<string, number>();
  const charged = new Map<string, number>();
  const inclusive = new Map<string, number>();
  let busy = 0;
  for (const id of samples) {
    if (byId.get(id)!.callFrame.functionName === '(idle)') continue;
    busy++;
    bump(components, component(id));
    let nearest: string | undefined;
    const seen = new Set<string>();
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      if (!ours(byId.get(at)!.callFrame.url)) continue;
      const name = fnName(at);
      nearest ??= name;
      if (!seen.has(name)) bump(inclusive, name);
      seen.add(name);
    }
    bump(charged, nearest ?? `${component(id)} (no caller of ours)`);
  }
  const top = (m: Map<string, number>): Array<{ name: string; ms: number; share: number }> =>
    [...m]
      .sort((a, b) => b[1] - a[1])
      .slice(0, TOP)
      .map(([name, n]) => ({ name, ms: Math.round(n * msPerSample), share: busy === 0 ? 0 : n / busy }));
  return {
    busyMs: Math.round(busy * msPerSample),
    components: top(components),
    charged: top(charged),
    inclusive: top(inclusive),
  };
}

function bump(m: Map<string, number>, key: string): void {
  m.set(key, (m.get(key) ?? 0) + 1);
}
