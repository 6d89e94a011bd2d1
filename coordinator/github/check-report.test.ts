import { describe, expect, it } from 'vitest';
import type { EvalResult } from '../eval/eval-result.js';
import type { CommitEvaluation, JobEvaluation } from '../eval/repo-evaluation.js';
import { diffEvaluations } from '../graph/rebuild-diff.js';
import { gatesFor, withBaseGates } from '../review/base-policy.js';
import { isNewlyFailing, newlyFailingDrvs } from '../review/classify.js';
import { renderMarkdown } from '../review/markdown.js';
import type { LimitReport } from '../review/build-limits.js';
import type { Review } from '../review/model.js';
import { buildReview } from '../review/review-builder.js';
import type { BuildState } from '../scheduler/build-state.js';
import { type RootResult, buildCheck, evaluationCheck, summaryCheck } from './check-report.js';
import type { CheckRunSpec } from './check-runs.js';
import { decideMerge } from './merge-policy.js';

const root = (attr: string, state: RootResult['state'], newlyFailing = false): RootResult => ({
  attr,
  drvPath: `/nix/store/${'a'.repeat(32)}-${attr}.drv`,
  state,
  newlyFailing,
});

describe('buildCheck', () => {
  it('is neutral when nothing needed building', () => {
    expect(buildCheck('x86_64-linux', [], undefined)).toMatchObject({
      conclusion: 'neutral',
      title: 'Nothing to build',
    });
  });

  it('fails on a newly failing build, offers "Rebuild failed", and lists the failures', () => {
    const c = buildCheck('x86_64-linux', [root('a', 'succeeded'), root('b', 'failed', true)], 'http://x/d');
    expect(c).toMatchObject({ name: 'eka-ci / build (x86_64-linux)', conclusion: 'failure', detailsUrl: 'http://x/d' });
    expect(c.title).toBe('1 newly failing of 2');
    expect(c.summary).toContain('- `b`: failed');
    expect(c.actions).toEqual([expect.objectContaining({ identifier: 'rebuild-failed' })]);
  });

  it('times out when every newly failing build timed out', () => {
    expect(buildCheck('s', [root('a', 'timed-out', true)], undefined).conclusion).toBe('timed_out');
    expect(buildCheck('s', [root('a', 'timed-out', true), root('b', 'failed', true)], undefined).conclusion).toBe(
      'failure',
    );
  });

  it('succeeds when failures were there before the change, still offering to rebuild them', () => {
    const c = buildCheck('s', [root('a', 'failed', false), root('b', 'succeeded')], undefined);
    expect(c.conclusion).toBe('success');
    expect(c.actions).toHaveLength(1);
  });

  it('quotes attribute names, which the pull request writes', () => {
    const c = buildCheck('s', [root('x`\n# y', 'failed', true)], undefined);
    expect(c.summary.split('\n').at(-1)).toBe('- ``x` # y``: failed');
  });

  it('is cancelled when builds were cancelled, and neutral (not a success) when no agent could build some', () => {
    expect(buildCheck('s', [root('a', 'cancelled')], undefined).conclusion).toBe('cancelled');
    const c = buildCheck('s', [root('a', 'unbuildable'), root('b', 'succeeded')], undefined);
    expect(c.conclusion).toBe('neutral');
    expect(c.title).toMatch(/1 of 2 unbuildable/);
    expect(c.summary).toContain('- `a`: unbuildable');
  });
});

describe('evaluationCheck', () => {
  const job = (name: string, errors: string[], allowEvalFailures = false): JobEvaluation => ({
    name,
    allowEvalFailures,
    maxIncreasePercent: undefined,
    seconds: 1,
    attrs: [{ attr: 'ok', drvPath: '/nix/store/x.drv' }, ...errors.map((attr) => ({ attr, error: `${attr} broke` }))],
  });

  it('fails only on errors the base did not have, in jobs that do not allow them', () => {
    const base = [job('pkgs', ['old'])];
    expect(evaluationCheck([job('pkgs', ['old'])], base, undefined).conclusion).toBe('success');
    const c = evaluationCheck([job('pkgs', ['old', 'new'])], base, undefined);
    expect(c.conclusion).toBe('failure');
    expect(c.title).toBe('1 new evaluation error, 2 in all');
    expect(c.summary.indexOf('**new** `pkgs.new`')).toBeLessThan(c.summary.indexOf('`pkgs.old`'));
    expect(evaluationCheck([job('pkgs', ['new'], true)], base, undefined).conclusion).toBe('success');
  });

  it('quotes an attribute name and an error the pull request wrote, so neither renders as markdown', () => {
    const head: JobEvaluation = {
      ...job('pkgs', []),
      attrs: [{ attr: 'a`b\n## ok', error: 'error: [approve](https://example.invalid) **now**\nat default.nix:1' }],
    };
    const c = evaluationCheck([head], undefined, undefined);
    expect(c.summary.split('\n').slice(1)).toEqual([
      '- **new** ``pkgs.a`b ## ok``: error: \\[approve\\](https://example.invalid) \\*\\*now\\*\\*',
    ]);
  });

  it('without a base (a push), counts every error as new', () => {
    expect(evaluationCheck([job('pkgs', ['x'])], undefined, undefined).conclusion).toBe('failure');
  });
});

/** A one-job change, reviewed as ReviewService does it: the base's gates, the rebuild diff, the builds' states. */
async function reviewChange(
  base: CommitEvaluation,
  head: CommitEvaluation,
  states: Record<string, BuildState> = {},
): Promise<Review> {
  const graph = { inputsOf: () => [], systemOf: () => SYSTEM };
  return buildReview({
    baseRev: base.commit,
    headRev: head.commit,
    jobs: head.jobs.map((j) => ({
      name: j.name,
      ...gatesFor(j.name, head, base),
      diff: { name: j.name, ...diffEvaluations(base.jobs[0]!.attrs, j.attrs, graph) },
      base: base.jobs[0]!.attrs,
      head: j.attrs,
    })),
    build: (drv) => (states[drv] ? { state: states[drv], rootCause: null, outputs: [] } : undefined),
    logTail: () => '',
    references: () => Promise.resolve([]),
  });
}

const SYSTEM = 'x86_64-linux';
const drvOf = (name: string): string => `/nix/store/${name.padEnd(32, '0').slice(0, 32)}-${name}.drv`;
const built = (attr: string): EvalResult => ({ attr, drvPath: drvOf(attr), system: SYSTEM });
const commit = (sha: string, attrs: EvalResult[], allowEvalFailures = false): CommitEvaluation => ({
  commit: sha.repeat(40),
  jobs: [{ name: 'pkgs', allowEvalFailures, maxIncreasePercent: undefined, seconds: 1, attrs }],
});

/** The build check of the review's system, its roots marked newly failing as the pipeline marks them. */
function buildCheckOf(review: Review, states: Record<string, BuildState>): CheckRunSpec {
  const newly = newlyFailingDrvs(review);
  const roots = Object.entries(states).map(([drvPath, state]) => ({
    attr: drvPath,
    drvPath,
    state,
    newlyFailing: newly.has(drvPath),
  }));
  return buildCheck(SYSTEM, roots, undefined);
}

describe('an added attribute that fails', () => {
  const base = commit('b', [built('old')]);

  it.each(['failed', 'dependency-failed', 'timed-out'] as const)(
    'is newly failing when its build ends %s: the summary and the build check fail, and say so alike',
    async (state) => {
      const head = commit('h', [built('old'), built('fresh')]);
      const states = { [drvOf('fresh')]: state };
      const review = await reviewChange(base, head, states);
      expect(review.attrs.find((a) => a.attr === 'fresh')).toMatchObject({ change: 'added', outcome: 'newly-failing' });
      expect(review.summary['newly-failing']).toBe(1);
      expect(renderMarkdown(review).split('\n')[0]).toBe('❌ 1 newly failing');
      expect(summaryCheck(review, undefined).conclusion).toBe('failure');
      expect(buildCheckOf(review, states).conclusion).toBe(state === 'timed-out' ? 'timed_out' : 'failure');
    },
  );

  it('is a new evaluation error when it fails to evaluate: the summary and the evaluation check fail', async () => {
    const head = commit('h', [built('old'), { attr: 'fresh', error: 'error: fresh breaks' }]);
    const review = await reviewChange(base, head);
    expect(review.summary['eval-failing']).toBe(1);
    expect(renderMarkdown(review).split('\n')[0]).toBe('❌ 1 new evaluation error');
    expect(summaryCheck(review, undefined).conclusion).toBe('failure');
    expect(evaluationCheck(withBaseGates(head, base), base.jobs, undefined).conclusion).toBe('failure');
  });

  it('is not failing once it builds', async () => {
    const head = commit('h', [built('old'), built('fresh')]);
    const states = { [drvOf('fresh')]: 'succeeded' as const };
    const review = await reviewChange(base, head, states);
    expect(review.attrs.find((a) => a.attr === 'fresh')?.outcome).toBeUndefined();
    expect(summaryCheck(review, undefined).conclusion).toBe('success');
    expect(buildCheckOf(review, states).conclusion).toBe('success');
  });
});

describe('builds held back by a limit (mass rebuild, skip_build_paths)', () => {
  const limited: LimitReport = {
    title: 'Mass rebuild: 2 rebuilds on x86_64-linux exceed max_rebuild_count 1; built nothing',
    lines: ['**Builds held back.** …', '- job `pkgs`: 2 rebuilds …'],
  };
  const base = commit('b', [built('a'), built('b')]);
  const head = commit('h', [
    { ...built('a'), drvPath: drvOf('a2') },
    { ...built('b'), drvPath: drvOf('b2') },
  ]);

  it('makes the build check neutral, titled with the reason, where it would have succeeded', () => {
    const none = buildCheck(SYSTEM, [], undefined, limited);
    expect(none).toMatchObject({ conclusion: 'neutral', title: limited.title });
    expect(none.summary).toBe(limited.lines.join('\n'));
    const named = buildCheck(SYSTEM, [root('pkgs.a', 'succeeded')], undefined, limited);
    expect(named).toMatchObject({ conclusion: 'neutral', title: limited.title });
    expect(named.summary).toBe([...limited.lines, '', '1 succeeded'].join('\n'));
  });

  it('still fails the build check on a newly failing named build, with the reason above the failures', () => {
    const spec = buildCheck(SYSTEM, [root('pkgs.a', 'failed', true)], undefined, limited);
    expect(spec).toMatchObject({ conclusion: 'failure', title: '1 newly failing of 1' });
    expect(spec.summary.startsWith(limited.lines.join('\n'))).toBe(true);
    expect(spec.actions).toEqual([expect.objectContaining({ identifier: 'rebuild-failed' })]);
  });

  it('makes the summary neutral, never a success, when nothing failed; a failure stays a failure', async () => {
    const unbuilt = await reviewChange(base, head);
    expect(summaryCheck(unbuilt, undefined).conclusion).toBe('success');
    const spec = summaryCheck(unbuilt, undefined, undefined, limited);
    expect(spec).toMatchObject({ conclusion: 'neutral', title: limited.title });
    expect(spec.summary.startsWith(`${limited.lines.join('\n')}\n\n`)).toBe(true);
    const broke = await reviewChange(base, head, { [drvOf('a')]: 'succeeded', [drvOf('a2')]: 'failed' });
    const failing = summaryCheck(broke, undefined, undefined, limited);
    expect(failing).toMatchObject({ conclusion: 'failure', title: '1 newly failing' });
  });
});

describe('allow_eval_failures', () => {
  const HEAD_SHA = 'h'.repeat(40);

  /** What each of the four says of a change: summary check, evaluation check, merge policy, `ekaci review`. */
  async function verdicts(base: CommitEvaluation, head: CommitEvaluation) {
    const review = await reviewChange(base, head);
    const summary = summaryCheck(review, undefined);
    const evaluation = evaluationCheck(withBaseGates(head, base), base.jobs, undefined);
    const checks = [summary, evaluation].map((c) => ({
      name: c.name,
      status: c.status,
      conclusion: c.conclusion ?? null,
    }));
    return {
      verdict: renderMarkdown(review).split('\n')[0],
      summary: summary.conclusion,
      evaluation: evaluation.conclusion,
      merge: decideMerge({ requestedFor: HEAD_SHA, method: 'merge' }, HEAD_SHA, checks).action,
      exitStatus: isNewlyFailing(review) ? 1 : 0,
    };
  }

  // `broke` starts failing to evaluate, `added` is new and fails, `old` failed already on base.
  const change = (allow: { base: boolean; head: boolean }) => ({
    base: commit('b', [built('broke'), { attr: 'old', error: 'error: old' }], allow.base),
    head: commit(
      'h',
      [
        { attr: 'broke', error: 'error: broke' },
        { attr: 'added', error: 'error: added' },
        { attr: 'old', error: 'error: old' },
      ],
      allow.head,
    ),
  });

  it('when false, fails the summary and the evaluation check, refuses the merge and exits 1', async () => {
    const { base, head } = change({ base: false, head: false });
    expect(await verdicts(base, head)).toEqual({
      verdict: '❌ 2 new evaluation errors',
      summary: 'failure',
      evaluation: 'failure',
      merge: 'refuse',
      exitStatus: 1,
    });
  });

  it('when true, lets all four pass, the errors still shown', async () => {
    const { base, head } = change({ base: true, head: true });
    expect(await verdicts(base, head)).toEqual({
      verdict: '✅ nothing newly failing · ⚠️ 2 new evaluation errors allowed by allow_eval_failures',
      summary: 'success',
      evaluation: 'success',
      merge: 'merge',
      exitStatus: 0,
    });
    const review = await reviewChange(base, head);
    expect(renderMarkdown(review)).toContain('| ok → error (allowed) |');
  });

  it("is the base's: a pull request that turns it on for itself is still judged without it", async () => {
    const { base, head } = change({ base: false, head: true });
    expect(await verdicts(base, head)).toMatchObject({
      summary: 'failure',
      evaluation: 'failure',
      merge: 'refuse',
      exitStatus: 1,
    });
  });
});
