import { describe, expect, it } from 'vitest';
import type { JobEvaluation } from '../eval/repo-evaluation.js';
import { type RootResult, buildCheck, evaluationCheck } from './check-report.js';

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

  it('without a base (a push), counts every error as new', () => {
    expect(evaluationCheck([job('pkgs', ['x'])], undefined, undefined).conclusion).toBe('failure');
  });
});
