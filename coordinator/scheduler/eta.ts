import { storePathName } from '../../common/nix/store-path.js';
import type { DurationEstimate, EstimateSubject } from './build-durations.js';

/**
 * A run's ETA: how long what it still needs will take to build, from how long builds of the same packages took.
 *
 *   ETA = max(critical path, max over systems of remaining work ÷ slots)
 *
 * - Each unfinished derivation is estimated (build-durations.ts): its package's mean on its system, else on any
 *   system, else a guess. One that is building counts only what is left of its estimate: max(0, estimate − elapsed).
 * - The critical path is the longest chain of estimates through the unfinished closure of the run's roots: however
 *   many agents there are, the run cannot end before it. One topological pass, linear in derivations and edges.
 * - The work bound is the remaining work of each system divided by the build slots (`max_jobs`) of the agents
 *   connected for it: with few agents, it is the queue and not the chain that decides. A system no connected
 *   agent builds adds no bound (its derivations are reported unbuildable instead).
 *
 * Both are lower bounds (estimates aside), so the larger is the better one. Computed at most every ETA_REFRESH_MS
 * per run (RunEtas).
 */

/** An unfinished derivation, as the scheduler holds it. */
export interface PendingDerivation {
  system: string;
  fixedOutput: boolean;
  status: 'queued' | 'buildable' | 'building';
  /** Its inputs (finished ones too: `pending` says which are not). */
  inputs: readonly string[];
}

/** What the ETA reads of the build pipeline. */
export interface PendingWork {
  /** An unfinished derivation; undefined when it is finished (or unknown). */
  pending(drvPath: string): PendingDerivation | undefined;
  /** When each build running now started (ms since the epoch). */
  runningSince(): ReadonlyMap<string, number>;
  /** Build slots of the connected agents that build `system`; 0 when none does (or it is not known). */
  slots(system: string): number;
}

export interface DurationSource {
  estimate(d: EstimateSubject): DurationEstimate;
}

export interface RunEta {
  /** Seconds until everything the run needs is built, by the formula above. */
  seconds: number;
  /** Which bound decided: the longest chain, or a system's work over its slots. */
  bound: 'critical-path' | 'work';
  /** The longest chain, from what builds first to a root; a long one keeps its first and last few (see `path`). */
  criticalPath: string[];
  criticalPathLength: number;
  /** Seconds along the critical path alone. */
  criticalPathSeconds: number;
  /** Unfinished derivations estimated from recorded builds of their package, and those guessed. */
  basis: { estimated: number; guessed: number };
  /** When it was computed (ms since the epoch). */
  computedAt: number;
}

// A critical path this long is shown whole; a longer one keeps its first PATH_HEAD steps and its last PATH_TAIL.
const PATH_HEAD = 8;
const PATH_TAIL = 2;

/** The ETA of the unfinished closure of `roots`; null when nothing in it is unfinished. */
export function estimateEta(
  roots: Iterable<string>,
  work: PendingWork,
  durations: DurationSource,
  now: number,
): RunEta | null {
  const running = work.runningSince();
  // Per derivation touched: its facts (undefined: finished), and once computed the longest chain ending in it.
  const info = new Map<string, PendingDerivation | undefined>();
  const pendingOf = (drv: string): PendingDerivation | undefined => {
    if (info.has(drv)) return info.get(drv);
    const p = work.pending(drv);
    info.set(drv, p);
    return p;
  };
  const finish = new Map<string, number>();
  const via = new Map<string, string>();
  const expanded = new Set<string>();
  const workBySystem = new Map<string, number>();
  let estimated = 0;
  let guessed = 0;

  // Iterative depth-first post-order (chains run thousands deep): a node is computed once all its unfinished
  // inputs are. A node may sit on the stack more than once (once per edge at most); extra copies are skipped.
  const stack: string[] = [];
  const rootList: string[] = [];
  for (const r of roots) {
    if (pendingOf(r) === undefined) continue;
    rootList.push(r);
    stack.push(r);
  }
  while (stack.length > 0) {
    const drv = stack[stack.length - 1]!;
    if (finish.has(drv)) {
      stack.pop();
      continue;
    }
    const node = pendingOf(drv)!;
    if (!expanded.has(drv)) {
      expanded.add(drv);
      for (const input of node.inputs) {
        // An input expanded but not finished would be a cycle: derivations have none, bad data gets no loop.
        if (!finish.has(input) && !expanded.has(input) && pendingOf(input) !== undefined) stack.push(input);
      }
      continue;
    }
    stack.pop();
    let before = 0;
    let longest: string | undefined;
    for (const input of node.inputs) {
      const f = finish.get(input);
      if (f !== undefined && (longest === undefined || f > before)) {
        before = f;
        longest = input;
      }
    }
    const e = durations.estimate({ drvPath: drv, system: node.system, fixedOutput: node.fixedOutput });
    if (e.basis === 'guess') guessed++;
    else estimated++;
    const since = node.status === 'building' ? running.get(drv) : undefined;
    const remaining = since === undefined ? e.seconds : Math.max(0, e.seconds - Math.max(0, now - since) / 1000);
    finish.set(drv, before + remaining);
    if (longest !== undefined) via.set(drv, longest);
    workBySystem.set(node.system, (workBySystem.get(node.system) ?? 0) + remaining);
  }
  if (rootList.length === 0) return null;

  let end = rootList[0]!;
  for (const r of rootList) if (finish.get(r)! > finish.get(end)!) end = r;
  const chain: string[] = [];
  for (let at: string | undefined = end; at !== undefined; at = via.get(at)) chain.push(at);
  chain.reverse();
  const criticalPathSeconds = finish.get(end)!;
  let workSeconds = 0;
  for (const [system, seconds] of workBySystem) {
    const slots = work.slots(system);
    if (slots > 0) workSeconds = Math.max(workSeconds, seconds / slots);
  }
  return {
    seconds: Math.round(Math.max(criticalPathSeconds, workSeconds)),
    bound: workSeconds > criticalPathSeconds ? 'work' : 'critical-path',
    criticalPath:
      chain.length <= PATH_HEAD + PATH_TAIL ? chain : [...chain.slice(0, PATH_HEAD), ...chain.slice(-PATH_TAIL)],
    criticalPathLength: chain.length,
    criticalPathSeconds: Math.round(criticalPathSeconds),
    basis: { estimated, guessed },
    computedAt: now,
  };
}

// The pipeline redraws a run's checks every 2 s (PROGRESS_REFRESH_MS); an ETA is computed at most this often per run,
// and API reads in between reuse it.
export const ETA_REFRESH_MS = 2_000;
// A run's ETA not asked for in this long is forgotten (the run ended, nobody looks).
const ETA_FORGET_MS = 60_000;

/** ETAs of runs (or any set of roots), each computed at most every ETA_REFRESH_MS. */
export class RunEtas {
  private readonly cache = new Map<string, { eta: RunEta | null; at: number; askedAt: number }>();
  private lastSweep = 0;

  constructor(
    private readonly work: PendingWork,
    private readonly durations: DurationSource,
    private readonly now: () => number = Date.now,
  ) {}

  /** The ETA of what `key` (a run) still needs; `roots` is called only when it is computed again. */
  of(key: string, roots: () => Iterable<string>): RunEta | null {
    const now = this.now();
    this.sweep(now);
    const hit = this.cache.get(key);
    if (hit && now - hit.at < ETA_REFRESH_MS) {
      hit.askedAt = now;
      return hit.eta;
    }
    const eta = estimateEta(roots(), this.work, this.durations, now);
    // Nothing unfinished is not kept: it costs only the roots to see, and the builds may be queued a moment later.
    if (eta) this.cache.set(key, { eta, at: now, askedAt: now });
    else this.cache.delete(key);
    return eta;
  }

  private sweep(now: number): void {
    if (now - this.lastSweep < ETA_FORGET_MS) return;
    this.lastSweep = now;
    for (const [key, v] of this.cache) if (now - v.askedAt >= ETA_FORGET_MS) this.cache.delete(key);
  }
}

/** "about 14 min left" */
export function etaShort(eta: RunEta): string {
  return `about ${duration(eta.seconds)} left`;
}

/** "about 14 min left (critical path: gcc-13.2 → glibc-2.39 → … → hello-2.12)", and how much was guessed. */
export function etaText(eta: RunEta): string {
  return `${etaShort(eta)} (${etaDetail(eta)})`;
}

/** "critical path: gcc-13.2 → glibc-2.39 → … → hello-2.12", what decided, and how many builds were guessed. */
export function etaDetail(eta: RunEta): string {
  const names = eta.criticalPath.map((d) => storePathName(d).replace(/\.drv$/, ''));
  const shown = names.length <= 3 ? names : [...names.slice(0, 2), '…', names.at(-1)!];
  const guessed = eta.basis.guessed;
  const total = eta.basis.estimated + guessed;
  const bound = eta.bound === 'work' ? '; the queue, not the chain, decides' : '';
  const guesses = guessed === 0 ? '' : `; ${guessed} of ${total} builds never built before, guessed`;
  return `critical path: ${shown.join(' → ')}${bound}${guesses}`;
}

/** 40 s, 14 min, 2 h 10 min. */
export function duration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const minutes = Math.round(s / 60);
  if (minutes < 60) return `${minutes} min`;
  const h = Math.floor(minutes / 60);
  const m = minutes % 60;
  return m === 0 ? `${h} h` : `${h} h ${m} min`;
}
