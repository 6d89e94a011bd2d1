import type { EvalResult } from '../eval/eval-result.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { StoredJobDiff } from './diff-store.js';
import { readClosure } from './ingest.js';
import { type ClosureSource, diffEvaluations } from './rebuild-diff.js';

/** The rebuild diff of two evaluations of a repository, job by job. */
export async function diffCommits(base: CommitEvaluation, head: CommitEvaluation): Promise<StoredJobDiff[]> {
  const graph = await closureOf([...base.jobs, ...head.jobs].flatMap((j) => j.attrs));
  const names = [...new Set([...base.jobs, ...head.jobs].map((j) => j.name))];
  return names.map((name) => {
    const d = diffEvaluations(
      base.jobs.find((j) => j.name === name)?.attrs ?? [],
      head.jobs.find((j) => j.name === name)?.attrs ?? [],
      graph,
    );
    return { name, attrs: d.attrs, rebuildCountBySystem: d.rebuildCountBySystem };
  });
}

/** Inputs and systems of every derivation the evaluations reached, read from the `.drv` files in-process. */
async function closureOf(attrs: readonly EvalResult[]): Promise<ClosureSource> {
  const roots = [...new Set(attrs.flatMap((a) => (a.drvPath ? [a.drvPath] : [])))];
  const nodes = new Map((await readClosure(roots, () => false)).map((n) => [n.drvPath, n]));
  return {
    inputsOf: (drv) => nodes.get(drv)?.inputs ?? [],
    systemOf: (drv) => nodes.get(drv)?.system ?? 'unknown',
  };
}
