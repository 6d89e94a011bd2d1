import type { EvalResult } from '../eval/eval-result.js';
import type { StoredJobDiff } from '../graph/diff-store.js';
import type { BuildState } from '../scheduler/build-state.js';
import { classifyOutcome, summarise } from './classify.js';
import { changeSummarySteps, isEmptySummary } from './change-summary.js';
import { diffClosures, runtimeClosure } from './closure-diff.js';
import type { AttrReview, BuildOutcomeName, OutputSizes, Review, SideResult } from './model.js';
import { type SizesByOutput, compareSizes, compareWithBranch } from './sizes.js';
import { runStepsTurning, turn } from '../../common/turn.js';

/** What the builder needs to know about one derivation's build, from the coordinator's database. */
export interface BuildFacts {
  state: BuildState;
  rootCause: string | null;
  outputs: Array<{ name: string; path: string; narSize: number | null; closureSize: number | null }>;
}

export interface ReviewInputs {
  baseRev: string;
  headRev: string;
  jobs: ReadonlyArray<{
    name: string;
    /** The job's gates (the base's: see base-policy). */
    allowEvalFailures: boolean;
    maxIncreasePercent: number | undefined;
    /** `size_check.base_branch`: sizes compare with that branch's newest recorded build (`branchSizes`). */
    sizeBaseBranch?: string | undefined;
    diff: StoredJobDiff;
    base: readonly EvalResult[];
    head: readonly EvalResult[];
  }>;
  build(drvPath: string): BuildFacts | undefined;
  /** The last `lines` lines of the newest build log of a derivation. */
  logTail(drvPath: string, lines: number): string;
  /** A store path's references, from the binary cache; [] when unknown. */
  references(path: string): Promise<string[]>;
  /** An attribute's sizes in the newest recorded build of a branch (see SizeHistory); undefined when there is none. */
  branchSizes?(branch: string, job: string, attr: string): { commit: string; sizes: SizesByOutput } | undefined;
}

// As many log lines as a reviewer reads before opening the full log.
const ROOT_CAUSE_LOG_LINES = 30;

/** Assembles the review of a change from its rebuild diff, evaluations and build results. */
// Attributes reviewed between two turns of the event loop (a nixpkgs review is 100,000 of them).
const TURN_EVERY = 2_000;

export async function buildReview(inputs: ReviewInputs): Promise<Review> {
  const attrs: AttrReview[] = [];
  let done = 0;
  for (const job of inputs.jobs) {
    const baseByAttr = new Map(job.base.map((a) => [a.attr, a]));
    const headByAttr = new Map(job.head.map((a) => [a.attr, a]));
    for (const d of job.diff.attrs) {
      if (++done % TURN_EVERY === 0) await turn();
      const baseEval = baseByAttr.get(d.attr);
      const headEval = headByAttr.get(d.attr);
      const base = baseEval ? side(baseEval, inputs) : undefined;
      const head = headEval ? side(headEval, inputs) : undefined;
      const review: AttrReview = {
        job: job.name,
        attr: d.attr,
        system: d.system,
        change: d.change,
        ...(base ? { base } : {}),
        ...(head ? { head } : {}),
      };
      const outcome = classifyOutcome(base, head, d.change);
      if (outcome) review.outcome = outcome;
      if (job.allowEvalFailures && head?.eval === 'error') review.evalFailuresAllowed = true;
      const rootCause = head?.drv ? inputs.build(head.drv)?.rootCause : null;
      if (head?.build === 'dependency-failed' && rootCause) {
        review.rootCauses = [{ drv: rootCause, logTail: inputs.logTail(rootCause, ROOT_CAUSE_LOG_LINES) }];
      }
      const sizes = attrSizes(job, d.attr, d.change, base, head, inputs);
      if (sizes.length > 0) review.sizes = sizes;
      if (d.change === 'changed' && base?.drv && head?.drv) {
        if (base.build === 'succeeded' && head.build === 'succeeded') {
          const dependencies = diffClosures(
            await closureOf(inputs.build(base.drv), inputs),
            await closureOf(inputs.build(head.drv), inputs),
          );
          if (dependencies.length > 0) review.dependencies = dependencies;
        }
      }
      attrs.push(review);
    }
  }
  const result: Review = {
    base: { rev: inputs.baseRev },
    head: { rev: inputs.headRev },
    attrs,
    summary: summarise(attrs),
  };
  // Over every attribute of both sides, not the diff's: a meta-only change (a license) leaves the drv alike.
  const changes = await runStepsTurning(changeSummarySteps(inputs.jobs));
  if (!isEmptySummary(changes)) result.changes = changes;
  return result;
}

function side(e: EvalResult, inputs: ReviewInputs): SideResult {
  if (e.error || !e.drvPath)
    return { drv: e.drvPath ?? null, eval: 'error', error: e.error ?? 'no derivation', build: 'not-built' };
  const result: SideResult = { drv: e.drvPath, eval: 'ok', build: outcomeName(inputs.build(e.drvPath)?.state) };
  if (e.skipped) result.skipped = true;
  return result;
}

export function outcomeName(state: BuildState | undefined): BuildOutcomeName {
  switch (state) {
    case 'succeeded':
    case 'substituted':
      return 'succeeded';
    case 'failed':
    case 'dependency-failed':
    case 'timed-out':
    case 'unbuildable':
    case 'cancelled':
      return state;
    default:
      return 'not-built';
  }
}

/**
 * Base and head sizes of a changed attribute. A job with size_check.base_branch measures an added attribute too, and
 * against that branch's newest recorded build where there is one (see compareWithBranch).
 */
function attrSizes(
  job: ReviewInputs['jobs'][number],
  attr: string,
  change: AttrReview['change'],
  base: SideResult | undefined,
  head: SideResult | undefined,
  inputs: ReviewInputs,
): OutputSizes[] {
  if (!head?.drv || (change !== 'changed' && change !== 'added')) return [];
  const headOut = sizesOf(inputs.build(head.drv));
  const prBase =
    change === 'changed' && base?.drv ? { commit: inputs.baseRev, sizes: sizesOf(inputs.build(base.drv)) } : undefined;
  if (job.sizeBaseBranch) {
    const newest = inputs.branchSizes?.(job.sizeBaseBranch, job.name, attr);
    return compareWithBranch(job.sizeBaseBranch, newest, prBase, headOut, job.maxIncreasePercent);
  }
  return prBase ? compareSizes(prBase.sizes, headOut, job.maxIncreasePercent) : [];
}

function sizesOf(facts: BuildFacts | undefined): Record<string, { narSize: number; closureSize: number }> | undefined {
  if (!facts || facts.outputs.every((o) => o.narSize === null)) return undefined;
  return Object.fromEntries(
    facts.outputs.map((o) => [o.name, { narSize: o.narSize ?? 0, closureSize: o.closureSize ?? 0 }]),
  );
}

async function closureOf(facts: BuildFacts | undefined, inputs: ReviewInputs): Promise<string[]> {
  if (!facts) return [];
  return [
    ...(await runtimeClosure(
      facts.outputs.map((o) => o.path),
      (p) => inputs.references(p),
    )),
  ];
}
