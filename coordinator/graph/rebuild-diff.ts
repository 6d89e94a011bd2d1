/**
 * The rebuild diff between two evaluations of a job: per attribute, whether it was added, removed, changed (a
 * different `.drv`, or a different failure: see `sameEvaluation`) or unchanged; for each changed or added attribute its blast radius — how many derivations of
 * the head closure depend on it, directly or not — and per system how many derivations the head needs that the
 * base did not have (what a merge would rebuild).
 */

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
  const baseByAttr = new Map(base.map((a) => [a.attr, a]));
  const headByAttr = new Map(head.map((a) => [a.attr, a]));
  const baseClosure = closure(
    base.flatMap((a) => (a.drvPath ? [a.drvPath] : [])),
    graph,
  );
  const headRoots = head.flatMap((a) => (a.drvPath ? [a.drvPath] : []));
  const headClosure = closure(headRoots, graph);
  const dependents = reverseEdges(headClosure, graph);

  const radius = new Map<string, number>();
  const blastRadius = (drv: string): number => {
    let r = radius.get(drv);
    if (r === undefined) {
      r = countReachable(drv, dependents);
      radius.set(drv, r);
    }
    return r;
  };

  const attrs: AttrDiff[] = [];
  for (const name of [...new Set([...baseByAttr.keys(), ...headByAttr.keys()])].sort()) {
    const b = baseByAttr.get(name);
    const h = headByAttr.get(name);
    const baseDrv = b?.drvPath ?? null;
    const headDrv = h?.drvPath ?? null;
    const change: Change = !b ? 'added' : !h ? 'removed' : sameEvaluation(b, h) ? 'unchanged' : 'changed';
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
      blastRadius: headDrv && (change === 'changed' || change === 'added') ? blastRadius(headDrv) : 0,
      ...(evalError ? { evalError } : {}),
    });
  }

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

function countReachable(start: string, edges: ReadonlyMap<string, readonly string[]>): number {
  const seen = new Set<string>([start]);
  const stack = [start];
  while (stack.length > 0) {
    for (const next of edges.get(stack.pop()!) ?? []) {
      if (seen.has(next)) continue;
      seen.add(next);
      stack.push(next);
    }
  }
  return seen.size - 1;
}
