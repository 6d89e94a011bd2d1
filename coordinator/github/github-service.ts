import type { CachePushService } from '../caches/push-service.js';
import { LRUCache } from 'lru-cache';
import type Router from '@koa/router';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { AuditLog } from '../audit-log.js';
import type { CoordinatorOptions } from '../config.js';
import type { Db } from '../db/database.js';
import type { EvalEnvironment } from '../eval/eval-environment.js';
import { policyFor } from '../eval/eval-options.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import type { GitMirrors } from '../git/git-mirrors.js';
import type { ReviewService } from '../review/review-service.js';
import type { CheckManager } from '../checks/check-manager.js';
import type { BuildManager } from '../scheduler/build-manager.js';
import type { BuildStore } from '../scheduler/build-store.js';
import { storePathHash } from '../../common/nix/store-path.js';
import type { GitHubAppClientOptions } from './app-client.js';
import { AppRegistry } from './app-registry.js';
import { CheckRunReporter } from './check-runs.js';
import { CommandRunner } from './command-runner.js';
import { RepoApi, WRITE_PERMISSIONS } from './repo-api.js';
import { pullCommitsResponse, readResponse } from './responses.js';
import { unbuiltChanges } from '../review/classify.js';
import { DeliveryQueue } from './delivery-queue.js';
import { GitHubMetricsSink } from './github-metrics.js';
import { GitHubEvents } from './github-events.js';
import { RunPipeline, type RunLinks } from './run-pipeline.js';
import { type RunRow, RunStore } from './run-store.js';
import { webhookReceiver } from './webhook-receiver.js';

// GitHub's largest page; commit titles beyond it belong to mass changes, which the rebuild diff covers anyway.
const COMMITS_PER_PAGE = 100;

// A permission GitHub gave is trusted this long: a writer demoted sees their buttons go within minutes.
const PERMISSION_TTL_MS = 5 * 60_000;

export interface GitHubServiceDeps {
  options: CoordinatorOptions;
  db: Db;
  audit: AuditLog;
  evaluations: EvaluationStore;
  reviews: ReviewService;
  manager: BuildManager;
  store: BuildStore;
  checks: CheckManager;
  /** The operator's binary caches: which run roots go where, and how it went. */
  cachePushes?: CachePushService;
  mirrors: GitMirrors;
  /** The coordinator's public base URL (for details links), known once its HTTP port is bound. */
  publicUrl: () => string;
  /** Where repository code is evaluated; open once the coordinator runs. */
  evalEnvironment: () => EvalEnvironment;
  logger: Logger;
  /** A run was created or changed state (the coordinator's event stream). */
  onRun?: (run: RunRow) => void;
  /** Tests shrink the client's waits. */
  clientOptions?: Partial<GitHubAppClientOptions>;
}

/**
 * The coordinator as a GitHub App: the webhook endpoint and its durable queue, the event handlers, runs, comment
 * commands and the check-run reporter. Lifecycle: `created` → `running` (start: resumes unsent check runs,
 * unhandled deliveries and unfinished runs) → `stopped` (stopGracefully lets handlers and sends finish; stopNow
 * drops them, to be resumed by the next start).
 */
export class GitHubService {
  state: 'created' | 'running' | 'stopped' = 'created';
  readonly runs: RunStore;
  readonly reporter: CheckRunReporter;
  readonly pipeline: RunPipeline;
  readonly events: GitHubEvents;
  readonly commands: CommandRunner;
  readonly queue: DeliveryQueue;
  private readonly apps: AppRegistry;
  private readonly permissions = new LRUCache<string, string>({ max: 10_000, ttl: PERMISSION_TTL_MS });
  /** Registered with the coordinator's Prometheus registry once it exists (see `registerMetrics`). */
  readonly metrics = new GitHubMetricsSink();

  constructor(private readonly deps: GitHubServiceDeps) {
    const { options, logger } = deps;
    const log = logger.child({ component: 'github' });
    this.runs = new RunStore(deps.db, deps.onRun);
    this.apps = new AppRegistry(options.githubApps, this.runs, log, { metrics: this.metrics, ...deps.clientOptions });
    this.reporter = new CheckRunReporter(
      deps.db,
      { octokit: (id) => this.clientOf(id).octokit(id) },
      { minIntervalMs: options.github.checkRunUpdateIntervalMs, logger: log },
    );
    const links: RunLinks = {
      // The web UI's review page (web/src/pages/pull.ts), where a reviewer lands from a check run's "Details".
      review: (repo, base, head) =>
        `${deps.publicUrl()}/reviews?repo=${encodeURIComponent(repo)}&base=${base}&head=${head}`,
      derivation: (drv) => `${deps.publicUrl()}/builds/${storePathHash(drv)}`,
    };
    this.pipeline = new RunPipeline({
      runs: this.runs,
      reporter: this.reporter,
      cloneAuth: (id) => this.clientOf(id).cloneAuth(id),
      mirrors: deps.mirrors,
      dataDir: options.dataDir,
      evalEnvironment: deps.evalEnvironment,
      evalPolicy: (repo) => policyFor(options.evaluation, repo),
      evaluations: deps.evaluations,
      keepCommits: options.evaluation.keepCommits,
      reviews: deps.reviews,
      manager: deps.manager,
      store: deps.store,
      checks: deps.checks,
      ...(deps.cachePushes ? { cachePushes: deps.cachePushes } : {}),
      checkPolicy: {
        timeoutSeconds: options.checks.timeoutSeconds,
        untrustedNetworkRepos: options.security.untrustedCheckNetworkRepos,
      },
      links,
      logger: log,
      commitTitles: (run) => this.commitTitles(run),
      maxRebuildCount: options.rebuild.maxRebuildCount,
      onFinished: (run) => {
        if (run.pr_number === null) return;
        this.commands.evaluateMerge(run.repo, run.pr_number).catch((err: Error) => {
          log.warn({ err: err.message, repo: run.repo, pr: run.pr_number }, 'merge evaluation failed');
        });
      },
    });
    this.commands = new CommandRunner({
      runs: this.runs,
      apps: this.apps,
      evaluations: deps.evaluations,
      checkStates: (owner, repo, sha) => this.reporter.states(owner, repo, sha),
      startRun: (served, repo, pr, baseCloneUrl, extra) =>
        this.events.startPullRequestRun(served, repo, pr, baseCloneUrl, extra),
      unbuilt: async (repo, base, head) => {
        const review = await deps.reviews.reviewOf(repo, base, head, undefined, { recordedOnly: true });
        return review && unbuiltChanges(review);
      },
      audit: deps.audit,
      logger: log,
    });
    this.events = new GitHubEvents({
      runs: this.runs,
      apps: this.apps,
      pipeline: this.pipeline,
      reporter: this.reporter,
      commands: this.commands,
      audit: deps.audit,
      settings: {
        buildDraftPullRequests: options.github.buildDraftPullRequests,
        requireApproval: options.security.requireApproval,
        approvedUsers: options.security.approvedUsers,
      },
      writeAccess: async (served, repo, login) =>
        WRITE_PERMISSIONS.has(await new RepoApi(await this.apps.octokit(served), repo).permission(login)),
      logger: log,
    });
    this.queue = new DeliveryQueue(deps.db, { logger: log, observe: (o) => this.metrics.observe(o) });
  }

  /**
   * A GitHub user's permission on a repository, asked through the App that serves it (and remembered for a few
   * minutes: a page of buttons asks often); undefined when no App serves the repository or GitHub cannot say.
   */
  async permissionOf(repo: string, login: string): Promise<string | undefined> {
    const key = `${repo}\u0000${login.toLowerCase()}`;
    const known = this.permissions.get(key);
    if (known !== undefined) return known;
    const r = this.runs.repository(repo);
    const served = r ? await this.apps.served(r.installation_id, repo) : undefined;
    if (!served) return undefined;
    try {
      const permission = await new RepoApi(await this.apps.octokit(served), repo).permission(login);
      this.permissions.set(key, permission);
      return permission;
    } catch (err) {
      this.deps.logger.warn({ repo, login, err: (err as Error).message }, 'cannot ask GitHub for a permission');
      return undefined;
    }
  }

  /** `POST /github/webhook`, for the coordinator's HTTP server. */
  router(): Router {
    return webhookReceiver({
      queue: this.queue,
      webhookSecret: this.deps.options.security.webhookSecret,
      allowInsecureWebhooks: this.deps.options.security.allowInsecureWebhooks,
      logger: this.deps.logger.child({ component: 'github-webhook' }),
    });
  }

  start(): void {
    if (this.state !== 'created') throw new IllegalStateError(`cannot start a GitHub service that is ${this.state}`);
    this.state = 'running';
    this.reporter.start();
    this.queue.start((d) => this.events.handle(d));
    // Runs interrupted by a restart start over; cached evaluations and finished builds make that cheap.
    for (const run of this.runs.openRuns()) this.pipeline.start(run.id);
  }

  async stopGracefully(): Promise<void> {
    if (this.state !== 'running') return this.stopNow();
    await this.queue.stopGracefully();
    this.pipeline.stop();
    await this.reporter.stopGracefully();
    this.state = 'stopped';
  }

  stopNow(): void {
    if (this.state === 'stopped') return;
    this.queue.stopNow();
    this.pipeline.stop();
    this.reporter.stopNow();
    this.state = 'stopped';
  }

  /** First lines of a pull request's commit messages (the first page: a longer PR is a mass change). */
  private async commitTitles(run: RunRow): Promise<string[]> {
    if (run.pr_number === null) return [];
    const [owner = '', repo = ''] = run.repo.split('/');
    const octokit = await this.clientOf(run.installation_id).octokit(run.installation_id);
    const op = 'GET /repos/{owner}/{repo}/pulls/{pull_number}/commits';
    const response = await octokit.request(op, { owner, repo, pull_number: run.pr_number, per_page: COMMITS_PER_PAGE });
    return readResponse(pullCommitsResponse, op, response).map((c) => c.commit.message.split('\n')[0] ?? '');
  }

  private installationOf(repo: string): number {
    const row = this.runs.repository(repo);
    if (!row) throw new IllegalStateError(`no installation is known for ${repo}`);
    return row.installation_id;
  }

  private clientOf(installationId: number) {
    const client = this.apps.clientOf(installationId);
    if (!client) throw new IllegalStateError('no GitHub App is configured');
    return client;
  }
}
