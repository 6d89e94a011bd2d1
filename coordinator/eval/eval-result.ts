import { storeFileExists } from '../../common/nix/derivation.js';
import { availableParallelism } from 'node:os';
import { isDrvPath, isStorePath } from '../../common/nix/store-path.js';
import type { NixLauncher } from './eval-environment.js';

/** The subset of `meta` eka-ci reports and stores. */
export interface EvalMeta {
  pname?: string;
  version?: string;
  /** As given: a string, or an attribute set's `spdxId`/`shortName`; a list stays a list. */
  license?: string | string[];
  /** GitHub handles, or names where a maintainer has none: for display only. */
  maintainers?: string[];
  /** Only the `github` handles of `meta.maintainers`: what may authorise a GitHub user (never a display name). */
  githubMaintainers?: string[];
  platforms?: string[];
  broken?: boolean;
}

/** One attribute of an evaluation, streamed as soon as it is known. */
export interface EvalResult {
  /** Dotted path relative to the selected attribute path (`nested.inner.pkg`); `default` for a lone derivation. */
  attr: string;
  drvPath?: string;
  system?: string;
  outputs?: Record<string, string>;
  meta?: EvalMeta;
  /** Nix's message for an attribute that threw, failed an assert, aborted or crashed the evaluator. */
  error?: string;
  /**
   * Meta fields (`maintainers`, `license`, …) that failed to evaluate, with Nix's message; the drv still counts. The
   * key `meta` stands for the meta set as a whole, where the evaluator cannot tell which field failed (nix-eval-jobs).
   */
  metaErrors?: Record<string, string>;
  /** Evaluated (drvPath given) but not for a system it, or this evaluation, supports. Not an error. */
  skipped?: 'unsupported-platform';
}

export interface EvaluatorOptions {
  /** Absolute path of a Nix file inside a checkout. */
  file: string;
  /** Selected first; [] is the file's value (called with {} if it is a function). */
  attrPath: readonly string[];
  workers?: number;
  maxMemoryMiB?: number;
  /** Every evaluated `.drv` gets an indirect GC root here. */
  gcRootsDir: string;
  /** When given, a derivation for any other system is reported skipped. */
  systems?: readonly string[];
  /** Starts the evaluator's Nix processes: sandbox, store, restricted evaluation (see EvalEnvironment). */
  launcher: NixLauncher;
}

export type CompiledEvaluatorOptions = Required<Omit<EvaluatorOptions, 'systems'>> & Pick<EvaluatorOptions, 'systems'>;

// Evaluation is CPU-bound, one core per worker; past four, a package set's shared imports make each extra
// worker pay mostly for memory, not speed.
export const DEFAULT_WORKERS = Math.max(1, Math.min(availableParallelism(), 4));

// Nixpkgs evaluates in ≈1–1.5 GiB per worker; 2 GiB leaves headroom yet restarts a worker that leaks.
export const DEFAULT_MAX_MEMORY_MIB = 2048;

export function compileOptions(o: EvaluatorOptions): CompiledEvaluatorOptions {
  return {
    file: o.file,
    attrPath: o.attrPath,
    workers: Math.max(1, Math.floor(o.workers ?? DEFAULT_WORKERS)),
    maxMemoryMiB: o.maxMemoryMiB ?? o.launcher.maxMemoryMiB,
    gcRootsDir: o.gcRootsDir,
    systems: o.systems,
    launcher: o.launcher,
  };
}

// A system name (`x86_64-linux`) is short; anything longer is not one.
const MAX_SYSTEM_LENGTH = 64;

/**
 * Why a derivation's answer cannot be used (an attribute set that only claims `type = "derivation"`), or
 * undefined when its drv path names a `.drv` file in the store and its outputs are store paths.
 */
export function derivationProblem(
  item: { drvPath: unknown; system: unknown; outputs: unknown },
  exists: (path: string) => boolean = storeFileExists,
): string | undefined {
  if (typeof item.drvPath !== 'string' || !isDrvPath(item.drvPath)) {
    return `drvPath ${JSON.stringify(item.drvPath)} is not a .drv store path`;
  }
  if (!exists(item.drvPath)) return `drvPath ${item.drvPath} does not exist in the store`;
  if (typeof item.system !== 'string' || item.system === '' || item.system.length > MAX_SYSTEM_LENGTH) {
    return `system ${JSON.stringify(item.system)} is not a system name`;
  }
  const outputs = item.outputs;
  if (typeof outputs !== 'object' || outputs === null || Object.keys(outputs).length === 0) {
    return 'it has no outputs';
  }
  for (const [name, path] of Object.entries(outputs)) {
    if (typeof path !== 'string' || !isStorePath(path)) return `output ${name} is not a store path`;
  }
  return undefined;
}
