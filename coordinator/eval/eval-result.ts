import { availableParallelism } from 'node:os';

/** The subset of `meta` eka-ci reports and stores. */
export interface EvalMeta {
  pname?: string;
  version?: string;
  /** As given: a string, or an attribute set's `spdxId`/`shortName`; a list stays a list. */
  license?: string | string[];
  /** GitHub handles, or names where a maintainer has none. */
  maintainers?: string[];
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
    maxMemoryMiB: o.maxMemoryMiB ?? DEFAULT_MAX_MEMORY_MIB,
    gcRootsDir: o.gcRootsDir,
    systems: o.systems,
  };
}
