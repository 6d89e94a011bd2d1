import type { RunRow, RunRoot } from '../github/run-store.js';
import { LRUCache } from 'lru-cache';
import { turn } from '../../common/turn.js';
import type { AttemptRow, BuildStore } from '../scheduler/build-store.js';

/** One attempt on the timeline of a run. */
export interface TimelineBuild {
  drvPath: string;
  /** The attribute, for a root of the run. */
  attr: string | null;
  attempt: number;
  agentId: string;
  state: string;
  assignedAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  critical: boolean;
}

export interface RunTimeline {
  /** Derivations of the run's closure looked at; `truncated` when the closure was larger than the walk allows. */
  closure: number;
  truncated: boolean;
  builds: TimelineBuild[];
  /** From the first build to the last to finish, each waiting for the one before: what decided how long it took. */
  criticalPath: string[];
}

// A nixpkgs pull request's closure is some 30–60k derivations; the walk stops well past that.
const MAX_CLOSURE = 250_000;
// Derivations asked about per query; the event loop gets a turn between queries. A query of this many takes some
// 10 ms, where the whole of a 30,000-derivation closure held the loop for 0.3–0.45 s.
const CHUNK = 2_000;

/**
 * The builds a run caused — every attempt in its roots' closure assigned since the run was created — per agent over
 * time, and its critical path: from the build that finished last, back through the input that finished last before
 * it started, down to a build that waited for nothing built in this run.
 */
export async function runTimeline(store: BuildStore, run: RunRow, roots: readonly RunRoot[]): Promise<RunTimeline> {
  const inputsOf = store.db.prepare<[string], { drv_path: string; input_drv: string }>(
    'SELECT drv_path, input_drv FROM derivation_inputs WHERE drv_path IN (SELECT value FROM json_each(?))',
  );
  const attemptsOf = store.db.prepare<[string, number], AttemptRow>(
    'SELECT * FROM attempts WHERE drv_path IN (SELECT value FROM json_each(?)) AND assigned_at >= ? ORDER BY attempt',
  );
  const attrs = new Map(roots.map((r) => [r.drvPath, r.attr]));
  const inputs = new Map<string, string[]>();
  const seen = new Set<string>(roots.map((r) => r.drvPath));
  const queue = [...seen];
  let truncated = false;
  for (let done = 0; done < queue.length && !truncated;) {
    if (done > 0) await turn();
    const chunk = queue.slice(done, done + CHUNK);
    done += chunk.length;
    for (const { drv_path: drv, input_drv: input } of inputsOf.iterate(JSON.stringify(chunk))) {
      const list = inputs.get(drv);
      if (list) list.push(input);
      else inputs.set(drv, [input]);
      if (seen.has(input)) continue;
      if (seen.size >= MAX_CLOSURE) {
        truncated = true;
        continue;
      }
      seen.add(input);
      queue.push(input);
    }
  }
  const builds: TimelineBuild[] = [];
  const last = new Map<string, AttemptRow>();
  for (let done = 0; done < queue.length; done += CHUNK) {
    await turn();
    for (const a of attemptsOf.all(JSON.stringify(queue.slice(done, done + CHUNK)), run.created_at)) {
      builds.push({
        drvPath: a.drv_path,
        attr: attrs.get(a.drv_path) ?? null,
        attempt: a.attempt,
        agentId: a.agent_id,
        state: a.state,
        assignedAt: a.assigned_at,
        startedAt: a.started_at,
        finishedAt: a.finished_at,
        critical: false,
      });
      last.set(a.drv_path, a);
    }
  }
  const criticalPath: string[] = [];
  let at = [...last.values()].filter((a) => a.finished_at !== null).sort((a, b) => b.finished_at! - a.finished_at!)[0];
  while (at) {
    criticalPath.unshift(at.drv_path);
    const begun = at.started_at ?? at.assigned_at;
    at = (inputs.get(at.drv_path) ?? [])
      .map((i) => last.get(i))
      .filter((a): a is AttemptRow => a !== undefined && a.finished_at !== null && a.finished_at <= begun)
      .sort((a, b) => b.finished_at! - a.finished_at!)[0];
  }
  const onPath = new Set(criticalPath);
  for (const b of builds) b.critical = onPath.has(b.drvPath) && last.get(b.drvPath)?.attempt === b.attempt;
  builds.sort((a, b) => a.assignedAt - b.assignedAt);
  return { closure: seen.size, truncated, builds, criticalPath };
}

// A timeline is reused for this many times what computing it took; runs kept at once.
const REUSE_FACTOR = 10;
const CACHED_RUNS = 64;

/**
 * Timelines as recently computed, per run. A page open on a building run reads its timeline again every two seconds,
 * and ten such pages on a run of 30,000 derivations would recompute it (0.4 s each) ten times as often. A timeline
 * is reused for REUSE_FACTOR times what it took to compute — 4 s for that run, a few milliseconds for a small one,
 * which is as good as fresh — and the requests that arrive while it is computed share it: however many read it, a
 * run's timeline costs the coordinator at most a tenth of its time.
 */
export class TimelineCache {
  private readonly entries = new LRUCache<number, { startedAt: number; costMs: number; value: Promise<RunTimeline> }>({
    max: CACHED_RUNS,
  });

  constructor(
    private readonly store: BuildStore,
    private readonly now: () => number = () => performance.now(),
  ) {}

  timeline(run: RunRow, roots: () => readonly RunRoot[]): Promise<RunTimeline> {
    const startedAt = this.now();
    const hit = this.entries.get(run.id);
    // A cost below 0: still being computed.
    if (hit && (hit.costMs < 0 || startedAt - hit.startedAt < hit.costMs * REUSE_FACTOR)) return hit.value;
    const entry = { startedAt, costMs: -1, value: runTimeline(this.store, run, roots()) };
    this.entries.set(run.id, entry);
    entry.value.then(
      () => (entry.costMs = this.now() - startedAt),
      () => this.entries.get(run.id) === entry && this.entries.delete(run.id),
    );
    return entry.value;
  }
}
