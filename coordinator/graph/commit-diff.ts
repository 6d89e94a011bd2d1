import { LRUCache } from 'lru-cache';
import { readStoreDerivation, walkDerivations } from '../../common/nix/derivation.js';
import { runStepsTurning } from '../../common/turn.js';
import type { EvalResult } from '../eval/eval-result.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { StoredJobDiff } from './diff-store.js';
import { type ClosureSource, diffSteps } from './rebuild-diff.js';

/** The rebuild diff of two evaluations of a repository, job by job. */
export async function diffCommits(base: CommitEvaluation, head: CommitEvaluation): Promise<StoredJobDiff[]> {
  const graph = await closureOf([...base.jobs, ...head.jobs].flatMap((j) => j.attrs));
  const names = [...new Set([...base.jobs, ...head.jobs].map((j) => j.name))];
  const diffs: StoredJobDiff[] = [];
  for (const name of names) {
    const d = await runStepsTurning(
      diffSteps(
        base.jobs.find((j) => j.name === name)?.attrs ?? [],
        head.jobs.find((j) => j.name === name)?.attrs ?? [],
        graph,
      ),
    );
    diffs.push({ name, attrs: d.attrs, rebuildCountBySystem: d.rebuildCountBySystem });
  }
  return diffs;
}

/** What a diff needs of a derivation. */
interface DiffNode {
  inputs: readonly string[];
  system: string;
}

// Derivations whose `.drv` files earlier diffs of this process read (≈300 bytes each): a `.drv` never changes, so
// the diff of a new commit reads only the files of the derivations it changed, not the whole package set again.
const READ_NODES_CAPACITY = 300_000;
const readNodes = new LRUCache<string, DiffNode>({ max: READ_NODES_CAPACITY });

// Reads between turns of the event loop while a closure is read ahead (`readAheadClosure`): the evaluator that runs
// meanwhile waits for the event loop after each of its requests, which take a few milliseconds.
const READ_AHEAD_PER_TURN = 50;

/**
 * Reads the `.drv` closure of an evaluation into what diffs remember (see `closureOf`), a few files at a time:
 * called with a pull request's base while its head evaluates, the diff then reads only what the head changed. An
 * unreadable `.drv` is left for the diff to report.
 */
export async function readAheadClosure(evaluation: CommitEvaluation): Promise<void> {
  try {
    await closureOf(
      evaluation.jobs.flatMap((j) => j.attrs),
      READ_AHEAD_PER_TURN,
    );
  } catch {
    // The diff reads it again, and says what is wrong with it.
  }
}

/**
 * Inputs and systems of every derivation the evaluations reached: from what earlier diffs read, else read from the
 * `.drv` files in-process (an evaluation store's checked against their paths; see `readStoreDerivation`).
 */
async function closureOf(attrs: readonly EvalResult[], readsPerTurn?: number): Promise<ClosureSource> {
  const nodes = new Map<string, DiffNode>();
  await walkDerivations(
    attrs.flatMap((a) => (a.drvPath ? [a.drvPath] : [])),
    (drvPath) => {
      let node = readNodes.get(drvPath);
      const read = node === undefined;
      if (!node) {
        const d = readStoreDerivation(drvPath);
        node = { inputs: Object.keys(d.inputDrvs), system: d.system };
        readNodes.set(drvPath, node);
      }
      nodes.set(drvPath, node);
      return { inputs: node.inputs, read };
    },
    readsPerTurn,
  );
  return {
    inputsOf: (drv) => nodes.get(drv)?.inputs ?? [],
    systemOf: (drv) => nodes.get(drv)?.system ?? 'unknown',
  };
}
