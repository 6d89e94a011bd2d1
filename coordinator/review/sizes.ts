import type { OutputSizes, SizeBaseline } from './model.js';

export interface Sizes {
  narSize: number;
  closureSize: number;
}

/** Sizes of an attribute's outputs on one side, by output name (`out`, `dev`, …). */
export type SizesByOutput = Readonly<Record<string, Sizes>>;

/**
 * Base and head sizes of every output either side has, `out` first and the rest by name. The closure percentage
 * is rounded to 0.1, and the warning compares that rounded figure with `maxIncreasePercent`, so a reader never
 * sees "+10.0%" flagged against a 10% limit. Growth exactly at the limit is allowed.
 *
 * Without a base (a new output, or an attribute the change adds) there is nothing to grow from: the deltas and
 * percentage are null and no warning is raised. A zero base closure cannot happen in a real store (a closure
 * contains its own output); the percentage is null there too rather than Infinity.
 */
export function compareSizes(
  base: SizesByOutput | undefined,
  head: SizesByOutput | undefined,
  maxIncreasePercent: number | undefined,
): OutputSizes[] {
  const outputs = [...new Set([...Object.keys(base ?? {}), ...Object.keys(head ?? {})])].sort(byOutputName);
  return outputs.map((output) => {
    const b = base?.[output] ?? null;
    const h = head?.[output] ?? null;
    const both = b !== null && h !== null;
    const closureSizeDelta = both ? h.closureSize - b.closureSize : null;
    const closureSizePercent =
      closureSizeDelta !== null && b !== null && b.closureSize > 0
        ? roundToTenth((closureSizeDelta * 100) / b.closureSize)
        : null;
    return {
      output,
      base: b === null ? null : { narSize: b.narSize, closureSize: b.closureSize },
      head: h === null ? null : { narSize: h.narSize, closureSize: h.closureSize },
      narSizeDelta: both ? h.narSize - b.narSize : null,
      closureSizeDelta,
      closureSizePercent,
      warning:
        maxIncreasePercent !== undefined && closureSizePercent !== null && closureSizePercent > maxIncreasePercent,
    };
  });
}

/**
 * The sizes of an attribute whose job sets `size_check.base_branch`: head against `newest`, the branch's newest
 * recorded build of the attribute, whether the change adds the attribute or changes it (a release branch measured
 * against main). Without one, against the pull request's base (`prBase`; undefined for an attribute the change adds,
 * which then has nothing to compare), as compareSizes would. Every row names its baseline.
 */
export function compareWithBranch(
  branch: string,
  newest: { commit: string; sizes: SizesByOutput } | undefined,
  prBase: { commit: string; sizes: SizesByOutput | undefined } | undefined,
  head: SizesByOutput | undefined,
  maxIncreasePercent: number | undefined,
): OutputSizes[] {
  const against = newest ?? prBase;
  if (!against) return [];
  const baseline: SizeBaseline = { kind: newest ? 'branch' : 'pull-request-base', branch, commit: against.commit };
  return compareSizes(against.sizes, head, maxIncreasePercent).map((s) => ({ ...s, baseline }));
}

function byOutputName(a: string, b: string): number {
  if (a === b) return 0;
  if (a === 'out') return -1;
  if (b === 'out') return 1;
  return a < b ? -1 : 1;
}

function roundToTenth(n: number): number {
  // `|| 0` turns the -0 that Math.round gives for small shrinkages into 0, so JSON and text never show "-0".
  return Math.round(n * 10) / 10 || 0;
}

const UNITS = ['KiB', 'MiB', 'GiB'] as const;
const KIB = 1024;

/**
 * A byte count for humans: `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB` (binary units, one decimal). The unit is
 * chosen after rounding, so 1023.96 KiB reads `1.0 MiB`, not `1024.0 KiB`. Negative counts keep their sign.
 */
export function formatBytes(n: number): string {
  const sign = n < 0 ? '-' : '';
  let value = Math.abs(n);
  if (value < KIB) return `${sign}${Math.round(value)} B`;
  let unit: (typeof UNITS)[number] = 'KiB';
  for (unit of UNITS) {
    value /= KIB;
    if (Math.round(value * 10) / 10 < KIB || unit === UNITS[UNITS.length - 1]) break;
  }
  return `${sign}${value.toFixed(1)} ${unit}`;
}

/** A size change: `+1.2 MiB`, `-300 B`, and `0 B` for no change. */
export function formatBytesDelta(n: number): string {
  return n > 0 ? `+${formatBytes(n)}` : formatBytes(n);
}
