import { Minimatch } from 'minimatch';
import { z } from 'zod';
import { DEFAULT_MAX_MEMORY_MIB, DEFAULT_WORKERS } from './eval-result.js';

/**
 * `[evaluation]` of the coordinator's configuration: how repository code is evaluated. Evaluation runs code from
 * pull requests on the coordinator, so everything here defaults to the safe side (see ARCHITECTURE.md §7).
 */

// An attribute of nixpkgs evaluates in well under a second; ten minutes is a loop that will not end.
export const DEFAULT_ATTR_TIMEOUT_S = 600;

const rule = z
  .object({
    /** Repository globs (`owner/*`, or a path for `ekaci review` of a local repository; `**` for every one). */
    repos: z.array(z.string().min(1)).min(1),
    /** URI prefixes `fetchurl`, `fetchTarball`, `fetchGit` may reach; the sandbox gets network when non-empty. */
    allowed_uris: z.array(z.string().min(1)).default([]),
    allow_import_from_derivation: z.boolean().default(false),
  })
  .strict();

// A day or two of a busy default branch; a nixpkgs commit's evaluation costs some megabytes as rows.
export const DEFAULT_KEEP_COMMITS = 100;
// Points of one attribute's output on one branch. A point is added only when the derivation changes, so this is years
// of a package updated weekly; a mass rebuild adds one point (some 200 bytes) to every series of the branch.
export const DEFAULT_KEEP_SIZE_POINTS = 300;

export const evaluationSchema = z
  .object({
    workers: z.number().int().min(1).default(DEFAULT_WORKERS),
    max_memory_mib: z.number().int().min(64).default(DEFAULT_MAX_MEMORY_MIB),
    attr_timeout_seconds: z.number().int().min(1).default(DEFAULT_ATTR_TIMEOUT_S),
    /** Turning the sandbox off is for hosts that cannot run one and evaluate only trusted code. */
    sandbox: z.boolean().default(true),
    /**
     * Where evaluators write `.drv` files: `auto`, the evaluation store under the data directory (through a daemon
     * where a repository may import from derivations); or always the host's nix-daemon, or one the coordinator starts
     * for its own store.
     */
    store: z.enum(['auto', 'daemon', 'private-daemon']).default('auto'),
    allow_import_from_derivation: z.boolean().default(false),
    repositories: z.array(rule).default([]),
    /**
     * Retention: the most recently evaluated commits kept per repository (besides those open pull requests and
     * unfinished runs use); older evaluations are deleted when a run ends.
     */
    keep_commits: z.number().int().min(1).default(DEFAULT_KEEP_COMMITS),
    /** Retention of size history: the newest points kept per repository, branch, attribute and output. */
    keep_size_points: z.number().int().min(1).default(DEFAULT_KEEP_SIZE_POINTS),
  })
  .strict()
  .prefault({});

export interface EvalRule {
  repos: readonly string[];
  allowedUris: readonly string[];
  allowImportFromDerivation: boolean;
}

export interface EvaluationOptions {
  workers: number;
  maxMemoryMiB: number;
  attrTimeoutSeconds: number;
  sandbox: boolean;
  store: 'auto' | 'daemon' | 'private-daemon';
  allowImportFromDerivation: boolean;
  rules: readonly EvalRule[];
  keepCommits: number;
  keepSizePoints: number;
}

/** What one repository's expressions may do beyond reading their own checkout and the store. */
export interface EvalPolicy {
  allowedUris: readonly string[];
  allowImportFromDerivation: boolean;
}

export const NO_EXTRA_POLICY: EvalPolicy = { allowedUris: [], allowImportFromDerivation: false };

export function compileEvaluationOptions(e: z.infer<typeof evaluationSchema>): EvaluationOptions {
  return {
    workers: e.workers,
    maxMemoryMiB: e.max_memory_mib,
    attrTimeoutSeconds: e.attr_timeout_seconds,
    sandbox: e.sandbox,
    store: e.store,
    allowImportFromDerivation: e.allow_import_from_derivation,
    keepCommits: e.keep_commits,
    keepSizePoints: e.keep_size_points,
    rules: e.repositories.map((r) => ({
      repos: r.repos,
      allowedUris: r.allowed_uris,
      allowImportFromDerivation: r.allow_import_from_derivation,
    })),
  };
}

export const DEFAULT_EVALUATION_OPTIONS: EvaluationOptions = compileEvaluationOptions(evaluationSchema.parse({}));

/** The policy for a repository: the server-wide switches, widened by every rule whose glob matches it. */
export function policyFor(o: EvaluationOptions, repo: string): EvalPolicy {
  const matching = o.rules.filter((r) =>
    r.repos.some((g) => new Minimatch(g, { nocase: true, dot: true, nonegate: true }).match(repo)),
  );
  return {
    allowedUris: [...new Set(matching.flatMap((r) => r.allowedUris))],
    allowImportFromDerivation: o.allowImportFromDerivation || matching.some((r) => r.allowImportFromDerivation),
  };
}
