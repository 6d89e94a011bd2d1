import type { RunRow, RunRoot } from '../github/run-store.js';
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

/**
 * The builds a run caused — every attempt in its roots' closure assigned since the run was created — per agent over
 * time, and its critical path: from the build that finished last, back through the input that finished last before
 * it started, down to a build that waited for nothing built in this run.
 */
export function runTimeline(store: BuildStore, run: RunRow, roots: readonly RunRoot[]): RunTimeline {
  const inputsOf = store.db.prepare('SELECT input_drv FROM derivation_inputs WHERE drv_path = ?').pluck();
  const attrs = new Map(roots.map((r) => [r.drvPath, r.attr]));
  const seen = new Set<string>(roots.map((r) => r.drvPath));
  const queue = [...seen];
  let truncated = false;
  for (let i = 0; i < queue.length; i++) {
    for (const input of inputsOf.all(queue[i]) as string[]) {
      if (seen.has(input)) continue;
      if (seen.size >= MAX_CLOSURE) {
        truncated = true;
        break;
      }
      seen.add(input);
      queue.push(input);
    }
  }
  const builds: TimelineBuild[] = [];
  const last = new Map<string, AttemptRow>();
  for (const drv of queue) {
    for (const a of store.attemptsOf(drv)) {
      if (a.assigned_at < run.created_at) continue;
      builds.push({
        drvPath: drv,
        attr: attrs.get(drv) ?? null,
        attempt: a.attempt,
        agentId: a.agent_id,
        state: a.state,
        assignedAt: a.assigned_at,
        startedAt: a.started_at,
        finishedAt: a.finished_at,
        critical: false,
      });
      last.set(drv, a);
    }
  }
  const criticalPath: string[] = [];
  let at = [...last.values()].filter((a) => a.finished_at !== null).sort((a, b) => b.finished_at! - a.finished_at!)[0];
  while (at) {
    criticalPath.unshift(at.drv_path);
    const begun = at.started_at ?? at.assigned_at;
    at = (inputsOf.all(at.drv_path) as string[])
      .map((i) => last.get(i))
      .filter((a): a is AttemptRow => a !== undefined && a.finished_at !== null && a.finished_at <= begun)
      .sort((a, b) => b.finished_at! - a.finished_at!)[0];
  }
  const onPath = new Set(criticalPath);
  for (const b of builds) b.critical = onPath.has(b.drvPath) && last.get(b.drvPath)?.attempt === b.attempt;
  builds.sort((a, b) => a.assignedAt - b.assignedAt);
  return { closure: seen.size, truncated, builds, criticalPath };
}
