import { describe, expect, it } from 'vitest';
import { classifyOutcome, evalFailureBlocks, isNewlyFailing, summarise, SUMMARY_KEYS } from './classify.js';
import type { AttrReview, BuildOutcomeName, Change, Outcome, SideResult } from './model.js';

function built(build: BuildOutcomeName): SideResult {
  return { drv: '/nix/store/00000000000000000000000000000000-x.drv', eval: 'ok', build };
}

const evalError: SideResult = { drv: null, eval: 'error', error: 'attribute missing', build: 'not-built' };

function attr(overrides: Partial<AttrReview>): AttrReview {
  return { job: 'nixpkgs', attr: 'hello', system: 'x86_64-linux', change: 'changed', ...overrides };
}

describe('classifyOutcome', () => {
  type Side = BuildOutcomeName | 'eval error' | 'absent';
  const side = (s: Side): SideResult | undefined =>
    s === 'absent' ? undefined : s === 'eval error' ? evalError : built(s);

  const cases: [base: Side, head: Side, change: Change, Outcome | undefined][] = [
    ['succeeded', 'failed', 'changed', 'newly-failing'],
    ['succeeded', 'dependency-failed', 'changed', 'newly-failing'],
    ['succeeded', 'timed-out', 'changed', 'newly-failing'],
    ['failed', 'failed', 'changed', 'still-failing'],
    ['dependency-failed', 'timed-out', 'changed', 'still-failing'],
    ['timed-out', 'failed', 'changed', 'still-failing'],
    ['failed', 'succeeded', 'changed', 'newly-succeeding'],
    ['dependency-failed', 'succeeded', 'changed', 'newly-succeeding'],
    ['timed-out', 'succeeded', 'changed', 'newly-succeeding'],
    ['succeeded', 'succeeded', 'changed', 'still-succeeding'],
    ['succeeded', 'not-built', 'changed', undefined],
    ['succeeded', 'unbuildable', 'changed', undefined],
    ['succeeded', 'cancelled', 'changed', undefined],
    ['not-built', 'failed', 'changed', undefined],
    ['unbuildable', 'succeeded', 'changed', undefined],
    ['cancelled', 'failed', 'changed', undefined],
    ['eval error', 'failed', 'changed', undefined],
    ['succeeded', 'eval error', 'changed', undefined],
    ['absent', 'failed', 'changed', undefined],
    ['succeeded', 'absent', 'changed', undefined],
    ['absent', 'failed', 'added', 'newly-failing'],
    ['absent', 'dependency-failed', 'added', 'newly-failing'],
    ['absent', 'succeeded', 'added', undefined],
    ['absent', 'cancelled', 'added', undefined],
    ['absent', 'eval error', 'added', undefined],
    ['failed', 'absent', 'removed', undefined],
    ['succeeded', 'failed', 'unchanged', undefined],
    ['failed', 'failed', 'unchanged', undefined],
  ];

  it.each(cases)('base %s, head %s, %s attribute: %s', (base, head, change, expected) => {
    expect(classifyOutcome(side(base), side(head), change)).toBe(expected);
  });
});

describe('summarise', () => {
  it('has every key, at zero, for an empty review', () => {
    expect(summarise([])).toEqual(Object.fromEntries(SUMMARY_KEYS.map((k) => [k, 0])));
  });

  it('counts outcomes, added and removed attributes, new evaluation failures and size warnings', () => {
    const warned = { output: 'out', base: null, head: null, narSizeDelta: null, closureSizeDelta: null };
    const summary = summarise([
      attr({ outcome: 'newly-failing' }),
      attr({ outcome: 'newly-failing' }),
      attr({ outcome: 'still-failing' }),
      attr({ outcome: 'newly-succeeding' }),
      attr({ outcome: 'still-succeeding' }),
      attr({ change: 'added', head: built('succeeded') }),
      attr({ change: 'removed', base: built('succeeded') }),
      attr({ base: built('succeeded'), head: evalError }),
      attr({
        outcome: 'still-succeeding',
        sizes: [
          { ...warned, closureSizePercent: 30, warning: true },
          { ...warned, output: 'dev', closureSizePercent: 40, warning: true },
        ],
      }),
      attr({ sizes: [{ ...warned, closureSizePercent: 1, warning: false }] }),
    ]);
    expect(summary).toEqual({
      'newly-failing': 2,
      'eval-failing': 1,
      'still-failing': 1,
      'newly-succeeding': 1,
      'still-succeeding': 2,
      added: 1,
      removed: 1,
      'size-warnings': 1,
    });
  });

  it('counts an evaluation error on head as eval-failing only when base evaluated', () => {
    const summary = summarise([
      attr({ base: evalError, head: evalError }),
      attr({ base: built('succeeded'), head: evalError }),
      attr({ change: 'added', head: evalError }),
      attr({ base: evalError, head: built('succeeded') }),
    ]);
    expect(summary['eval-failing']).toBe(2);
  });
});

describe('isNewlyFailing', () => {
  it('is false when nothing got worse, even with old failures and size warnings', () => {
    const review = {
      attrs: [
        attr({ outcome: 'still-failing' }),
        attr({ outcome: 'newly-succeeding' }),
        attr({ base: evalError, head: evalError }),
        attr({
          outcome: 'still-succeeding',
          sizes: [
            {
              output: 'out',
              base: { narSize: 1, closureSize: 1 },
              head: { narSize: 2, closureSize: 2 },
              narSizeDelta: 1,
              closureSizeDelta: 1,
              closureSizePercent: 100,
              warning: true,
            },
          ],
        }),
      ],
    };
    expect(isNewlyFailing(review)).toBe(false);
  });

  it('is true when a build newly fails', () => {
    expect(isNewlyFailing({ attrs: [attr({ outcome: 'still-succeeding' }), attr({ outcome: 'newly-failing' })] })).toBe(
      true,
    );
  });

  it('is true when an attribute newly fails to evaluate', () => {
    expect(isNewlyFailing({ attrs: [attr({ base: built('succeeded'), head: evalError })] })).toBe(true);
  });

  it("is false for a new evaluation error that the job's allow_eval_failures lets pass", () => {
    const allowed = attr({ base: built('succeeded'), head: evalError, evalFailuresAllowed: true });
    expect(
      isNewlyFailing({ attrs: [allowed, attr({ change: 'added', head: evalError, evalFailuresAllowed: true })] }),
    ).toBe(false);
    expect(isNewlyFailing({ attrs: [allowed, attr({ outcome: 'newly-failing' })] })).toBe(true);
  });
});

describe('evalFailureBlocks', () => {
  type Case = [headFailed: boolean, baseFailed: boolean, allowEvalFailures: boolean, blocks: boolean];
  const cases: Case[] = [
    [true, false, false, true],
    [true, false, true, false],
    [true, true, false, false],
    [true, true, true, false],
    [false, false, false, false],
    [false, true, false, false],
  ];
  it.each(cases)('head failed %s, base failed %s, allowed %s: blocks %s', (headFailed, baseFailed, allow, blocks) => {
    expect(evalFailureBlocks({ headFailed, baseFailed, allowEvalFailures: allow })).toBe(blocks);
  });
});
