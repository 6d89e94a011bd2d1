import type { Logger } from '../../common/logging.js';
import type { AuditLog } from '../audit-log.js';
import type { AppRegistry, Served } from './app-registry.js';
import { needsApproval } from './approval.js';
import { EVALUATION_CHECK, SUMMARY_CHECK, completed, queued } from './check-report.js';
import type { CheckRunSpec, CheckTarget } from './check-runs.js';
import type { CommandRunner } from './command-runner.js';
import type { Delivery } from './delivery-queue.js';
import {
  type PullRequestPayload,
  checkRunEvent,
  checkSuiteEvent,
  installationEvent,
  installationRepositoriesEvent,
  issueCommentEvent,
  mergeGroupEvent,
  parsePayload,
  pullRequestEvent,
  pullRequestReviewEvent,
  pushEvent,
} from './payloads.js';
import type { RunPipeline } from './run-pipeline.js';
import { OPEN_RUN_STATES, type NewRun, type RunStore } from './run-store.js';

export interface EventSettings {
  buildDraftPullRequests: boolean;
  requireApproval: boolean;
  approvedUsers: readonly string[];
}

export interface EventDeps {
  runs: RunStore;
  apps: AppRegistry;
  pipeline: RunPipeline;
  reporter: { set(target: CheckTarget, spec: CheckRunSpec, options?: { rerun?: boolean }): void };
  commands: CommandRunner;
  audit: AuditLog;
  settings: EventSettings;
  /** Whether `login` may push to `repo` (GitHub's collaborator permission): their code is trusted. */
  writeAccess(served: Served, repo: string, login: string): Promise<boolean>;
  logger: Logger;
}

const ZERO_SHA = /^0+$/;
const PR_ACTIONS = new Set(['opened', 'synchronize', 'reopened', 'ready_for_review']);

/**
 * Turns webhook deliveries into runs and answers: pull requests, pushes to the default branch, merge groups,
 * re-run requests, comment commands, reviews and installations. Each handler is idempotent over its delivery
 * (a delivery retried after a crash does no harm twice): runs are keyed by commit and superseded, not duplicated.
 */
export class GitHubEvents {
  constructor(private readonly deps: EventDeps) {}

  async handle(d: Pick<Delivery, 'event' | 'payload' | 'deliveryId'>): Promise<void> {
    // Repository and organisation webhooks (configured by hand, not by an app) carry no installation: eka-ci
    // acts only as an app, with an installation's token, so it has nothing to do for them.
    const installation = (d.payload as { installation?: unknown } | null)?.installation;
    if (installation === undefined && !d.event.startsWith('installation')) {
      this.deps.logger.info({ event: d.event, delivery: d.deliveryId }, 'webhook without an installation ignored');
      return;
    }
    switch (d.event) {
      case 'pull_request':
        return this.pullRequest(parsePayload(pullRequestEvent, d.event, d.payload));
      case 'push':
        return this.push(parsePayload(pushEvent, d.event, d.payload));
      case 'merge_group':
        return this.mergeGroup(parsePayload(mergeGroupEvent, d.event, d.payload));
      case 'check_run': {
        const p = parsePayload(checkRunEvent, d.event, d.payload);
        const rebuild = p.action === 'requested_action' && p.requested_action?.identifier === 'rebuild-failed';
        if (p.action === 'rerequested' || rebuild) {
          await this.rerun(
            p.repository.full_name,
            p.check_run.head_sha,
            d.event,
            `github:${p.sender?.login ?? 'unknown'}`,
          );
        }
        return;
      }
      case 'check_suite': {
        const p = parsePayload(checkSuiteEvent, d.event, d.payload);
        if (p.action === 'rerequested') {
          await this.rerun(
            p.repository.full_name,
            p.check_suite.head_sha,
            d.event,
            `github:${p.sender?.login ?? 'unknown'}`,
          );
        }
        return;
      }
      case 'issue_comment':
        return this.comment(parsePayload(issueCommentEvent, d.event, d.payload));
      case 'pull_request_review': {
        const p = parsePayload(pullRequestReviewEvent, d.event, d.payload);
        if (p.action === 'submitted')
          await this.deps.commands.evaluateMerge(p.repository.full_name, p.pull_request.number);
        return;
      }
      case 'installation':
        return this.installation(parsePayload(installationEvent, d.event, d.payload));
      case 'installation_repositories': {
        const p = parsePayload(installationRepositoriesEvent, d.event, d.payload);
        for (const r of p.repositories_removed) this.deps.runs.removeRepository(r.full_name);
        this.deps.apps.forget();
        return;
      }
      default:
        this.deps.logger.debug({ event: d.event, delivery: d.deliveryId }, 'webhook event not handled');
    }
  }

  private async served(installationId: number, repo: string, branch?: string): Promise<Served | undefined> {
    const served = await this.deps.apps.served(installationId, repo);
    if (!served) {
      this.deps.logger.warn({ installationId, repo }, 'no configured GitHub App serves this installation');
      return undefined;
    }
    if (!this.deps.apps.allowed(served, repo, branch)) {
      this.deps.logger.info({ repo, branch, app: served.app.id }, 'repository or branch not allowed for this app');
      return undefined;
    }
    return served;
  }

  private async pullRequest(p: ReturnType<typeof pullRequestEvent.parse>): Promise<void> {
    const repo = p.repository.full_name;
    const pr = p.pull_request;
    this.rememberRepository(p.installation.id, p.repository);
    this.deps.runs.upsertPullRequest({
      repo,
      number: pr.number,
      state: p.action === 'closed' ? 'closed' : 'open',
      head_sha: pr.head.sha,
      head_clone_url: (pr.head.repo ?? p.repository).clone_url,
      base_sha: pr.base.sha,
      base_ref: pr.base.ref,
      author: pr.user.login,
      author_association: pr.author_association,
      draft: pr.draft ? 1 : 0,
      title: pr.title,
    });
    this.deps.runs.recordHead(repo, pr.number, pr.head.sha, githubTime(pr.updated_at));
    if (p.action === 'closed') {
      for (const run of this.openRuns(repo, pr.number))
        this.deps.pipeline.cancel(run.id, 'the pull request was closed');
      this.deps.runs.setMerge(repo, pr.number, undefined);
      return;
    }
    if (p.action === 'converted_to_draft' && !this.deps.settings.buildDraftPullRequests) {
      for (const run of this.openRuns(repo, pr.number))
        this.deps.pipeline.cancel(run.id, 'the pull request became a draft');
      return;
    }
    if (!PR_ACTIONS.has(p.action)) return;
    if (pr.draft && !this.deps.settings.buildDraftPullRequests) return;
    const served = await this.served(p.installation.id, repo, pr.base.ref);
    if (!served) return;
    await this.startPullRequestRun(served, repo, pr, p.repository.clone_url);
  }

  /** Starts (or, for an outside contributor, parks until approved) the run of a pull request's current head. */
  async startPullRequestRun(
    served: Served,
    repo: string,
    pr: Pick<PullRequestPayload, 'number' | 'head' | 'base' | 'user' | 'author_association'>,
    baseCloneUrl: string,
    extra: { attrs?: readonly string[]; rebuildFailed?: boolean } = {},
  ): Promise<number> {
    const open = this.openRuns(repo, pr.number);
    for (const run of open) {
      if (run.head_sha !== pr.head.sha) this.deps.pipeline.cancel(run.id, `superseded by ${pr.head.sha}`);
    }
    await this.deps.commands.headMoved(repo, pr.number, pr.head.sha);
    // Another event for a head already being handled (`reopened` right after `opened`, an edit of the base):
    // the run in progress answers it. A command asking for more (attributes, rebuilds) starts its own run.
    const same = open.find((r) => r.head_sha === pr.head.sha && r.base_sha === pr.base.sha);
    if (same && !extra.attrs?.length && !extra.rebuildFailed && same.state !== 'awaiting-approval') return same.id;
    const row = this.deps.runs.pullRequest(repo, pr.number);
    const approval = needsApproval(
      { authorAssociation: pr.author_association, author: pr.user.login },
      this.deps.settings,
      // Approval is for the commit that was looked at: a later push from an outside contributor waits again.
      row?.approved_sha === pr.head.sha,
    );
    if (!approval) {
      // Runs parked for approval of this head are answered by the run started now.
      for (const r of open.filter((o) => o.state === 'awaiting-approval' && o.head_sha === pr.head.sha)) {
        this.deps.runs.setRunState(r.id, 'cancelled', 'approved: a new run builds this head');
      }
    } else if (same?.state === 'awaiting-approval') return same.id;
    // Code of someone who cannot push to the repository is built only in Nix's sandbox, approved or not.
    const untrusted = !(await this.deps.writeAccess(served, repo, pr.user.login));
    const run: NewRun = {
      repo,
      installationId: served.installationId,
      kind: 'pull_request',
      untrusted,
      branch: pr.base.ref,
      prNumber: pr.number,
      baseSha: pr.base.sha,
      headSha: pr.head.sha,
      baseCloneUrl,
      headCloneUrl: (pr.head.repo ?? pr.base.repo).clone_url,
      extraAttrs: extra.attrs ?? [],
      rebuildFailed: extra.rebuildFailed ?? false,
      state: approval ? 'awaiting-approval' : 'queued',
    };
    const [owner = '', name = ''] = repo.split('/');
    const target = { installationId: served.installationId, owner, repo: name, headSha: pr.head.sha };
    if (approval) {
      const runId = this.deps.runs.createRun(run);
      const why = `@${pr.user.login} is not a member or collaborator of ${repo}: a maintainer comments \`@eka-ci approve\` to build this pull request.`;
      for (const check of [EVALUATION_CHECK, SUMMARY_CHECK]) {
        this.deps.reporter.set(target, completed(check, 'action_required', 'Waiting for approval', why));
      }
      return runId;
    }
    // The first check run goes out before anything slow: the author sees eka-ci picked the change up. The rest
    // (commit titles, clone, evaluation) happens in the run, so this delivery is handled in a moment.
    this.deps.reporter.set(target, queued(EVALUATION_CHECK, 'Queued'), { rerun: true });
    const runId = this.deps.runs.createRun(run);
    this.deps.pipeline.start(runId);
    return runId;
  }

  private async push(p: ReturnType<typeof pushEvent.parse>): Promise<void> {
    const repo = p.repository.full_name;
    this.rememberRepository(p.installation.id, p.repository);
    const branch = p.ref.replace(/^refs\/heads\//, '');
    if (p.deleted || ZERO_SHA.test(p.after) || branch !== p.repository.default_branch) return;
    const served = await this.served(p.installation.id, repo, branch);
    if (!served) return;
    // The default branch's history is what pull requests compare against: build all of it.
    for (const run of this.deps.runs.runsOf({ repo, states: [...OPEN_RUN_STATES] })) {
      if (run.kind === 'push') this.deps.pipeline.cancel(run.id, `superseded by ${p.after}`);
    }
    const runId = this.deps.runs.createRun({
      repo,
      installationId: served.installationId,
      kind: 'push',
      branch,
      headSha: p.after,
      baseCloneUrl: p.repository.clone_url,
      headCloneUrl: p.repository.clone_url,
    });
    this.deps.pipeline.start(runId);
  }

  private async mergeGroup(p: ReturnType<typeof mergeGroupEvent.parse>): Promise<void> {
    const repo = p.repository.full_name;
    const g = p.merge_group;
    if (p.action === 'destroyed') {
      for (const run of this.deps.runs.runsOf({ repo, headSha: g.head_sha, states: [...OPEN_RUN_STATES] })) {
        this.deps.pipeline.cancel(run.id, 'the merge group was destroyed');
      }
      return;
    }
    if (p.action !== 'checks_requested') return;
    const served = await this.served(p.installation.id, repo, g.base_ref.replace(/^refs\/heads\//, ''));
    if (!served) return;
    const runId = this.deps.runs.createRun({
      repo,
      installationId: served.installationId,
      kind: 'merge_group',
      branch: g.base_ref.replace(/^refs\/heads\//, ''),
      baseSha: g.base_sha,
      headSha: g.head_sha,
      baseCloneUrl: p.repository.clone_url,
      headCloneUrl: p.repository.clone_url,
    });
    this.deps.pipeline.start(runId);
  }

  /**
   * "Re-run" on a check run or suite, or its "Rebuild failed" button (on GitHub, or the web UI's): the commit's
   * newest run, again. A pull request's head goes through the same door as a new push (approval, trust), so a re-run
   * never builds code that still waits for approval, whoever clicked it. False when there is nothing to run again (no
   * run of the commit, or no longer the head of an open pull request).
   */
  async rerun(repo: string, headSha: string, kind: string, actor: string): Promise<boolean> {
    const last = this.deps.runs.latestRunOf(repo, headSha);
    if (!last) return false;
    if (last.kind === 'pull_request' && last.pr_number !== null) {
      const pr = this.deps.runs.pullRequest(repo, last.pr_number);
      // Only the current head of an open pull request is built again.
      if (!pr || pr.state !== 'open' || pr.head_sha !== headSha) return false;
      const served = await this.served(last.installation_id, repo, pr.base_ref);
      if (!served) return false;
      this.deps.audit.record(actor, 'rebuild-failed', { repo, headSha, via: kind });
      await this.startPullRequestRun(
        served,
        repo,
        {
          number: pr.number,
          head: { sha: pr.head_sha, ref: '', repo: { full_name: repo, clone_url: pr.head_clone_url } },
          base: { sha: pr.base_sha, ref: pr.base_ref, repo: { full_name: repo, clone_url: last.base_clone_url } },
          user: { login: pr.author },
          author_association: pr.author_association,
        },
        last.base_clone_url,
        { rebuildFailed: true, attrs: JSON.parse(last.extra_attrs) as string[] },
      );
      return true;
    }
    if (OPEN_RUN_STATES.has(last.state)) this.deps.pipeline.cancel(last.id, 'a re-run was requested');
    const runId = this.deps.runs.createRun({
      repo,
      installationId: last.installation_id,
      kind: last.kind,
      ...(last.pr_number !== null ? { prNumber: last.pr_number } : {}),
      ...(last.base_sha !== null ? { baseSha: last.base_sha } : {}),
      headSha,
      baseCloneUrl: last.base_clone_url,
      headCloneUrl: last.head_clone_url,
      extraAttrs: JSON.parse(last.extra_attrs) as string[],
      rebuildFailed: true,
      ...(last.branch !== null ? { branch: last.branch } : {}),
    });
    this.deps.audit.record(actor, 'rebuild-failed', { repo, headSha, runId, via: kind });
    this.deps.pipeline.start(runId);
    return true;
  }

  private async comment(p: ReturnType<typeof issueCommentEvent.parse>): Promise<void> {
    if (p.action !== 'created' || p.issue.pull_request === undefined || p.comment.user.type === 'Bot') return;
    const served = await this.served(p.installation.id, p.repository.full_name);
    if (!served) return;
    this.rememberRepository(p.installation.id, p.repository);
    await this.deps.commands.run(served, p.repository.full_name, p.issue.number, {
      id: p.comment.id,
      body: p.comment.body ?? '',
      author: p.comment.user.login,
      createdAt: githubTime(p.comment.created_at),
    });
  }

  private async installation(p: ReturnType<typeof installationEvent.parse>): Promise<void> {
    const id = p.installation.id;
    const account = p.installation.account?.login ?? '';
    if (p.action === 'deleted') this.deps.runs.deleteInstallation(id);
    else if (p.action === 'suspend' || p.action === 'unsuspend') {
      const known = this.deps.runs.installation(id);
      if (known) this.deps.runs.upsertInstallation(id, known.app, account, p.action === 'suspend');
    } else await this.deps.apps.remember(id, account, undefined);
    this.deps.audit.record(`github:${account}`, `installation-${p.action}`, { installationId: id });
  }

  private rememberRepository(
    installationId: number,
    r: { full_name: string; clone_url: string; default_branch?: string | undefined; private?: boolean | undefined },
  ): void {
    this.deps.runs.upsertRepository({
      fullName: r.full_name,
      installationId,
      cloneUrl: r.clone_url,
      defaultBranch: r.default_branch ?? 'main',
      private: r.private ?? false,
    });
  }

  private openRuns(repo: string, prNumber: number) {
    return this.deps.runs.runsOf({ repo, prNumber, states: [...OPEN_RUN_STATES, 'awaiting-approval'] });
  }
}

/** A GitHub timestamp in ms; when a payload lacks it, the moment it is handled (later, so never more permissive). */
function githubTime(iso: string | undefined): number {
  const t = iso === undefined ? NaN : Date.parse(iso);
  return Number.isFinite(t) ? t : Date.now();
}
