import { describe, expect, it } from 'vitest';
import { type ClosureSource, type EvaluatedAttr, diffEvaluations } from './rebuild-diff.js';

const drv = (name: string): string => `/nix/store/${name.padEnd(32, '0').slice(0, 32)}-${name}.drv`;

/** A graph where `app` depends on `dep`, whichever version of each. */
const graph: ClosureSource = {
  inputsOf: (d) => (d.includes('-app') ? [d.replace('-app', '-dep')] : []),
  systemOf: () => 'x86_64-linux',
};

function changeOf(base: Omit<EvaluatedAttr, 'attr'>, head: Omit<EvaluatedAttr, 'attr'>): string | undefined {
  return diffEvaluations([{ attr: 'a', ...base }], [{ attr: 'a', ...head }], graph).attrs[0]?.change;
}

describe('diffEvaluations of attributes that failed to evaluate', () => {
  const maintainersThrow = { maintainers: "error: attribute 'nobody' missing" };

  it('lets the derivation decide when meta.maintainers throws on both sides: a dependency bump is a change', () => {
    const base = { drvPath: drv('v1-app'), system: 'x86_64-linux', metaErrors: maintainersThrow };
    const head = { drvPath: drv('v2-app'), system: 'x86_64-linux', metaErrors: maintainersThrow };
    expect(changeOf(base, head)).toBe('changed');
    expect(changeOf(base, { ...base })).toBe('unchanged');
    // A meta field that starts or stops failing beside the same derivation builds the same thing.
    expect(changeOf(base, { drvPath: base.drvPath, system: 'x86_64-linux' })).toBe('unchanged');
  });

  it('counts a derivation on one side and an error on the other as a change', () => {
    expect(changeOf({ error: 'error: boom' }, { drvPath: drv('app'), system: 'x86_64-linux' })).toBe('changed');
    expect(changeOf({ drvPath: drv('app'), system: 'x86_64-linux' }, { error: 'error: boom' })).toBe('changed');
  });

  it('calls two failures unchanged only when they are identical, error and all', () => {
    expect(changeOf({ error: 'error: boom' }, { error: 'error: boom' })).toBe('unchanged');
    expect(changeOf({ error: 'error: boom' }, { error: 'error: bang' })).toBe('changed');
    expect(changeOf({ error: 'error: boom', system: 'x86_64-linux' }, { error: 'error: boom' })).toBe('changed');
    expect(
      changeOf({ error: 'error: boom', metaErrors: maintainersThrow }, { error: 'error: boom', metaErrors: {} }),
    ).toBe('changed');
  });

  it('reports both errors of an attribute that failed differently on both sides', () => {
    const d = diffEvaluations([{ attr: 'a', error: 'old' }], [{ attr: 'a', error: 'new' }], graph).attrs[0];
    expect(d).toMatchObject({ change: 'changed', baseDrv: null, headDrv: null, blastRadius: 0 });
    expect(d?.evalError).toEqual({ base: 'old', head: 'new' });
  });
});
