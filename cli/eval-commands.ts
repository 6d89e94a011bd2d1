import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { UsageError } from '../common/errors.js';
import { createLogger, type Logger, silentLogger } from '../common/logging.js';
import { type CoordinatorOptions, loadCoordinatorConfig } from '../coordinator/config.js';
import { EvalEnvironment } from '../coordinator/eval/eval-environment.js';
import { type EvalPolicy, policyFor } from '../coordinator/eval/eval-options.js';
import type { EvalResult } from '../coordinator/eval/eval-result.js';
import { type CommitEvaluation, type JobEvaluation, evaluateCommit } from '../coordinator/eval/repo-evaluation.js';
import { diffCommits } from '../coordinator/graph/commit-diff.js';
import { DiffStore, type StoredJobDiff } from '../coordinator/graph/diff-store.js';
import { EvaluationStore } from '../coordinator/eval/evaluation-store.js';
import { evalFailureBlocks } from '../coordinator/review/classify.js';
import { openDatabase } from '../coordinator/db/database.js';
import { GitMirrors } from '../coordinator/git/git-mirrors.js';

export interface CommonOptions {
  repo: string;
  job: string[];
  json?: boolean;
  dataDir?: string;
  config?: string;
  verbose?: boolean;
}

export interface RepoContext {
  repo: string;
  dataDir: string;
  logger: Logger;
  mirrors: GitMirrors;
  config: CoordinatorOptions;
  /** Sandbox, store and limits for evaluating the repository's code; closed by `close()`. */
  environment: EvalEnvironment;
  /** What the configuration allows this repository's expressions beyond their checkout. */
  policy: EvalPolicy;
  /** A revision as the user's repository names it (`HEAD~1`, `main`, a short sha) → its commit id. */
  revision(rev: string): string;
  close(): void;
}

/** What every repository command needs; the caller closes it (it may run a nix-daemon for evaluation). */
export async function openContext(opts: CommonOptions, defaults: Record<string, unknown> = {}): Promise<RepoContext> {
  const isUrl = /^[a-z]+:\/\//.test(opts.repo);
  const repo = resolve(opts.repo);
  if (!isUrl && !existsSync(repo)) throw new UsageError(`--repo ${opts.repo}: no such directory`);
  const config = loadCoordinatorConfig(opts.config, process.env, defaults);
  const dataDir = opts.dataDir ? resolve(opts.dataDir) : config.dataDir;
  const logger = opts.verbose ? createLogger('ekaci') : silentLogger();
  const name = isUrl ? opts.repo : repo;
  const environment = await EvalEnvironment.open(config.evaluation, logger.child({ component: 'eval' }), {
    evalStoreDir: join(dataDir, 'eval-store'),
  });
  return {
    repo: name,
    dataDir,
    logger,
    mirrors: new GitMirrors({ dir: join(dataDir, 'git'), logger }),
    config,
    environment,
    policy: policyFor(config.evaluation, name),
    revision: (rev) => (isUrl ? rev : localRevision(repo, rev)),
    close: () => environment.close(),
  };
}

/**
 * Resolves a revision in a local repository the way its user would (`HEAD~1`, a branch, a short sha), read-only.
 * What the repository cannot resolve is passed on unchanged, for the mirror to fetch or to reject with a reason.
 */
function localRevision(repo: string, rev: string): string {
  try {
    return execFileSync(
      'git',
      ['-C', repo, 'rev-parse', '--verify', '--quiet', '--end-of-options', `${rev}^{commit}`],
      {
        encoding: 'utf8',
        stdio: ['ignore', 'pipe', 'ignore'],
      },
    ).trim();
  } catch {
    return rev;
  }
}

/**
 * `ekaci eval --repo PATH --rev REV [--job NAME]… [--json]`: the evaluation of a commit's jobs. Exit 1 when an
 * attribute failed to evaluate in a job that does not allow evaluation failures.
 */
export async function evalCommand(opts: CommonOptions & { rev: string }): Promise<number> {
  const c = await openContext(opts);
  let result: CommitEvaluation;
  try {
    result = await evaluateCommit({ ...c, rev: c.revision(opts.rev), jobs: opts.job });
  } finally {
    c.close();
  }
  const json = {
    jobs: result.jobs.map((j) => ({ name: j.name, attrs: j.attrs.map(attrJson), seconds: round(j.seconds) })),
  };
  process.stdout.write(opts.json ? `${JSON.stringify(json, null, 2)}\n` : renderEval(result));
  // One commit, no base: every error is new.
  const blocks = (j: JobEvaluation, a: EvalResult): boolean =>
    evalFailureBlocks({ headFailed: a.error !== undefined, baseFailed: false, allowEvalFailures: j.allowEvalFailures });
  return result.jobs.some((j) => j.attrs.some((a) => blocks(j, a))) ? 1 : 0;
}

/** `ekaci diff --repo PATH --base REV --head REV [--job NAME]… [--json]`: what the change rebuilds. */
export async function diffCommand(opts: CommonOptions & { base: string; head: string }): Promise<number> {
  const c = await openContext(opts);
  try {
    return await diff(c, opts);
  } finally {
    c.close();
  }
}

async function diff(c: RepoContext, opts: CommonOptions & { base: string; head: string }): Promise<number> {
  const [baseCommit, headCommit] = [
    await c.mirrors.ensureCommit(c.repo, c.revision(opts.base)),
    await c.mirrors.ensureCommit(c.repo, c.revision(opts.head)),
  ];
  const db = openDatabase(join(c.dataDir, 'ekaci.sqlite'));
  try {
    const diffs = new DiffStore(db);
    const evaluations = new EvaluationStore(db);
    const [baseEval, headEval] = [evaluations.load(c.repo, baseCommit), evaluations.load(c.repo, headCommit)];
    // A diff of every job is stored (with the evaluations it restores unchanged attributes from); one narrowed with
    // --job is computed afresh.
    let jobs = opts.job.length === 0 && baseEval && headEval ? diffs.load(c.repo, baseEval, headEval) : undefined;
    if (!jobs) {
      const computed = await computeDiff(c, baseCommit, headCommit, opts.job);
      jobs = computed.jobs;
      if (opts.job.length === 0) {
        for (const side of [computed.base, computed.head]) await evaluations.save(c.repo, side);
        diffs.save(c.repo, baseCommit, headCommit, jobs);
      }
    }
    printDiff(jobs, opts.json ?? false);
  } finally {
    db.close();
  }
  return 0;
}

async function computeDiff(
  c: RepoContext,
  baseRev: string,
  headRev: string,
  jobFilter: readonly string[],
): Promise<{ base: CommitEvaluation; head: CommitEvaluation; jobs: StoredJobDiff[] }> {
  const base = await evaluateCommit({ ...c, rev: baseRev, jobs: jobFilter });
  const head = await evaluateCommit({ ...c, rev: headRev, jobs: jobFilter });
  return { base, head, jobs: await diffCommits(base, head) };
}

function printDiff(jobs: readonly StoredJobDiff[], json: boolean): void {
  if (json) process.stdout.write(`${JSON.stringify({ jobs }, null, 2)}\n`);
  else {
    for (const j of jobs) {
      process.stdout.write(`job ${j.name}\n`);
      for (const a of j.attrs.filter((x) => x.change !== 'unchanged')) {
        process.stdout.write(
          `  ${a.change.padEnd(9)} ${a.attr}${a.blastRadius ? ` (blast radius ${a.blastRadius})` : ''}\n`,
        );
      }
      const counts = Object.entries(j.rebuildCountBySystem).map(([s, n]) => `${s}: ${n}`);
      process.stdout.write(`  rebuilds: ${counts.length ? counts.join(', ') : 'none'}\n`);
    }
  }
}

function attrJson(a: EvalResult): Record<string, unknown> {
  return {
    attr: a.attr,
    ...(a.drvPath ? { drv: a.drvPath } : {}),
    ...(a.system ? { system: a.system } : {}),
    ...(a.outputs ? { outputs: a.outputs } : {}),
    ...(a.meta ? { meta: a.meta } : {}),
    ...(a.error ? { error: a.error } : {}),
    ...(a.metaErrors ? { metaErrors: a.metaErrors } : {}),
    ...(a.skipped ? { skipped: a.skipped } : {}),
  };
}

function renderEval(r: CommitEvaluation): string {
  const lines: string[] = [];
  for (const j of r.jobs) {
    const failed = j.attrs.filter((a) => a.error).length;
    lines.push(`job ${j.name}: ${j.attrs.length} attributes, ${failed} failed to evaluate (${round(j.seconds)} s)`);
    for (const a of j.attrs) {
      lines.push(
        a.error
          ? `  error   ${a.attr}: ${a.error.split('\n')[0]}`
          : `  ${a.skipped ? 'skipped' : 'ok     '} ${a.attr} ${a.drvPath ?? ''}`,
      );
    }
  }
  return `${lines.join('\n')}\n`;
}

function round(s: number): number {
  return Math.round(s * 1000) / 1000;
}
