import { SUCCESS_STATES } from '../scheduler/build-state.js';
import { join } from 'node:path';
import type { Logger } from '../../common/logging.js';
import { Semaphore } from '../../common/semaphore.js';
import type { EvalEnvironment } from '../eval/eval-environment.js';
import type { EvalPolicy } from '../eval/eval-options.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import { releaseCommitRoots } from '../eval/gc-roots.js';
import { type CommitEvaluation, evaluateCommit } from '../eval/repo-evaluation.js';
import type { FetchOptions, GitAuth, GitMirrors } from '../git/git-mirrors.js';
import { readAheadClosure } from '../graph/commit-diff.js';
import type { StoredJobDiff } from '../graph/diff-store.js';
import { withBaseGates } from '../review/base-policy.js';
import { newlyFailingDrvs } from '../review/classify.js';
import {
  type BuildRules,
  heldBackOf,
  limitChecks,
  limitReport,
  readBuildRules,
  rebuildsBySystem,
} from '../review/build-limits.js';
import { type ReviewPlan, reviewRoots } from '../review/review-roots.js';
import { codeBlock, codeSpan } from '../review/markdown.js';
import type { ReviewService } from '../review/review-service.js';
import type { BuildManager } from '../scheduler/build-manager.js';
import type { BuildStore } from '../scheduler/build-store.js';
import { type RunEta, etaShort, etaText } from '../scheduler/eta.js';
import type { CheckManager, CheckSpec } from '../checks/check-manager.js';
import { type CachePushService, pushSummaryLines } from '../caches/push-service.js';
import { checkSpecs } from '../checks/check-specs.js';
import {
  CHECKS_CHECK,
  EVALUATION_CHECK,
  SUMMARY_CHECK,
  type RootResult,
  buildCheck,
  buildCheckName,
  buildProgress,
  checksCheck,
  completed,
  evaluationCheck,
  inProgress,
  summaryCheck,
} from './check-report.js';
import type { CheckRunSpec, CheckTarget } from './check-runs.js';
import { attrsFromCommitTitles } from './ofborg-titles.js';
import { OPEN_RUN_STATES, type RunRoot, type RunRow, type RunStore } from './run-store.js';

export interface PipelineDeps {
  runs: RunStore;
  reporter: { set(target: CheckTarget, spec: CheckRunSpec, options?: { rerun?: boolean }): void };
  /** Credentials to clone the installation's repositories (and public forks). */
  cloneAuth(installationId: number): Promise<GitAuth>;
  mirrors: GitMirrors;
  dataDir: string;
  evalEnvironment: () => EvalEnvironment;
  /** What the server configuration lets a repository's expressions do (allowed URIs, import from derivation). */
  evalPolicy: (repo: string) => EvalPolicy;
  evaluations: EvaluationStore;
  /** `[evaluation] keep_commits`: how many of a repository's most recently evaluated commits are kept. */
  keepCommits: number;
  reviews: ReviewService;
  manager: BuildManager;
  store: BuildStore;
  checks: CheckManager;
  /** The operator's binary caches: which of a run's roots go to which cache (see CachePushService). */
  cachePushes?: CachePushService;
  /** `check_timeout_seconds` (for checks that set none) and `[security] untrusted_check_network_repos`. */
  checkPolicy: { timeoutSeconds: number; untrustedNetworkRepos: readonly string[] };
  /** Links into the coordinator's web API for check runs' details; undefined without a public URL. */
  links: RunLinks | undefined;
  logger: Logger;
  /** Called when a run is done (the merge policy looks at it). */
  onFinished(run: RunRow): void;
  /** The commit titles of a pull request (attributes named OfBorg-style, `hello: 1.0 -> 2.0`, are built too). */
  commitTitles(run: RunRow): Promise<string[]>;
  /** `[rebuild] max_rebuild_count`: above it a job builds only attributes named (see review/build-limits.ts); 0: none. */
  maxRebuildCount?: number;
}

export interface RunLinks {
  review(repo: string, base: string, head: string): string;
  derivation(drvPath: string): string;
}

// Build checks are redrawn at most this often while builds settle; the reporter coalesces further.
const PROGRESS_REFRESH_MS = 2_000;
// Evaluations (and the git work before them) run this many at a time; the rest wait as `queued`. Evaluation is
// CPU-bound and runs its own workers, so a burst of pushes must not start hundreds of them (or hundreds of git
// processes, whose spawning blocks the event loop everyone else shares).
const MAX_CONCURRENT_EVALUATIONS = 2;

/**
 * Carries a run from queued to done: evaluate (cached per commit), diff against the base, build the head's
 * changed and added attributes (and the base's, where not known), then conclude the check runs from the review.
 * Every step is idempotent, so a run interrupted by a restart is simply run again.
 */
export class RunPipeline {
  private readonly active = new Map<number, Promise<void>>();
  private stopped = false;
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly evaluations = new Semaphore(MAX_CONCURRENT_EVALUATIONS);

  constructor(private readonly deps: PipelineDeps) {}

  /**
   * Stops touching runs (the coordinator is shutting down): unfinished ones stay as they are in the database and
   * are resumed by the next start.
   */
  stop(): void {
    this.stopped = true;
    for (const t of this.timers) clearInterval(t);
    this.timers.clear();
  }

  /** Starts (or resumes) a run in the background; a run already going is left alone. */
  start(runId: number): void {
    if (this.active.has(runId) || this.stopped) return;
    const p = this.execute(runId)
      .catch((err: Error) => this.fail(runId, err))
      .then(() => this.retainEvaluations(runId))
      .catch((err: Error) => this.deps.logger.error({ runId, err: err.message }, 'run bookkeeping failed'))
      .finally(() => this.active.delete(runId));
    this.active.set(runId, p);
  }

  /**
   * The retention policy, applied to a run's repository when the run ends: its `[evaluation] keep_commits` most
   * recently evaluated commits stay, and whatever open pull requests and unfinished runs use.
   */
  private async retainEvaluations(runId: number): Promise<void> {
    const run = this.deps.runs.run(runId);
    if (!run) return;
    const { evaluations } = this.deps;
    const deleted = evaluations.retain(run.repo, this.deps.keepCommits, this.deps.runs.commitsInUse(run.repo));
    if (deleted.length === 0) return;
    // Their .drv files may be collected now, unless another repository's evaluation of the commit still needs them.
    const released = deleted.filter((c) => !evaluations.isEvaluated(c));
    await releaseCommitRoots(join(this.deps.dataDir, 'gcroots'), released);
    this.deps.logger.info({ repo: run.repo, commits: deleted.length }, 'deleted evaluations no longer kept');
    // The evaluation store has nothing else to free its space: what those commits alone made goes now.
    if (released.length > 0) {
      await this.deps
        .evalEnvironment()
        .collectEvalStore()
        .catch((e: unknown) => this.deps.logger.warn({ err: e }, 'could not collect the evaluation store'));
    }
  }

  /** Resolves when every run started so far has finished (tests, graceful stop). */
  async idle(): Promise<void> {
    while (this.active.size > 0) await Promise.allSettled([...this.active.values()]);
  }

  /**
   * Cancels a run: its check runs conclude `cancelled`, and the derivations only it needed stop building (those
   * another open run needs keep going).
   */
  cancel(runId: number, reason: string): void {
    const run = this.deps.runs.run(runId);
    if (!run || !(OPEN_RUN_STATES.has(run.state) || run.state === 'awaiting-approval')) return;
    this.deps.runs.setRunState(runId, 'cancelled', reason);
    const { manager, runs } = this.deps;
    const mine = manager.unfinishedClosure(runs.roots(runId).map((r) => r.drvPath));
    const others = manager.unfinishedClosure(runs.rootsOfOtherOpenRuns(runId));
    const only = [...mine].filter((d) => !others.has(d));
    if (only.length > 0) manager.cancel(only, reason);
    const target = targetOf(run);
    const hasChecks =
      this.deps.checks.checksOf(run.repo, run.head_sha).length > 0 ||
      (run.base_sha !== null && (runs.heldBack(run.repo, run.base_sha, run.head_sha)?.checks?.length ?? 0) > 0);
    // A commit's checks are shared by its runs: they stop only when no other open run of the commit waits for them.
    const shared = runs
      .runsOf({ repo: run.repo, headSha: run.head_sha })
      .some((r) => r.id !== runId && OPEN_RUN_STATES.has(r.state));
    if (!shared) this.deps.checks.cancel(run.repo, run.head_sha, reason);
    const names = [
      EVALUATION_CHECK,
      SUMMARY_CHECK,
      ...(hasChecks ? [CHECKS_CHECK] : []),
      ...new Set(runs.roots(runId).map((r) => buildCheckName(r.system))),
    ];
    for (const name of names) this.deps.reporter.set(target, completed(name, 'cancelled', 'Cancelled', reason));
    this.deps.logger.info({ runId, reason, cancelled: only.length }, 'run cancelled');
  }

  private async execute(runId: number): Promise<void> {
    const { runs, reporter } = this.deps;
    const run = runs.run(runId);
    if (!run || !OPEN_RUN_STATES.has(run.state)) return;
    const target = targetOf(run);
    const details = run.base_sha ? this.deps.links?.review(run.repo, run.base_sha, run.head_sha) : undefined;
    const evaluated = await this.evaluations.run(async () => {
      if (!this.stillOpen(runId)) return undefined;
      reporter.set(target, inProgress(EVALUATION_CHECK, 'Evaluating', `Evaluating ${run.head_sha}.`, details), {
        rerun: true,
      });
      runs.setRunState(runId, 'evaluating');
      const titles = run.kind === 'pull_request' ? await this.deps.commitTitles(run) : [];
      const auth = await this.deps.cloneAuth(run.installation_id);
      // A fork's mirror borrows the base repository's objects: its pull request brings only what it adds.
      const fork = run.head_clone_url !== run.base_clone_url;
      if (fork && run.base_sha) await this.deps.mirrors.fetch(run.base_clone_url, [run.base_sha], { auth });
      // The base first: evaluations are kept in the order they were made, which is how an attribute's size history
      // reads (a base evaluated after its head would show a pull request's growth as a shrink).
      const base = run.base_sha
        ? await this.evaluation(run.repo, run.base_clone_url, run.base_sha, { auth })
        : undefined;
      // The base's .drv files are read for the diff while the head evaluates, in the evaluator's own processes.
      const readAhead = base ? readAheadClosure(base) : undefined;
      const head = await this.evaluation(run.repo, run.head_clone_url, run.head_sha, {
        auth,
        ...(fork ? { objectsFrom: run.base_clone_url } : {}),
      });
      await readAhead;
      // What the base lets the change build (max_rebuild_count, skip_build_paths), read while the mirrors are warm.
      const rules = base ? await this.buildRules(run, { auth }, fork) : undefined;
      return { head, base, titles, rules };
    });
    if (!evaluated || !this.stillOpen(runId)) return;
    const { head, base, titles, rules } = evaluated;
    // Judged by the base's gates: a pull request cannot allow itself evaluation failures.
    reporter.set(target, evaluationCheck(withBaseGates(head, base), base?.jobs, details));

    const diffs = base ? await this.deps.reviews.record(run.repo, base, head) : undefined;
    // Cancelled (a newer push, the pull request closed) while the diff was computed: it stays cancelled.
    if (!this.stillOpen(runId)) return;
    const rebuildCountBySystem = diffs ? rebuildsBySystem(diffs) : {};
    if (diffs) runs.setSummary(runId, { rebuildCountBySystem });
    const { roots, limits } = this.rootsOf(run, head, diffs, attrsFromCommitTitles(titles), rules);
    runs.setRoots(runId, roots);
    // Checks whose shells would build what the limits hold back do not run either.
    const checkPlan = limitChecks(this.checkSpecsOf(run, head, base), base, limits);
    // The whole change's report of the limits: stored for the API's review, and the summary check's when done.
    const heldBack = heldBackOf(limits, rebuildCountBySystem, checkPlan.held);
    runs.setHeldBack(runId, heldBack);
    this.deps.cachePushes?.planRun(run, roots, head, base);
    runs.setRunState(runId, 'building');
    const systems = [...new Set(roots.filter((r) => r.side === 'head').map((r) => r.system))].sort();
    // The progress carries the run's ETA once its builds are queued (coordinator/scheduler/eta.ts).
    const drawProgress = (): void => {
      const eta = this.deps.manager.etas.of(`run:${runId}`, () => roots.map((r) => r.drvPath));
      for (const system of systems)
        reporter.set(target, withEta(buildProgress(system, this.results(roots, system), details), eta));
      const building = inProgress(SUMMARY_CHECK, 'Building', `Building ${roots.length} derivations.`, details);
      reporter.set(target, withEta(building, eta));
    };
    drawProgress();
    const checkIds = this.requestChecks(run, checkPlan.run);
    const drawChecks = (): void => {
      if (checkIds.length > 0 || checkPlan.held.length > 0)
        reporter.set(target, checksCheck(this.deps.checks.resultsOf(run.repo, run.head_sha), details, checkPlan.held));
    };
    drawChecks();

    const refresh = setInterval(() => {
      // A cancelled run's checks are concluded: redrawing them as running would reopen them.
      if (!this.stillOpen(runId)) return;
      drawProgress();
      drawChecks();
    }, PROGRESS_REFRESH_MS);
    refresh.unref();
    this.timers.add(refresh);
    try {
      const requests: number[] = [];
      const isPrivate = this.deps.runs.repository(run.repo)?.private !== 0;
      for (const side of ['head', 'base'] as const) {
        const list = roots.filter((r) => r.side === side).map((r) => ({ attr: r.attr, drvPath: r.drvPath }));
        const source = `github ${run.repo} ${run.kind}${run.pr_number ? ` #${run.pr_number}` : ''} ${side}`;
        // The base is the repository's own code; only a head can be someone else's.
        const commit = side === 'head' ? run.head_sha : run.base_sha;
        const options = {
          rebuildFailed: run.rebuild_failed === 1,
          untrusted: side === 'head' && run.untrusted === 1,
          private: isPrivate,
          // The .drv files it builds stay in the Nix store as long as the commit's evaluation is kept.
          ...(commit ? { gcRootsDir: join(this.deps.dataDir, 'gcroots', commit) } : {}),
        };
        if (list.length > 0) requests.push(await this.deps.manager.submit(list, source, options));
      }
      await Promise.all([...requests.map((r) => this.deps.manager.waitFor(r)), this.deps.checks.waitFor(checkIds)]);
    } finally {
      clearInterval(refresh);
      this.timers.delete(refresh);
    }
    if (!this.stillOpen(runId)) return;
    // What the run may push but no agent did: roots built before it asked (they came with no lease).
    await this.deps.cachePushes?.pushLeftovers(runId, (drv) => this.builtOutputs(drv));
    if (!this.stillOpen(runId)) return;

    drawChecks();
    // The branch's commit that was built (a push's head, a pull request's base) joins the branch's size history.
    await this.deps.reviews.recordSizes(run, roots, { head, base });
    const review = base
      ? await this.deps.reviews.reviewOf(run.repo, base.commit, head.commit, undefined, { evaluations: { base, head } })
      : undefined;
    const newly = newlyFailingDrvs(review);
    const allSystems = [...new Set([...systems, ...headSystems(head)])].sort();
    for (const system of allSystems) {
      const results = this.results(roots, system).map((r) => ({
        ...r,
        newlyFailing: review ? newly.has(r.drvPath) : true,
      }));
      reporter.set(target, buildCheck(system, results, details, limitReport(limits, { system })));
    }
    if (review) {
      runs.setSummary(runId, { rebuildCountBySystem, review: review.summary });
      const links = this.deps.links;
      reporter.set(
        target,
        withCacheLines(
          summaryCheck(review, details, links ? (d) => links.derivation(d) : undefined, heldBack),
          this.cacheLines(runId),
        ),
      );
    } else {
      const failed = roots.filter((r) => ['failed', 'dependency-failed', 'timed-out'].includes(this.state(r) ?? ''));
      reporter.set(
        target,
        withCacheLines(
          completed(
            SUMMARY_CHECK,
            failed.length > 0 ? 'failure' : 'success',
            `${roots.length - failed.length} of ${roots.length} built`,
            failed.length > 0
              ? failed.map((r) => `- ${codeSpan(r.attr)}: ${this.state(r)}`).join('\n')
              : 'Everything built.',
          ),
          this.cacheLines(runId),
        ),
      );
    }
    runs.setRunState(runId, 'done');
    this.deps.logger.info({ runId, repo: run.repo, head: run.head_sha }, 'run done');
    this.deps.onFinished(runs.run(runId)!);
  }

  /**
   * The head's repository checks, as the run may ask for them. What a check may do comes from the base: a pull
   * request's check gets the network only when the base's check of that name allows it too, and an untrusted pull
   * request's never, unless the server allows it for the repository.
   */
  private checkSpecsOf(run: RunRow, head: CommitEvaluation, base: CommitEvaluation | undefined): CheckSpec[] {
    const { checkPolicy } = this.deps;
    return checkSpecs(head, base, {
      networkPermitted: run.untrusted !== 1 || checkPolicy.untrustedNetworkRepos.includes(run.repo),
      timeoutSeconds: checkPolicy.timeoutSeconds,
    });
  }

  /** Asks for the checks the run runs; answers their ids. */
  private requestChecks(run: RunRow, specs: readonly CheckSpec[]): number[] {
    if (specs.length === 0) return [];
    return this.deps.checks.request({
      repo: run.repo,
      commit: run.head_sha,
      cloneUrl: run.head_clone_url,
      checks: specs,
      untrusted: run.untrusted === 1,
      private: this.deps.runs.repository(run.repo)?.private !== 0,
      rerunFailed: run.rebuild_failed === 1,
    });
  }

  /** A commit's evaluation, from the database when this coordinator evaluated it before. */
  private async evaluation(repo: string, url: string, sha: string, fetch: FetchOptions): Promise<CommitEvaluation> {
    const known = this.deps.evaluations.load(repo, sha);
    if (known) return known;
    const e = await evaluateCommit({
      mirrors: this.deps.mirrors,
      dataDir: this.deps.dataDir,
      repo: url,
      rev: sha,
      fetch,
      environment: this.deps.evalEnvironment(),
      policy: this.deps.evalPolicy(repo),
    });
    await this.deps.evaluations.save(repo, e);
    return e;
  }

  /** What a run builds (see `reviewRoots`): the commands of the run and its commit titles name attributes too. */
  private rootsOf(
    run: RunRow,
    head: CommitEvaluation,
    diffs: StoredJobDiff[] | undefined,
    titled: readonly string[],
    rules: BuildRules | undefined,
  ): ReviewPlan {
    const named = [...(JSON.parse(run.extra_attrs) as string[]), ...titled];
    return reviewRoots({ head, diffs, named, builds: this.deps.store, ...(rules ? { rules } : {}) });
  }

  /** The build rules of a run with a base: the base commit's, and the files the change touches when they matter. */
  private buildRules(run: RunRow, fetch: FetchOptions, fork: boolean): Promise<BuildRules> {
    return readBuildRules(this.deps.mirrors, {
      baseUrl: run.base_clone_url,
      headUrl: run.head_clone_url,
      base: run.base_sha!,
      head: run.head_sha,
      serverMaxRebuildCount: this.deps.maxRebuildCount ?? 0,
      baseFetch: fetch,
      headFetch: fork ? { ...fetch, objectsFrom: run.base_clone_url } : fetch,
    });
  }

  /** A derivation's output paths when it was built (or substituted); undefined otherwise. */
  private builtOutputs(drvPath: string): string[] | undefined {
    const state = this.deps.store.derivation(drvPath)?.state;
    if (state === undefined || !SUCCESS_STATES.has(state)) return undefined;
    return this.deps.store.outputsOf(drvPath).map((o) => o.path);
  }

  private cacheLines(runId: number): string[] {
    return pushSummaryLines(this.deps.cachePushes?.runPushes(runId) ?? []);
  }

  private state(r: RunRoot): RootResult['state'] {
    return this.deps.store.derivation(r.drvPath)?.state;
  }

  private results(roots: readonly RunRoot[], system: string): RootResult[] {
    return roots
      .filter((r) => r.side === 'head' && r.system === system)
      .map((r) => ({ attr: r.attr, drvPath: r.drvPath, state: this.state(r), newlyFailing: false }));
  }

  private stillOpen(runId: number): boolean {
    if (this.stopped) return false;
    const run = this.deps.runs.run(runId);
    return run !== undefined && OPEN_RUN_STATES.has(run.state);
  }

  private fail(runId: number, err: Error): void {
    if (this.stopped) return;
    const run = this.deps.runs.run(runId);
    this.deps.logger.warn({ runId, err: err.message }, 'run failed');
    if (!run || !OPEN_RUN_STATES.has(run.state)) return;
    this.deps.runs.setRunState(runId, 'failed', err.message);
    const target = targetOf(run);
    // The error may quote the pull request (the attribute path its config names): shown as code, never as markdown.
    const message = `eka-ci could not evaluate this commit:\n\n${codeBlock(err.message.slice(0, 10_000))}`;
    this.deps.reporter.set(target, completed(EVALUATION_CHECK, 'failure', 'Evaluation failed', message));
    this.deps.reporter.set(target, completed(SUMMARY_CHECK, 'failure', 'Evaluation failed', message));
  }
}

/** An in-progress check run with the run's ETA in its title and summary. */
function withEta(spec: CheckRunSpec, eta: RunEta | null): CheckRunSpec {
  if (!eta) return spec;
  return { ...spec, title: `${spec.title} (${etaShort(eta)})`, summary: `${spec.summary}\n\n${etaText(eta)}` };
}

/** A summary check run with the run's cache pushes (pushed, refused, failed) appended. */
function withCacheLines(spec: CheckRunSpec, lines: readonly string[]): CheckRunSpec {
  if (lines.length === 0) return spec;
  return { ...spec, summary: `${spec.summary}\n\n**Caches**\n\n${lines.join('\n')}` };
}

export function targetOf(run: Pick<RunRow, 'installation_id' | 'repo' | 'head_sha'>): CheckTarget {
  const [owner = '', repo = ''] = run.repo.split('/');
  return { installationId: run.installation_id, owner, repo, headSha: run.head_sha };
}

/** Systems the head evaluation has derivations for: each gets a build check, neutral when nothing was built. */
function headSystems(head: CommitEvaluation): string[] {
  return [...new Set(head.jobs.flatMap((j) => j.attrs.flatMap((a) => (a.system && !a.skipped ? [a.system] : []))))];
}
