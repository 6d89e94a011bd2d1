/**
 * The rebuild diff between two evaluations of a job: per attribute, whether it was added, removed, changed (a
 * different `.drv`, or a different failure: see `sameEvaluation`) or unchanged; for each changed or added attribute its blast radius — how many derivations of
 * the head closure depend on it, directly or not — and per system how many derivations the head needs that the
 * base did not have (what a merge would rebuild).
 */

import { runSteps } from '../../common/turn.js';

export type Change = 'added' | 'removed' | 'changed' | 'unchanged';

export interface EvaluatedAttr {
  attr: string;
  drvPath?: string;
  system?: string;
  error?: string;
  /** Meta fields that failed beside a derivation (see EvalResult.metaErrors). */
  metaErrors?: Record<string, string>;
}

export interface AttrDiff {
  attr: string;
  system: string | null;
  change: Change;
  baseDrv: string | null;
  headDrv: string | null;
  blastRadius: number;
  evalError?: { base?: string; head?: string };
}

export interface RebuildDiff {
  attrs: AttrDiff[];
  rebuildCountBySystem: Record<string, number>;
}

/** What the diff needs to know about derivations: their inputs and system (from the graph). */
export interface ClosureSource {
  inputsOf(drvPath: string): readonly string[];
  systemOf(drvPath: string): string;
}

export function diffEvaluations(
  base: readonly EvaluatedAttr[],
  head: readonly EvaluatedAttr[],
  graph: ClosureSource,
): RebuildDiff {
  return runSteps(diffSteps(base, head, graph));
}

// Attributes diffed between two yields of `diffSteps`.
const STEP_ATTRS = 5_000;

/**
 * The same computation, yielding between its passes and every STEP_ATTRS attributes, so that a caller on the event
 * loop lets it turn (`runStepsTurning`): at nixpkgs' size the whole held the loop for more than a second.
 */
export function* diffSteps(
  base: readonly EvaluatedAttr[],
  head: readonly EvaluatedAttr[],
  graph: ClosureSource,
): Generator<void, RebuildDiff> {
  const baseByAttr = new Map(base.map((a) => [a.attr, a]));
  const headByAttr = new Map(head.map((a) => [a.attr, a]));
  const baseClosure = closure(
    base.flatMap((a) => (a.drvPath ? [a.drvPath] : [])),
    graph,
  );
  yield;
  const headRoots = head.flatMap((a) => (a.drvPath ? [a.drvPath] : []));
  const headClosure = closure(headRoots, graph);
  yield;
  const names = [...new Set([...baseByAttr.keys(), ...headByAttr.keys()])].sort();
  const changeOf = (b: EvaluatedAttr | undefined, h: EvaluatedAttr | undefined): Change =>
    !b ? 'added' : !h ? 'removed' : sameEvaluation(b, h) ? 'unchanged' : 'changed';
  // Blast radii of the derivations of changed and added attributes, all in one pass.
  const targets = new Set<string>();
  for (const name of names) {
    const h = headByAttr.get(name);
    const change = changeOf(baseByAttr.get(name), h);
    if (h?.drvPath && (change === 'changed' || change === 'added')) targets.add(h.drvPath);
  }
  yield;
  const radius = blastRadii([...targets], reverseEdges(headClosure, graph), graph);
  yield;

  const attrs: AttrDiff[] = [];
  for (const name of names) {
    if (attrs.length % STEP_ATTRS === STEP_ATTRS - 1) yield;
    const b = baseByAttr.get(name);
    const h = headByAttr.get(name);
    const baseDrv = b?.drvPath ?? null;
    const headDrv = h?.drvPath ?? null;
    const change = changeOf(b, h);
    const evalError =
      b?.error || h?.error
        ? { ...(b?.error ? { base: b.error } : {}), ...(h?.error ? { head: h.error } : {}) }
        : undefined;
    attrs.push({
      attr: name,
      system: h?.system ?? b?.system ?? null,
      change,
      baseDrv,
      headDrv,
      blastRadius: headDrv && (change === 'changed' || change === 'added') ? (radius.get(headDrv) ?? 0) : 0,
      ...(evalError ? { evalError } : {}),
    });
  }

  yield;
  const rebuildCountBySystem: Record<string, number> = {};
  for (const drv of headClosure) {
    if (baseClosure.has(drv)) continue;
    const system = graph.systemOf(drv);
    rebuildCountBySystem[system] = (rebuildCountBySystem[system] ?? 0) + 1;
  }
  return { attrs, rebuildCountBySystem };
}

/**
 * Whether an attribute evaluated the same on both sides. When either side has a derivation, the derivation decides:
 * an error beside it (a `meta` field that failed) says nothing of what is built, so a new `.drv` is a change even
 * when the same meta field throws on both sides. Without a derivation on either side, both failed, and they are the
 * same only when they failed identically: the same error and everything else evaluated around it.
 */
export function sameEvaluation(base: EvaluatedAttr, head: EvaluatedAttr): boolean {
  if (base.drvPath !== undefined || head.drvPath !== undefined) return base.drvPath === head.drvPath;
  return base.error === head.error && base.system === head.system && sameRecord(base.metaErrors, head.metaErrors);
}

function sameRecord(a: Record<string, string> | undefined, b: Record<string, string> | undefined): boolean {
  const keys = new Set([...Object.keys(a ?? {}), ...Object.keys(b ?? {})]);
  return [...keys].every((k) => a?.[k] === b?.[k]);
}

/** Every derivation reachable from `roots` through inputs (iterative: chains run thousands deep). */
export function closure(roots: readonly string[], graph: ClosureSource): Set<string> {
  const seen = new Set<string>();
  const stack = [...roots];
  while (stack.length > 0) {
    const drv = stack.pop()!;
    if (seen.has(drv)) continue;
    seen.add(drv);
    for (const input of graph.inputsOf(drv)) if (!seen.has(input)) stack.push(input);
  }
  return seen;
}

function reverseEdges(nodes: ReadonlySet<string>, graph: ClosureSource): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const drv of nodes) {
    for (const input of graph.inputsOf(drv)) {
      if (!nodes.has(input)) continue;
      const list = out.get(input) ?? [];
      list.push(drv);
      out.set(input, list);
    }
  }
  return out;
}

// Targets per pass of `blastRadii`: each derivation carries a bit per target of the pass, so memory is
// (derivations that depend on a target) × this / 8 bytes — 2.5 MiB per 10,000 of them.
const RADIUS_BLOCK = 2048;

/**
 * The blast radius of each target: how many derivations of the head closure depend on it, directly or not. One
 * pass over the derivations that depend on any target (found by one search from all of them), inputs first: each
 * derivation's set of targets it depends on is the union of its inputs' sets (plus the input itself where that
 * input is a target), held as a bitset; a target's radius is the number of sets that hold it. Where a search per
 * target walks shared dependents again for each, this walks each edge once per block of RADIUS_BLOCK targets.
 */
export function blastRadii(
  targets: readonly string[],
  dependents: ReadonlyMap<string, readonly string[]>,
  graph: ClosureSource,
  blockSize = RADIUS_BLOCK,
): Map<string, number> {
  const out = new Map<string, number>();
  if (targets.length === 0) return out;
  // The derivations that depend on a target, with the targets themselves.
  const reach = new Set<string>(targets);
  const stack = [...targets];
  while (stack.length > 0) {
    for (const next of dependents.get(stack.pop()!) ?? []) {
      if (reach.has(next)) continue;
      reach.add(next);
      stack.push(next);
    }
  }
  // Inputs first (Kahn's algorithm), each with the positions of its inputs within `reach`.
  const pending = new Map<string, number>();
  // Counted once per distinct input: an edge may be listed twice.
  for (const d of reach) pending.set(d, new Set(graph.inputsOf(d).filter((i) => reach.has(i))).size);
  const order: string[] = [...reach].filter((d) => pending.get(d) === 0);
  for (let i = 0; i < order.length; i++) {
    for (const next of new Set(dependents.get(order[i]!))) {
      const left = pending.get(next)! - 1;
      pending.set(next, left);
      if (left === 0) order.push(next);
    }
  }
  const position = new Map(order.map((d, i) => [d, i]));
  const inputs = order.map((d) => graph.inputsOf(d).flatMap((i) => position.get(i) ?? []));

  for (let start = 0; start < targets.length; start += blockSize) {
    const block = targets.slice(start, start + blockSize);
    const words = Math.ceil(block.length / 32);
    const bitOf = new Int32Array(order.length).fill(-1);
    block.forEach((t, b) => (bitOf[position.get(t)!] = b));
    const sets = new Uint32Array(order.length * words);
    const counts = new Float64Array(block.length);
    for (let n = 0; n < order.length; n++) {
      const at = n * words;
      for (const i of inputs[n]!) {
        const from = i * words;
        for (let w = 0; w < words; w++) sets[at + w]! |= sets[from + w]!;
        const b = bitOf[i]!;
        if (b >= 0) sets[at + (b >>> 5)]! |= 1 << (b & 31);
      }
      for (let w = 0; w < words; w++) {
        for (let v = sets[at + w]!; v !== 0; v &= v - 1) counts[w * 32 + (31 - Math.clz32(v & -v))]!++;
      }
    }
    block.forEach((t, b) => out.set(t, counts[b]!));
  }
  return out;
}
