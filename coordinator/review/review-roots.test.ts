import { describe, expect, it } from 'vitest';
import type { EvalResult } from '../eval/eval-result.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { StoredJobDiff } from '../graph/diff-store.js';
import { diffEvaluations } from '../graph/rebuild-diff.js';
import type { BuildState } from '../scheduler/build-state.js';
import { type ReviewRoot, reviewRoots } from './review-roots.js';

const SYSTEM = 'x86_64-linux';
const drv = (name: string): string => `/nix/store/${name.padEnd(32, '0').slice(0, 32)}-${name}.drv`;
const pkg = (attr: string, version: string, extra: Partial<EvalResult> = {}): EvalResult => ({
  attr,
  drvPath: drv(`${attr}-${version}`),
  system: SYSTEM,
  ...extra,
});
const evaluation = (commit: string, attrs: EvalResult[]): CommitEvaluation => ({
  commit,
  jobs: [{ name: 'pkgs', allowEvalFailures: false, maxIncreasePercent: undefined, seconds: 0, attrs }],
});

/** The base and head of a change, and its rebuild diff. */
function change(base: EvalResult[], head: EvalResult[]): { head: CommitEvaluation; diffs: StoredJobDiff[] } {
  const graph = { inputsOf: () => [], systemOf: () => SYSTEM };
  return { head: evaluation('head', head), diffs: [{ name: 'pkgs', ...diffEvaluations(base, head, graph) }] };
}

function builds(states: Record<string, BuildState> = {}, causes: Record<string, string> = {}) {
  return {
    derivation: (path: string) =>
      states[path] ? { state: states[path], root_cause: causes[path] ?? null } : undefined,
  };
}

const sides = (roots: ReviewRoot[]): string[] => roots.map((r) => `${r.side} ${r.attr}`).sort();

describe('reviewRoots', () => {
  it('builds the head of changed and added attributes, and the base of the changed ones', () => {
    const c = change(
      [pkg('changed', '1'), pkg('same', '1'), pkg('gone', '1')],
      [pkg('changed', '2'), pkg('same', '1'), pkg('fresh', '1')],
    );
    const roots = reviewRoots({ ...c, named: [], builds: builds() });
    expect(sides(roots)).toEqual(['base pkgs.changed', 'head pkgs.changed', 'head pkgs.fresh']);
    expect(roots.find((r) => r.side === 'base')).toEqual({
      side: 'base',
      drvPath: drv('changed-1'),
      attr: 'pkgs.changed',
      system: SYSTEM,
    });
  });

  it('never builds an attribute whose meta.platforms excludes its system, on either side', () => {
    const elsewhere = { skipped: 'unsupported-platform' as const };
    const c = change(
      [pkg('moved', '1'), pkg('other', '1')],
      [pkg('moved', '2', elsewhere), pkg('other', '2'), pkg('new', '1', elsewhere)],
    );
    expect(sides(reviewRoots({ ...c, named: ['moved', 'new'], builds: builds() }))).toEqual([
      'base pkgs.other',
      'head pkgs.other',
    ]);
  });

  it('builds attributes named by commands and commit titles, changed or not, and ignores names it does not have', () => {
    const c = change([pkg('hello', '1'), pkg('cowsay', '1')], [pkg('hello', '1'), pkg('cowsay', '1')]);
    const roots = reviewRoots({ ...c, named: ['hello', 'nosuch'], builds: builds() });
    expect(sides(roots)).toEqual(['head pkgs.hello']);
  });

  it('builds again a base whose build ended without an answer: cancelled, unbuildable, or waiting on such an input', () => {
    const names = ['cancelled', 'unbuildable', 'after-cancelled', 'after-failed', 'failed'];
    const c = change(
      names.map((n) => pkg(n, '1')),
      names.map((n) => pkg(n, '2')),
    );
    const known = builds(
      {
        [drv('cancelled-1')]: 'cancelled',
        [drv('unbuildable-1')]: 'unbuildable',
        [drv('after-cancelled-1')]: 'dependency-failed',
        [drv('after-failed-1')]: 'dependency-failed',
        [drv('failed-1')]: 'failed',
      },
      { [drv('after-cancelled-1')]: drv('cancelled-1'), [drv('after-failed-1')]: drv('failed-1') },
    );
    const bases = reviewRoots({ ...c, named: [], builds: known }).filter((r) => r.side === 'base');
    expect(bases.map((r) => r.attr).sort()).toEqual(['pkgs.after-cancelled', 'pkgs.cancelled', 'pkgs.unbuildable']);
  });

  it('does not build a base whose build already ended with an outcome, whatever it was', () => {
    const c = change([pkg('a', '1'), pkg('b', '1'), pkg('c', '1')], [pkg('a', '2'), pkg('b', '2'), pkg('c', '2')]);
    const known = builds({ [drv('a-1')]: 'failed', [drv('b-1')]: 'succeeded', [drv('c-1')]: 'building' });
    expect(sides(reviewRoots({ ...c, named: [], builds: known }))).toEqual([
      'base pkgs.c',
      'head pkgs.a',
      'head pkgs.b',
      'head pkgs.c',
    ]);
  });

  it('builds only the base of an attribute that fails to evaluate on head', () => {
    const c = change([pkg('broken', '1')], [{ attr: 'broken', error: 'error: boom' }]);
    expect(sides(reviewRoots({ ...c, named: ['broken'], builds: builds() }))).toEqual(['base pkgs.broken']);
  });

  it('without a base (a push), builds every attribute of the head that its platforms allow', () => {
    const head = evaluation('head', [
      pkg('a', '1'),
      pkg('b', '1', { skipped: 'unsupported-platform' }),
      { attr: 'c', error: 'error: boom' },
    ]);
    expect(sides(reviewRoots({ head, diffs: undefined, named: [], builds: builds() }))).toEqual(['head pkgs.a']);
  });
});
