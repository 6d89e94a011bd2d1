import type { AttrReview, BuildOutcomeName, Change, CheckResult, Outcome, Review, SideResult } from './model.js';

/** Build results that count against the change: the attribute did not produce its outputs. */
const FAILING: ReadonlySet<BuildOutcomeName> = new Set(['failed', 'dependency-failed', 'timed-out']);

type Verdict = 'ok' | 'failing' | 'unknown';

/**
 * Whether one side's build settled the question. `not-built`, `unbuildable` and `cancelled` say nothing about
 * the derivation itself, and an evaluation error means there was nothing to build: those are `unknown`.
 */
function verdict(side: SideResult): Verdict {
  if (side.eval === 'error') return 'unknown';
  if (side.build === 'succeeded') return 'ok';
  return FAILING.has(side.build) ? 'failing' : 'unknown';
}

/**
 * How an attribute's build moved between base and head.
 *
 * For a `changed` attribute (both sides evaluated to different derivations):
 *
 * | base                                    | head                                    | outcome            |
 * | --------------------------------------- | --------------------------------------- | ------------------ |
 * | succeeded                               | failed, dependency-failed, timed-out    | `newly-failing`    |
 * | failed, dependency-failed, timed-out    | failed, dependency-failed, timed-out    | `still-failing`    |
 * | failed, dependency-failed, timed-out    | succeeded                               | `newly-succeeding` |
 * | succeeded                               | succeeded                               | `still-succeeding` |
 *
 * Anything else — a side missing, not built, unbuildable or cancelled, or an evaluation error on either side — is
 * `undefined`: there is no honest comparison to make. Evaluation errors are reported separately (`eval-failing`).
 *
 * An `added` attribute whose head build fails is `newly-failing`: before the change the package set had no such
 * failure, and merging would introduce one. An added attribute that builds gets no outcome; being `added` says it.
 * `removed` and `unchanged` attributes get no outcome — the first has nothing to build on head, the second builds
 * the very same derivation on both sides, so any difference is flakiness, not the change.
 */
export function classifyOutcome(
  base: SideResult | undefined,
  head: SideResult | undefined,
  change: Change,
): Outcome | undefined {
  if (change === 'added') return head !== undefined && verdict(head) === 'failing' ? 'newly-failing' : undefined;
  if (change !== 'changed' || base === undefined || head === undefined) return undefined;
  const before = verdict(base);
  const after = verdict(head);
  if (before === 'unknown' || after === 'unknown') return undefined;
  if (before === 'ok') return after === 'ok' ? 'still-succeeding' : 'newly-failing';
  return after === 'ok' ? 'newly-succeeding' : 'still-failing';
}

/** An evaluation error on head that base did not have (including on an attribute the change adds). */
export function isNewEvalFailure(attr: AttrReview): boolean {
  return attr.head?.eval === 'error' && attr.base?.eval !== 'error';
}

/**
 * The one rule for "an evaluation error makes the change red": the attribute fails to evaluate on head, did not fail
 * on base (an added attribute, or a push without a base, has no base to fail), and its job does not allow evaluation
 * failures. The review's verdict, the summary and evaluation checks, `ekaci review` and `ekaci eval` all decide with
 * it, and the merge policy reads those checks, so `allow_eval_failures` means the same thing everywhere.
 */
export function evalFailureBlocks(f: {
  headFailed: boolean;
  baseFailed: boolean;
  allowEvalFailures: boolean;
}): boolean {
  return f.headFailed && !f.baseFailed && !f.allowEvalFailures;
}

/** A new evaluation error that makes the review fail (see `evalFailureBlocks`). */
export function isBlockingEvalFailure(attr: AttrReview): boolean {
  return evalFailureBlocks({
    headFailed: attr.head?.eval === 'error',
    baseFailed: attr.base?.eval === 'error',
    allowEvalFailures: attr.evalFailuresAllowed === true,
  });
}

/** The keys of `Review.summary`, in the order they are shown. Every key is present, zero or not. */
export const SUMMARY_KEYS = [
  'newly-failing',
  'eval-failing',
  'still-failing',
  'newly-succeeding',
  'still-succeeding',
  'added',
  'removed',
  'size-warnings',
] as const;

export type SummaryKey = (typeof SUMMARY_KEYS)[number];

/**
 * Counts for `Review.summary`: attributes per outcome, added and removed attributes, new evaluation failures, and
 * attributes with at least one output over the size threshold (an attribute counts once however many outputs grew).
 */
export function summarise(attrs: readonly AttrReview[]): Record<SummaryKey, number> {
  const counts = Object.fromEntries(SUMMARY_KEYS.map((key) => [key, 0])) as Record<SummaryKey, number>;
  for (const attr of attrs) {
    if (attr.outcome !== undefined) counts[attr.outcome]++;
    if (attr.change === 'added') counts.added++;
    if (attr.change === 'removed') counts.removed++;
    if (isNewEvalFailure(attr)) counts['eval-failing']++;
    if (attr.sizes?.some((s) => s.warning)) counts['size-warnings']++;
  }
  return counts;
}

/**
 * Whether the change makes anything newly fail, to build or to evaluate (where its job does not allow evaluation
 * failures) — the exit status 1 of `ekaci review` and the failure conclusion of the check run. Size warnings and
 * still-failing attributes do not count: the first are for a human to weigh, the second were broken before the change.
 */
export function isNewlyFailing(review: Pick<Review, 'attrs'>): boolean {
  return review.attrs.some((attr) => attr.outcome === 'newly-failing' || isBlockingEvalFailure(attr));
}

const CHECK_FAILURES: ReadonlySet<CheckResult['state']> = new Set(['failed', 'timed-out', 'cancelled', 'unbuildable']);

/** The repository checks that ended without passing. */
export function failedChecks(review: Pick<Review, 'checks'>): CheckResult[] {
  return (review.checks ?? []).filter((c) => CHECK_FAILURES.has(c.state));
}

/** The head derivations the review counts as newly failing to build (each build check fails on its own). */
export function newlyFailingDrvs(review: Pick<Review, 'attrs'> | undefined): Set<string> {
  return new Set(
    (review?.attrs ?? []).flatMap((a) => (a.outcome === 'newly-failing' && a.head?.drv ? [a.head.drv] : [])),
  );
}

/** Builds that say nothing about the derivation: nobody could build it, it was stopped, or it never ran. */
const UNBUILT: ReadonlySet<BuildOutcomeName> = new Set(['unbuildable', 'cancelled', 'not-built']);

/**
 * Attributes the change adds or changes whose head evaluated but was not built (unbuildable, cancelled, not
 * built): there is no evidence they work, so a merge waits (a neutral check is not a green one).
 */
export function unbuiltChanges(review: Pick<Review, 'attrs'>): string[] {
  return review.attrs
    .filter((a) => (a.change === 'changed' || a.change === 'added') && a.head?.eval === 'ok')
    .filter((a) => a.head !== undefined && !a.head.skipped && UNBUILT.has(a.head.build))
    .map((a) => `${a.job}.${a.attr}`);
}
