import { describe, expect, it } from 'vitest';
import { compareSizes, compareWithBranch, formatBytes, formatBytesDelta } from './sizes.js';

const MiB = 1024 * 1024;

describe('compareSizes', () => {
  it('reports byte deltas and the closure growth in percent, rounded to a tenth', () => {
    const [out] = compareSizes(
      { out: { narSize: 1000, closureSize: 3000 } },
      { out: { narSize: 1500, closureSize: 3100 } },
      undefined,
    );
    expect(out).toEqual({
      output: 'out',
      base: { narSize: 1000, closureSize: 3000 },
      head: { narSize: 1500, closureSize: 3100 },
      narSizeDelta: 500,
      closureSizeDelta: 100,
      closureSizePercent: 3.3,
      warning: false,
    });
  });

  it('reports shrinkage as negative deltas and never a negative zero', () => {
    const [big, tiny] = compareSizes(
      { out: { narSize: 2000, closureSize: 2000 }, dev: { narSize: 10, closureSize: 100_000 } },
      { out: { narSize: 1000, closureSize: 1000 }, dev: { narSize: 10, closureSize: 99_999 } },
      0,
    );
    expect(big).toMatchObject({ output: 'out', narSizeDelta: -1000, closureSizePercent: -50, warning: false });
    expect(tiny).toMatchObject({ output: 'dev', closureSizeDelta: -1 });
    expect(Object.is(tiny?.closureSizePercent, 0)).toBe(true);
  });

  it('warns when the closure grew by more than the limit', () => {
    const [out] = compareSizes(
      { out: { narSize: 1, closureSize: 1000 } },
      { out: { narSize: 1, closureSize: 1101 } },
      10,
    );
    expect(out).toMatchObject({ closureSizePercent: 10.1, warning: true });
  });

  it('does not warn for growth exactly at the limit', () => {
    const [out] = compareSizes(
      { out: { narSize: 1, closureSize: 1000 } },
      { out: { narSize: 1, closureSize: 1100 } },
      10,
    );
    expect(out).toMatchObject({ closureSizePercent: 10, warning: false });
  });

  it('does not warn for growth that rounds to the limit', () => {
    const [out] = compareSizes(
      { out: { narSize: 1, closureSize: 100_000 } },
      { out: { narSize: 1, closureSize: 110_004 } },
      10,
    );
    expect(out).toMatchObject({ closureSizePercent: 10, warning: false });
  });

  it('never warns without a limit', () => {
    const [out] = compareSizes(
      { out: { narSize: 1, closureSize: 1 } },
      { out: { narSize: 1, closureSize: 100 } },
      undefined,
    );
    expect(out).toMatchObject({ closureSizePercent: 9900, warning: false });
  });

  it('has no deltas, percentage or warning without a base', () => {
    expect(compareSizes(undefined, { out: { narSize: 5, closureSize: 50 } }, 0)).toEqual([
      {
        output: 'out',
        base: null,
        head: { narSize: 5, closureSize: 50 },
        narSizeDelta: null,
        closureSizeDelta: null,
        closureSizePercent: null,
        warning: false,
      },
    ]);
  });

  it('has deltas but no percentage or warning when the base closure is zero', () => {
    const [out] = compareSizes({ out: { narSize: 0, closureSize: 0 } }, { out: { narSize: 5, closureSize: 50 } }, 0);
    expect(out).toMatchObject({ narSizeDelta: 5, closureSizeDelta: 50, closureSizePercent: null, warning: false });
  });

  it('lists an output only head has and one only base has, out first and the rest by name', () => {
    const sizes = compareSizes(
      { out: { narSize: 1, closureSize: 1 }, man: { narSize: 1, closureSize: 1 } },
      { out: { narSize: 1, closureSize: 1 }, dev: { narSize: 1, closureSize: 1 }, bin: { narSize: 1, closureSize: 1 } },
      undefined,
    );
    expect(sizes.map((s) => s.output)).toEqual(['out', 'bin', 'dev', 'man']);
    expect(sizes.find((s) => s.output === 'man')).toMatchObject({ head: null, closureSizeDelta: null });
    expect(sizes.find((s) => s.output === 'dev')).toMatchObject({ base: null, closureSizePercent: null });
  });

  it('is empty when neither side has sizes', () => {
    expect(compareSizes(undefined, undefined, 10)).toEqual([]);
  });
});

describe('compareWithBranch', () => {
  const main = { commit: 'm', sizes: { out: { narSize: 100, closureSize: 1000 } } };
  const prBase = { commit: 'b', sizes: { out: { narSize: 100, closureSize: 1100 } } };
  const head = { out: { narSize: 100, closureSize: 1150 } };

  it("measures head against the branch's newest build rather than the pull request's base, and names it", () => {
    const [out] = compareWithBranch('main', main, prBase, head, 10);
    expect(out).toMatchObject({
      base: { closureSize: 1000 },
      closureSizePercent: 15,
      warning: true,
      baseline: { kind: 'branch', branch: 'main', commit: 'm' },
    });
    // The same change against the pull request's own base grew 4.5%: no warning.
    expect(compareSizes(prBase.sizes, head, 10)[0]).toMatchObject({ closureSizePercent: 4.5, warning: false });
  });

  it('measures an attribute the change adds against the branch', () => {
    expect(compareWithBranch('main', main, undefined, head, 10)).toEqual([
      expect.objectContaining({ closureSizeDelta: 150, baseline: { kind: 'branch', branch: 'main', commit: 'm' } }),
    ]);
  });

  it("falls back to the pull request's base when the branch has no build of the attribute, and says so", () => {
    const [out] = compareWithBranch('main', undefined, prBase, head, 10);
    expect(out).toMatchObject({
      base: { closureSize: 1100 },
      warning: false,
      baseline: { kind: 'pull-request-base', branch: 'main', commit: 'b' },
    });
  });

  it('has nothing to compare for an added attribute the branch never built', () => {
    expect(compareWithBranch('main', undefined, undefined, head, 10)).toEqual([]);
  });
});

describe('formatBytes', () => {
  it.each([
    [0, '0 B'],
    [512, '512 B'],
    [1023, '1023 B'],
    [1024, '1.0 KiB'],
    [1536, '1.5 KiB'],
    [1.2 * MiB, '1.2 MiB'],
    [1024 * MiB - 1, '1.0 GiB'],
    [3.25 * 1024 * MiB, '3.3 GiB'],
    [5000 * 1024 * MiB, '5000.0 GiB'],
    [-300, '-300 B'],
    [-2.5 * MiB, '-2.5 MiB'],
  ])('formats %d bytes as %s', (n, expected) => {
    expect(formatBytes(n)).toBe(expected);
  });

  it('chooses the unit after rounding, so just under a MiB reads 1.0 MiB', () => {
    expect(formatBytes(MiB - 10)).toBe('1.0 MiB');
  });
});

describe('formatBytesDelta', () => {
  it.each([
    [1.2 * MiB, '+1.2 MiB'],
    [300, '+300 B'],
    [-300, '-300 B'],
    [-1536, '-1.5 KiB'],
    [0, '0 B'],
  ])('formats a change of %d bytes as %s', (n, expected) => {
    expect(formatBytesDelta(n)).toBe(expected);
  });
});
