import { join } from 'node:path';
import { EvaluationError } from '../../common/errors.js';
import type { Checkout, FetchOptions, GitMirrors } from '../git/git-mirrors.js';
import { RepoConfigError } from '../repo-config/errors.js';
import { type FlakeJob, type RepoJob, loadRepoConfig } from '../repo-config/repo-config.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../../common/nix/cli.js';
import { type CheckPlan, planChecks } from './check-shells.js';
import { evaluateFlake } from './flake.js';
import type { EvalEnvironment } from './eval-environment.js';
import type { EvalPolicy } from './eval-options.js';
import type { EvalResult } from './eval-result.js';
import { evaluate } from './evaluator.js';

export interface JobEvaluation {
  name: string;
  allowEvalFailures: boolean;
  /** The job's size_check threshold, if any. */
  maxIncreasePercent: number | undefined;
  /** The job's size_check.base_branch: sizes compare with that branch's newest recorded build (see SizeHistory). */
  sizeBaseBranch?: string | undefined;
  attrs: EvalResult[];
  seconds: number;
  /** The ids of the server's caches the job's outputs are pushed to (`jobs.<name>.caches`). */
  caches?: string[];
}

export interface CommitEvaluation {
  commit: string;
  jobs: JobEvaluation[];
  /** The digest of the commit's `.eka-ci` configuration (see RepoConfig.digest); absent for old records. */
  configDigest?: string;
  /** The commit's repository checks with their shells evaluated; absent for old records. */
  checks?: CheckPlan[];
}

/**
 * Evaluates the jobs of a repository at one revision: the commit is checked out from the coordinator's mirror
 * of the repository, its `.eka-ci/config.json` read, and each job evaluated. The checkout is released after.
 * `mirrors` is the process's one GitMirrors for the data directory (it cleans up stale worktrees when created).
 */
export async function evaluateCommit(options: {
  mirrors: GitMirrors;
  dataDir: string;
  repo: string;
  rev: string;
  jobs?: readonly string[];
  /** Credentials for a private repository (a GitHub installation token). */
  fetch?: FetchOptions;
  /** Called with each attribute as soon as it is evaluated (progress displays). */
  onResult?: (r: EvalResult, job: string) => void;
  /** Where and how repository code is evaluated (sandbox, store, limits). */
  environment: EvalEnvironment;
  /** What this repository's expressions may do beyond their checkout (server configuration, never the repository's). */
  policy: EvalPolicy;
  /** Where checks that list no systems run; default this machine's system. */
  defaultSystem?: string;
}): Promise<CommitEvaluation> {
  await options.environment.prepare(options.policy);
  const checkout = await options.mirrors.checkout(options.repo, options.rev, options.fetch);
  try {
    const config = await loadRepoConfig(checkout.dir);
    if (!config) {
      throw new RepoConfigError(options.rev, [
        'no eka-ci configuration (.eka-ci/config.json or .ekaci/config.json) at this revision',
      ]);
    }
    const unknown = (options.jobs ?? []).filter((j) => !config.jobs.some((c) => c.name === j));
    if (unknown.length > 0) {
      throw new EvaluationError(
        `no job named ${unknown.join(', ')} in ${config.source} (jobs: ${config.jobs.map((j) => j.name).join(', ')})`,
      );
    }
    const selected = config.jobs.filter((j) => !options.jobs?.length || options.jobs.includes(j.name));
    const jobs: JobEvaluation[] = [];
    for (const job of selected) {
      const started = performance.now();
      const attrs: EvalResult[] = [];
      const gcRoots = join(options.dataDir, 'gcroots', checkout.commit);
      for await (const evaluated of evaluateJob(job, checkout, gcRoots, options.environment, options.policy)) {
        const r = relativeToCheckout(evaluated, checkout.dir);
        attrs.push(r);
        options.onResult?.(r, job.name);
      }
      attrs.sort((a, b) => (a.attr < b.attr ? -1 : a.attr > b.attr ? 1 : 0));
      jobs.push({
        name: job.name,
        allowEvalFailures: job.allowEvalFailures,
        maxIncreasePercent: job.sizeCheck?.maxIncreasePercent,
        ...(job.sizeCheck?.baseBranch ? { sizeBaseBranch: job.sizeCheck.baseBranch } : {}),
        attrs,
        seconds: (performance.now() - started) / 1000,
        ...(job.caches.length > 0 ? { caches: job.caches } : {}),
      });
    }
    const checks = await planChecks(
      config,
      checkout,
      options.defaultSystem ?? (await localSystem()),
      options.environment,
      options.policy,
      join(options.dataDir, 'gcroots', checkout.commit),
    );
    return { commit: checkout.commit, jobs, configDigest: config.digest, checks };
  } finally {
    await checkout.release();
  }
}

/**
 * Nix names files in its messages by absolute path, and a checkout's path holds its commit. Written relative to the
 * checkout, an error reads as the repository names its files, and the same failure reads the same in every commit
 * (the rebuild diff compares failures by their text).
 */
function relativeToCheckout(r: EvalResult, checkoutDir: string): EvalResult {
  const prefix = `${checkoutDir}/`;
  const strip = (text: string): string => text.split(prefix).join('');
  if (r.error === undefined && r.metaErrors === undefined) return r;
  const out: EvalResult = { ...r };
  if (r.error !== undefined) out.error = strip(r.error);
  if (r.metaErrors !== undefined) {
    out.metaErrors = Object.fromEntries(Object.entries(r.metaErrors).map(([k, v]) => [k, strip(v)]));
  }
  return out;
}

function evaluateJob(
  job: RepoJob,
  checkout: Checkout,
  gcRootsDir: string,
  environment: EvalEnvironment,
  policy: EvalPolicy,
): AsyncGenerator<EvalResult> {
  if (job.kind === 'flake') return evaluateFlakeJob(job, checkout, gcRootsDir, environment, policy);
  return evaluate({
    file: job.file,
    attrPath: job.attrPath,
    gcRootsDir,
    workers: environment.options.workers,
    launcher: environment.launcher({ roots: [checkout.dir], policy }),
    ...(job.systems ? { systems: job.systems } : {}),
  });
}

async function* evaluateFlakeJob(
  job: FlakeJob,
  checkout: Checkout,
  gcRootsDir: string,
  environment: EvalEnvironment,
  policy: EvalPolicy,
): AsyncGenerator<EvalResult> {
  // Without a list, the job is evaluated for what this machine builds; a coordinator adds its agents' systems.
  const systems = job.systems ?? [await localSystem()];
  yield* evaluateFlake({
    checkoutDir: checkout.dir,
    gitDir: checkout.gitDir,
    rev: checkout.commit,
    outputs: job.outputs,
    systems,
    gcRootsDir,
    workers: environment.options.workers,
    environment,
    policy,
  });
}

let cachedSystem: Promise<string> | undefined;

/** The local Nix's `system` (asked once per process). */
export function localSystem(): Promise<string> {
  cachedSystem ??= runNixChecked('nix-instantiate', [
    ...NO_SUBSTITUTERS,
    '--eval',
    '--json',
    '-E',
    'builtins.currentSystem',
  ]).then((out) => JSON.parse(out) as string);
  return cachedSystem;
}
