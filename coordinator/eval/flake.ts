import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { EvaluationError } from '../../common/errors.js';
import { baseGitEnv, gitReason, runGit } from '../git/git-process.js';
import type { FlakeOutput } from '../repo-config/repo-config.js';
import { nixString } from './eval-expression.js';
import type { EvalEnvironment } from './eval-environment.js';
import type { EvalPolicy } from './eval-options.js';
import type { EvalResult } from './eval-result.js';
import { evaluateBuiltIn } from './evaluator.js';

/** What a flake evaluation reads: a job's outputs, or `devShells` for the shells of repository checks. */
export type EvaluatedFlakeOutput = FlakeOutput | 'devShells';

export interface FlakeEvaluatorOptions {
  /** A git checkout (a clone or a worktree) whose top holds `flake.nix`. */
  checkoutDir: string;
  /** The commit to evaluate; default the checkout's `HEAD`. */
  rev?: string;
  outputs: readonly EvaluatedFlakeOutput[];
  /** Only these systems are evaluated. */
  systems: readonly string[];
  workers?: number;
  maxMemoryMiB?: number;
  /** Every evaluated `.drv` gets an indirect GC root here. */
  gcRootsDir: string;
  environment: EvalEnvironment;
  policy: EvalPolicy;
  /** The git directory behind a worktree checkout (its objects), when it lies outside `checkoutDir`. */
  gitDir?: string;
}

const GIT_TIMEOUT_MS = 60_000;

/**
 * Evaluates the derivations of a flake's `checks`, `packages` and `hydraJobs` outputs with the built-in
 * evaluator (`evaluateBuiltIn`; `nix-eval-jobs` is not used for flakes), one result per attribute. Attribute
 * names:
 *
 * - `checks.<system>.<name>`, `packages.<system>.<name>` and `devShells.<system>.<name>` (the shells of
 *   repository checks);
 * - `hydraJobs.<job>.<system>` (Hydra's own layout), or `hydraJobs.<job>` for a job that is a derivation
 *   itself (reported skipped when it is for a system not in `systems`).
 *
 * Only `systems` are evaluated: other systems' attributes are left out, not reported. An output the flake does
 * not have is absent from the results; one that throws is reported as an error on its name (`checks`), and an
 * attribute that throws is isolated like any other. A `flake.nix` that does not evaluate at all fails the run
 * with an `EvaluationError`.
 *
 * The flake is loaded with `builtins.getFlake "git+file://<checkout>?rev=<sha>"`, a locked reference: Nix copies
 * the commit's tracked files (not stray files of the checkout) and `self.rev`/`self.shortRev` are set, as
 * `nix build` of a clean checkout would give them. Works with a worktree, whose `.git` is a file.
 */
export async function* evaluateFlake(options: FlakeEvaluatorOptions): AsyncGenerator<EvalResult> {
  const rev = options.rev ?? (await headRev(options.checkoutDir));
  const dir = await mkdtemp(join(tmpdir(), 'ekaci-flake-'));
  try {
    const file = join(dir, 'flake-jobs.nix');
    await writeFile(file, flakeJobsExpression(flakeRef(options.checkoutDir, rev), options.outputs, options.systems));
    const launcher = options.environment.launcher({
      roots: [dir, options.checkoutDir],
      gitDirs: options.gitDir ? [options.gitDir] : [],
      policy: options.policy,
    });
    yield* evaluateBuiltIn({
      file,
      attrPath: [],
      gcRootsDir: options.gcRootsDir,
      systems: options.systems,
      launcher,
      ...(options.workers !== undefined ? { workers: options.workers } : {}),
      ...(options.maxMemoryMiB !== undefined ? { maxMemoryMiB: options.maxMemoryMiB } : {}),
    });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** The locked flake reference of one commit of a local git checkout. */
export function flakeRef(checkoutDir: string, rev: string): string {
  if (!/^[0-9a-f]{40}$/.test(rev)) throw new EvaluationError(`not a full commit sha: ${rev}`);
  return `git+${pathToFileURL(checkoutDir).href}?rev=${rev}`;
}

/**
 * A Nix file whose value is `{ <output> = … }` for each of `outputs` the flake has, shaped for the built-in
 * evaluator: every set on the way to a derivation is marked `recurseForDerivations`, and only `systems` are kept.
 */
export function flakeJobsExpression(
  ref: string,
  outputs: readonly EvaluatedFlakeOutput[],
  systems: readonly string[],
): string {
  const list = (xs: readonly string[]): string => `[ ${xs.map(nixString).join(' ')} ]`;
  return `let
  flake = builtins.getFlake ${nixString(ref)};
  wanted = builtins.listToAttrs (map (s: { name = s; value = null; }) ${list(systems)});
  mark = s: s // { recurseForDerivations = true; };
  isDrv = v: builtins.isAttrs v && (v.type or null) == "derivation";
  # <system>.<name>: only the wanted systems.
  perSystem = o: mark (builtins.mapAttrs (_: mark) (builtins.intersectAttrs wanted o));
  # <job>.<system>, or a derivation for a job.
  jobs = o: mark (builtins.mapAttrs (_: j: if isDrv j then j else mark (builtins.intersectAttrs wanted j)) o);
  shape = {
    checks = perSystem;
    packages = perSystem;
    devShells = perSystem;
    hydraJobs = jobs;
  };
in
builtins.listToAttrs (map (name: { inherit name; value = shape.\${name} flake.outputs.\${name}; })
  (builtins.filter (name: flake.outputs ? \${name}) ${list(outputs)}))
`;
}

async function headRev(checkoutDir: string): Promise<string> {
  const r = await runGit(['rev-parse', '--verify', 'HEAD^{commit}'], {
    env: baseGitEnv(process.env),
    timeoutMs: GIT_TIMEOUT_MS,
    cwd: checkoutDir,
  });
  if (r.code !== 0) {
    throw new EvaluationError(`${checkoutDir}: cannot read the checked-out commit: ${gitReason(r.stderr)}`);
  }
  return r.stdout.trim();
}
