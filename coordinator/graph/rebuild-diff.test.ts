import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { type ClosureSource, type EvaluatedAttr, blastRadii, diffEvaluations, diffSteps } from './rebuild-diff.js';

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

describe('blastRadii', () => {
  /** What a search from one target finds: every derivation that depends on it, directly or not. */
  function searched(target: string, dependents: ReadonlyMap<string, readonly string[]>): number {
    const seen = new Set([target]);
    const stack = [target];
    while (stack.length > 0) {
      for (const next of dependents.get(stack.pop()!) ?? []) {
        if (!seen.has(next)) {
          seen.add(next);
          stack.push(next);
        }
      }
    }
    return seen.size - 1;
  }

  it('gives every target of a random DAG the radius a search from it finds, whatever the block size of the pass', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 120 }),
        fc.array(fc.tuple(fc.nat(), fc.nat()), { maxLength: 400 }),
        fc.array(fc.nat(), { minLength: 1, maxLength: 300 }),
        (n, edgeSeeds, targetSeeds) => {
          // Node i may depend only on nodes before it: acyclic by construction.
          const node = (i: number): string => `n${i}`;
          const inputs = new Map<string, string[]>([...Array(n).keys()].map((i) => [node(i), []]));
          for (const [a, b] of edgeSeeds) {
            const to = a % n;
            if (to === 0) continue;
            inputs.get(node(to))!.push(node(b % to));
          }
          const g: ClosureSource = { inputsOf: (d) => inputs.get(d) ?? [], systemOf: () => 'x86_64-linux' };
          const dependents = new Map<string, string[]>();
          for (const [d, list] of inputs)
            for (const i of new Set(list)) dependents.set(i, [...(dependents.get(i) ?? []), d]);
          const targets = [...new Set(targetSeeds.map((t) => node(t % n)))];
          // In one block, and in blocks of 32 targets (and of one word's worth plus one).
          for (const block of [undefined, 32, 33]) {
            const radii = blastRadii(targets, dependents, g, block);
            for (const t of targets) expect(radii.get(t), `${t} in blocks of ${block}`).toBe(searched(t, dependents));
          }
        },
      ),
      { numRuns: 200 },
    );
  });
});

describe('diffSteps', () => {
  it('pauses between its passes and every few thousand attributes, with the same result as a diff in one go', () => {
    const n = 12_000;
    const side = (v: string): EvaluatedAttr[] =>
      Array.from({ length: n }, (_, i) => ({
        attr: `p${i}`,
        drvPath: drv(`${i % 100 === 0 ? v : 'v1'}p${i}-app`),
        system: 'x86_64-linux',
      }));
    const [base, head] = [side('v1'), side('v2')];
    const steps = diffSteps(base, head, graph);
    let pauses = 0;
    let step = steps.next();
    for (; !step.done; step = steps.next()) pauses++;
    // Five passes, and a pause in each 5,000 attributes of the last-but-one.
    expect(pauses).toBeGreaterThanOrEqual(5 + Math.floor(n / 5_000));
    expect(step.value).toEqual(diffEvaluations(base, head, graph));
    expect(step.value.attrs.filter((a) => a.change === 'changed')).toHaveLength(n / 100);
  });
});
