import type { Logger } from '../../common/logging.js';
import type { AuditLog } from '../audit-log.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import type { AppRegistry, Served } from './app-registry.js';
import { type Actor, type RepoPermission, authorize } from './authorization.js';
import { isEkaciCheck } from './check-report.js';
import type { CheckConclusion, CheckStatus } from './check-runs.js';
import { type MergeMethod, type PrCommand, parseCommands } from './commands.js';
import { GitHubApiError } from './errors.js';
import { decideMerge } from './merge-policy.js';
import { changedAttrs } from './change-maintainers.js';
import type { PullRequestPayload } from './payloads.js';
import type { RunStore } from './run-store.js';

export type PullRequestRef = Pick<PullRequestPayload, 'number' | 'head' | 'base' | 'user' | 'author_association'>;

export interface CommandDeps {
  runs: RunStore;
  apps: AppRegistry;
  evaluations: EvaluationStore;
  checkStates(
    owner: string,
    repo: string,
    headSha: string,
  ): Array<{ name: string; status: CheckStatus; conclusion: CheckConclusion | null }>;
  /** Starts a run of the pull request's head (with attributes to build by name, or failed ones rebuilt). */
  startRun(
    served: Served,
    repo: string,
    pr: PullRequestRef,
    baseCloneUrl: string,
    extra: { attrs?: readonly string[]; rebuildFailed?: boolean },
  ): Promise<number>;
  /** The GitHub handles maintaining each changed attribute, read from the head commit (see change-maintainers.ts). */
  maintainers(pr: PullRequestRef, changed: ReadonlyMap<string, readonly string[]>): Promise<Map<string, string[]>>;
  audit: AuditLog;
  logger: Logger;
  botName?: string;
}

// GitHub's answer to a merge that branch protection or a conflict blocks for now ("Method Not Allowed").
const NOT_MERGEABLE_YET = 405;

const PERMISSIONS: ReadonlySet<string> = new Set(['admin', 'maintain', 'write', 'triage', 'read', 'none']);

/**
 * Pull-request comment commands (`@eka-ci build …`, `rebuild`, `merge`, `merge cancel`, `approve`), and the
 * pending `@eka-ci merge` they leave behind: it merges once every eka-ci check of the head is green, and is
 * cancelled when the head moves. Each command is answered with a reaction: +1 accepted, -1 refused (with a reply
 * saying why), rocket when merged.
 */
export class CommandRunner {
  constructor(private readonly deps: CommandDeps) {}

  async run(
    served: Served,
    repo: string,
    number: number,
    comment: { id: number; body: string; author: string },
  ): Promise<void> {
    const commands = parseCommands(comment.body, this.deps.botName);
    if (commands.length === 0) return;
    const api = new RepoApi(await this.deps.apps.octokit(served), repo);
    const pr = await api.pullRequest(number);
    this.deps.runs.upsertPullRequest({
      repo,
      number,
      state: pr.state === 'closed' ? 'closed' : 'open',
      head_sha: pr.head.sha,
      head_clone_url: (pr.head.repo ?? pr.base.repo).clone_url,
      base_sha: pr.base.sha,
      base_ref: pr.base.ref,
      author: pr.user.login,
      author_association: pr.author_association,
      draft: pr.draft ? 1 : 0,
    });
    // Commands act on the pull request's base branch: one the app may not build is not served at all.
    if (!this.deps.apps.allowed(served, repo, pr.base.ref)) return;
    const actor: Actor = { login: comment.author, permission: await api.permission(comment.author) };
    for (const command of commands) {
      const refusal = await this.refusal(command, actor, repo, pr);
      if (refusal) {
        await api.react(comment.id, '-1');
        await api.reply(number, `> ${command.line}\n\n@${comment.author}: ${refusal}`);
        continue;
      }
      await this.execute(command as Exclude<PrCommand, { kind: 'invalid' }>, served, api, repo, pr, comment);
    }
  }

  private async refusal(
    command: PrCommand,
    actor: Actor,
    repo: string,
    pr: PullRequestRef,
  ): Promise<string | undefined> {
    if (command.kind === 'invalid') return command.reason;
    // Only a merge by someone without write access needs the maintainers (a checkout and an evaluation).
    const needsMaintainers = command.kind === 'merge' || command.kind === 'merge-cancel';
    const writer = ['admin', 'maintain', 'write'].includes(actor.permission);
    const maintainersOfChanged =
      needsMaintainers && !writer ? await this.maintainersOfChanged(repo, pr) : new Map<string, string[]>();
    const decision = authorize(command, actor, { maintainersOfChanged });
    if (!decision.allowed) return decision.reason;
    if (command.kind === 'build') {
      const head = this.deps.evaluations.load(repo, pr.head.sha);
      const known = new Set(head?.jobs.flatMap((j) => j.attrs.map((a) => a.attr)) ?? []);
      const unknown = head ? command.attrs.filter((a) => !known.has(a)) : [];
      if (unknown.length > 0) return `no attribute ${unknown.map((a) => `\`${a}\``).join(', ')} in this pull request.`;
    }
    return undefined;
  }

  private async execute(
    command: Exclude<PrCommand, { kind: 'invalid' }>,
    served: Served,
    api: RepoApi,
    repo: string,
    pr: PullRequestRef,
    comment: { id: number; author: string },
  ): Promise<void> {
    const actor = `github:${comment.author}`;
    const baseCloneUrl = pr.base.repo.clone_url;
    switch (command.kind) {
      case 'build':
        await this.deps.startRun(served, repo, pr, baseCloneUrl, { attrs: command.attrs });
        break;
      case 'rebuild':
        this.deps.audit.record(actor, 'rebuild-failed', { repo, pr: pr.number, head: pr.head.sha });
        await this.deps.startRun(served, repo, pr, baseCloneUrl, { rebuildFailed: true });
        break;
      case 'approve':
        this.deps.runs.setApproval(repo, pr.number, comment.author, pr.head.sha);
        this.deps.audit.record(actor, 'approve', { repo, pr: pr.number, head: pr.head.sha });
        await this.deps.startRun(served, repo, pr, baseCloneUrl, {});
        break;
      case 'merge':
        this.deps.runs.setMerge(repo, pr.number, {
          method: command.method,
          forSha: pr.head.sha,
          by: comment.author,
          commentId: comment.id,
        });
        this.deps.audit.record(actor, 'merge-requested', {
          repo,
          pr: pr.number,
          head: pr.head.sha,
          method: command.method,
        });
        break;
      case 'merge-cancel':
        this.deps.runs.setMerge(repo, pr.number, undefined);
        this.deps.audit.record(actor, 'merge-cancelled', { repo, pr: pr.number });
        break;
    }
    await api.react(comment.id, '+1');
    if (command.kind === 'merge') await this.evaluateMerge(repo, pr.number, served);
  }

  /** A push to a pull request with a pending merge cancels the merge, and says so. */
  async headMoved(repo: string, number: number, headSha: string): Promise<void> {
    const row = this.deps.runs.pullRequest(repo, number);
    if (!row?.merge_for_sha || row.merge_for_sha === headSha) return;
    this.deps.runs.setMerge(repo, number, undefined);
    const served = await this.servedFor(repo);
    if (!served) return;
    const api = new RepoApi(await this.deps.apps.octokit(served), repo);
    await api.reply(
      number,
      `@${row.merge_by}: merge cancelled: the head moved from ${row.merge_for_sha} to ${headSha} after the merge command. Comment \`@eka-ci merge\` again to merge the new head.`,
    );
  }

  /** Merges a pull request with a pending `@eka-ci merge` once its checks allow; refuses or waits otherwise. */
  async evaluateMerge(repo: string, number: number, known?: Served): Promise<void> {
    const row = this.deps.runs.pullRequest(repo, number);
    if (!row?.merge_method || !row.merge_for_sha || row.state !== 'open') return;
    const [owner = '', name = ''] = repo.split('/');
    const checks = this.deps.checkStates(owner, name, row.head_sha).filter((c) => isEkaciCheck(c.name));
    const decision = decideMerge(
      { requestedFor: row.merge_for_sha, method: row.merge_method as MergeMethod },
      row.head_sha,
      checks,
    );
    if (decision.action === 'wait') return;
    const served = known ?? (await this.servedFor(repo));
    if (!served) return;
    const api = new RepoApi(await this.deps.apps.octokit(served), repo);
    if (decision.action !== 'merge') {
      this.deps.runs.setMerge(repo, number, undefined);
      await api.reply(number, `@${row.merge_by}: not merging: ${decision.reason}.`);
      return;
    }
    try {
      await api.merge(number, row.head_sha, decision.method);
      this.deps.runs.setMerge(repo, number, undefined);
      this.deps.audit.record(`github:${row.merge_by}`, 'merged', { repo, pr: number, head: row.head_sha });
      if (row.merge_comment_id !== null) await api.react(row.merge_comment_id, 'rocket');
    } catch (err) {
      if (!(err instanceof GitHubApiError)) throw err;
      if (err.status === NOT_MERGEABLE_YET) {
        // Branch protection (a required review, another required check) or a conflict: the merge stays pending
        // and is tried again when a review is submitted or a run of this head finishes. Said once.
        if (row.merge_waiting !== 1) {
          this.deps.runs.setMergeWaiting(repo, number);
          await api.reply(
            number,
            `@${row.merge_by}: eka-ci's checks are green, but GitHub will not merge yet (${err.githubMessage}); the merge stays pending until a review or a new result changes that, or \`@eka-ci merge cancel\`.`,
          );
        }
        return;
      }
      this.deps.runs.setMerge(repo, number, undefined);
      await api.reply(number, `@${row.merge_by}: GitHub refused the merge: ${err.githubMessage}`);
    }
  }

  private async servedFor(repo: string): Promise<Served | undefined> {
    const r = this.deps.runs.repository(repo);
    return r ? this.deps.apps.served(r.installation_id, repo) : undefined;
  }

  /** Maintainers (GitHub handles from `meta.maintainers`) of the attributes the pull request changes or adds. */
  private async maintainersOfChanged(repo: string, pr: PullRequestRef): Promise<Map<string, string[]>> {
    const base = this.deps.evaluations.load(repo, pr.base.sha);
    const head = this.deps.evaluations.load(repo, pr.head.sha);
    if (!base || !head) return new Map();
    return this.deps.maintainers(pr, changedAttrs(base, head));
  }
}

/** The few REST calls commands make, on one repository. */
class RepoApi {
  private readonly owner: string;
  private readonly repo: string;

  constructor(
    private readonly octokit: Awaited<ReturnType<AppRegistry['octokit']>>,
    fullName: string,
  ) {
    [this.owner = '', this.repo = ''] = fullName.split('/');
  }

  async pullRequest(number: number): Promise<PullRequestRef & { state: string; draft?: boolean | undefined }> {
    const { data } = await this.octokit.request('GET /repos/{owner}/{repo}/pulls/{pull_number}', {
      owner: this.owner,
      repo: this.repo,
      pull_number: number,
    });
    return data;
  }

  async permission(username: string): Promise<RepoPermission> {
    const { data } = await this.octokit.request('GET /repos/{owner}/{repo}/collaborators/{username}/permission', {
      owner: this.owner,
      repo: this.repo,
      username,
    });
    const role = data.role_name;
    return (role && PERMISSIONS.has(role) ? role : data.permission) as RepoPermission;
  }

  async react(commentId: number, content: '+1' | '-1' | 'rocket'): Promise<void> {
    await this.octokit.request('POST /repos/{owner}/{repo}/issues/comments/{comment_id}/reactions', {
      owner: this.owner,
      repo: this.repo,
      comment_id: commentId,
      content,
    });
  }

  async reply(number: number, body: string): Promise<void> {
    await this.octokit.request('POST /repos/{owner}/{repo}/issues/{issue_number}/comments', {
      owner: this.owner,
      repo: this.repo,
      issue_number: number,
      body,
    });
  }

  async merge(number: number, sha: string, method: MergeMethod): Promise<void> {
    await this.octokit.request('PUT /repos/{owner}/{repo}/pulls/{pull_number}/merge', {
      owner: this.owner,
      repo: this.repo,
      pull_number: number,
      sha,
      merge_method: method,
    });
  }
}
