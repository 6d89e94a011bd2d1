import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { StoredJobDiff } from '../graph/diff-store.js';
import type { BuildState } from '../scheduler/build-state.js';
import { type AppliedLimit, type BuildRules, decideBuildLimits, holdsBack } from './build-limits.js';

/** One derivation a review builds: the head or base side of an attribute (`<job>.<attr>`). */
export interface ReviewRoot {
  side: 'head' | 'base';
  drvPath: string;
  attr: string;
  system: string;
}

export interface RootsRequest {
  head: CommitEvaluation;
  /** The rebuild diff of each job against the base; undefined without a base (a push to a branch). */
  diffs: readonly StoredJobDiff[] | undefined;
  /** Attributes asked for by name, relative to their job: `@eka-ci build` commands, OfBorg-style commit titles. */
  named: readonly string[];
  /** What the coordinator knows of a derivation's build (a BuildStore). */
  builds: BuildRecords;
  /** The base's build rules (see build-limits.ts); undefined: none hold anything back. */
  rules?: BuildRules;
}

/** What a review builds, and the limits that held builds back (each with what was built despite it). */
export interface ReviewPlan {
  roots: ReviewRoot[];
  limits: AppliedLimit[];
}

export interface BuildRecords {
  derivation(drvPath: string): { state: BuildState; root_cause?: string | null } | undefined;
}

/** Results that say something about the derivation itself; any other end (cancelled, unbuildable) is no answer. */
const OUTCOMES: ReadonlySet<BuildState> = new Set(['succeeded', 'substituted', 'failed', 'timed-out']);

/**
 * Whether a derivation's build ended with an answer a review can use: it succeeded or failed, or an input of it
 * failed. One cancelled (a newer push superseded its run), unbuildable (no agent for it then) or waiting on such an
 * input has no answer yet: it is built again when a review needs it.
 */
export function hasOutcome(builds: BuildRecords, drvPath: string): boolean {
  const row = builds.derivation(drvPath);
  if (!row) return false;
  if (OUTCOMES.has(row.state)) return true;
  if (row.state !== 'dependency-failed' || !row.root_cause) return false;
  const cause = builds.derivation(row.root_cause)?.state;
  return cause === 'failed' || cause === 'timed-out';
}

/**
 * What a review builds — the one answer for `ekaci review` and the GitHub pipeline:
 *
 * - with a base, the head side of every attribute the change adds or changes, and of every attribute asked for by
 *   name (changed or not); without one, every attribute of the head;
 * - the base side of every changed attribute, unless the base's result is known already (`hasOutcome`): the
 *   comparison needs it, and a base result serves every later review of that base;
 * - never an attribute whose head is skipped, on either side: its `meta.platforms`, or the job's systems, exclude its
 *   system, so a build would only fail for a reason the change did not bring;
 * - of a job and system that a limit holds back (a mass rebuild, a change touching only `skip_build_paths`: see
 *   build-limits.ts), only the attributes asked for by name, on either side.
 */
export function reviewRoots(request: RootsRequest): ReviewPlan {
  const named = new Set(request.named);
  const roots: ReviewRoot[] = [];
  const { diffs, rules } = request;
  const decided = diffs && rules ? decideBuildLimits(diffs, rules) : [];
  const limits = decided.map((limit) => ({ limit, built: [] as ReviewRoot[] }));
  const held = (job: string, system: string): AppliedLimit[] => limits.filter((l) => holdsBack(l.limit, job, system));
  for (const job of request.head.jobs) {
    const diff = request.diffs?.find((d) => d.name === job.name);
    const diffOf = new Map((diff?.attrs ?? []).map((a) => [a.attr, a]));
    const skipped = new Set(job.attrs.filter((a) => a.skipped).map((a) => a.attr));
    for (const a of job.attrs) {
      if (!a.drvPath || a.skipped) continue;
      const change = diffOf.get(a.attr)?.change;
      if (request.diffs !== undefined && !named.has(a.attr) && change !== 'changed' && change !== 'added') continue;
      const system = a.system ?? 'unknown';
      const holding = held(job.name, system);
      if (holding.length > 0 && !named.has(a.attr)) continue;
      const root: ReviewRoot = { side: 'head', drvPath: a.drvPath, attr: `${job.name}.${a.attr}`, system };
      roots.push(root);
      for (const l of holding) l.built.push(root);
    }
    for (const d of diff?.attrs ?? []) {
      if (d.change !== 'changed' || !d.baseDrv || skipped.has(d.attr)) continue;
      if (hasOutcome(request.builds, d.baseDrv)) continue;
      const system = d.system ?? 'unknown';
      if (!named.has(d.attr) && held(job.name, system).length > 0) continue;
      roots.push({ side: 'base', drvPath: d.baseDrv, attr: `${job.name}.${d.attr}`, system });
    }
  }
  return { roots, limits };
}
