import type { Logger } from '../../common/logging.js';
import type { AuditLog } from '../audit-log.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import type { AppRegistry, Served } from './app-registry.js';
import { type Actor, authorize } from './authorization.js';
import { isEkaciCheck } from './check-report.js';
import type { CheckConclusion, CheckStatus } from './check-runs.js';
import { type MergeMethod, type PrCommand, parseCommands } from './commands.js';
import { GitHubApiError } from './errors.js';
import { decideMerge } from './merge-policy.js';
import { baseMaintainersOfChange } from './change-maintainers.js';
import { changesConfig } from '../review/base-policy.js';
import { KeyedRateLimiter } from '../../common/keyed-rate-limiter.js';
import type { PullRequestPayload } from './payloads.js';
import type { RunStore } from './run-store.js';
import { RepoApi, WRITE_PERMISSIONS } from './repo-api.js';
import { codeSpan } from '../review/markdown.js';

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
  /** Changed attributes whose head was not built (unbuildable, cancelled, not built): a merge waits for evidence. */
  unbuilt(repo: string, base: string, head: string): Promise<string[] | undefined>;
  audit: AuditLog;
  logger: Logger;
  botName?: string;
}

// GitHub's answer to a merge that branch protection or a conflict blocks for now ("Method Not Allowed").
const NOT_MERGEABLE_YET = 405;

// Commands per user and repository: a burst of 10, then one a minute. Every command costs API calls and may start
// builds; nobody types more than this, a script spamming comments does.
const COMMAND_BURST = 10;
const COMMANDS_PER_SECOND = 1 / 60;
const MAX_TRACKED_USERS = 10_000;

/** How a command is answered: on the pull request (a comment's), or to the web UI's caller. */
interface Answer {
  accepted(note?: string): Promise<void>;
  refused(reason: string): Promise<void>;
}

/** Who gave commands, when, and how each is answered (`id`: the comment's; null from the web UI). */
interface CommandSource {
  id: number | null;
  author: string;
  createdAt: number;
  answer: (line: string) => Answer;
}

/**
 * Pull-request comment commands (`@eka-ci build …`, `rebuild`, `merge`, `merge cancel`, `approve`), and the
 * pending `@eka-ci merge` they leave behind: it merges once every eka-ci check of the head is green, and is
 * cancelled when the head moves. Each command is answered with a reaction: +1 accepted, -1 refused (with a reply
 * saying why), rocket when merged.
 */
export class CommandRunner {
  private readonly limiter = new KeyedRateLimiter(MAX_TRACKED_USERS, COMMAND_BURST, COMMANDS_PER_SECOND);

  constructor(private readonly deps: CommandDeps) {}

  async run(
    served: Served,
    repo: string,
    number: number,
    comment: { id: number; body: string; author: string; createdAt: number },
  ): Promise<void> {
    const commands = parseCommands(comment.body, this.deps.botName);
    if (commands.length === 0) return;
    const api = new RepoApi(await this.deps.apps.octokit(served), repo);
    // Answered on the pull request: a reaction to the comment, and a reply saying why when refused.
    const answer = (line: string): Answer => ({
      accepted: async (note) => {
        await api.react(comment.id, '+1');
        if (note) await api.reply(number, `@${comment.author}: ${note}`);
      },
      refused: async (reason) => {
        await api.react(comment.id, '-1');
        await api.reply(number, `> ${line}\n\n@${comment.author}: ${reason}`);
      },
    });
    await this.runCommands(served, api, repo, number, commands, { ...comment, answer });
  }

  /**
   * A command given on eka-ci's web UI by a logged-in GitHub user (`approve SHA`, `merge`, `rebuild`, …): decided by
   * the same rules as a comment, answered to the caller instead of on the pull request. Undefined when no App serves
   * the repository.
   */
  async runFromWeb(
    repo: string,
    number: number,
    login: string,
    line: string,
  ): Promise<{ accepted: boolean; message: string } | undefined> {
    const served = await this.servedFor(repo);
    if (!served) return undefined;
    const commands = parseCommands(`@${this.deps.botName ?? 'eka-ci'} ${line}`, this.deps.botName);
    if (commands.length !== 1) return { accepted: false, message: `"${line}" is not one eka-ci command` };
    const api = new RepoApi(await this.deps.apps.octokit(served), repo);
    let outcome = { accepted: false, message: 'not run (rate-limited, or the branch is not served)' };
    const answer: Answer = {
      accepted: (note) => {
        outcome = { accepted: true, message: note ?? 'done' };
        return Promise.resolve();
      },
      refused: (reason) => {
        outcome = { accepted: false, message: reason };
        return Promise.resolve();
      },
    };
    await this.runCommands(served, api, repo, number, commands, {
      id: null,
      author: login,
      createdAt: Date.now(),
      answer: () => answer,
    });
    return outcome;
  }

  private async runCommands(
    served: Served,
    api: RepoApi,
    repo: string,
    number: number,
    commands: PrCommand[],
    from: CommandSource,
  ): Promise<void> {
    const wait = this.limiter.take(`${repo}\u0000${from.author.toLowerCase()}`);
    if (wait > 0) {
      this.deps.logger.warn({ repo, author: from.author, waitMs: wait }, 'commands rate-limited');
      this.deps.audit.record(`github:${from.author}`, 'command-rate-limited', { repo, pr: number });
      return;
    }
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
      title: pr.title,
    });
    // Commands act on the pull request's base branch: one the app may not build is not served at all.
    if (!this.deps.apps.allowed(served, repo, pr.base.ref)) return;
    const actor: Actor = { login: from.author, permission: await api.permission(from.author) };
    for (const command of commands) {
      const answer = from.answer(command.line);
      const refusal = this.refusal(command, actor, repo, pr);
      if (refusal) {
        await answer.refused(refusal);
        continue;
      }
      await this.execute(command as Exclude<PrCommand, { kind: 'invalid' }>, served, repo, pr, from, answer);
    }
  }

  private refusal(command: PrCommand, actor: Actor, repo: string, pr: PullRequestRef): string | undefined {
    if (command.kind === 'invalid') return command.reason;
    let maintainersOfChanged = new Map<string, string[]>();
    if (!WRITE_PERMISSIONS.has(actor.permission) && (command.kind === 'merge' || command.kind === 'merge-cancel')) {
      // Who maintains what comes from the base's stored evaluation: the pull request cannot vouch for itself.
      const base = this.deps.evaluations.load(repo, pr.base.sha);
      const head = this.deps.evaluations.load(repo, pr.head.sha);
      if (!base || !head) return 'this pull request has not been evaluated yet; try again when its checks run.';
      if (changesConfig(base, head)) {
        return `@${actor.login} needs write access to merge this pull request: it changes eka-ci's configuration.`;
      }
      maintainersOfChanged = baseMaintainersOfChange(base, head);
    }
    const decision = authorize(command, actor, { maintainersOfChanged });
    if (!decision.allowed) return decision.reason;
    if (command.kind === 'build') {
      const head = this.deps.evaluations.load(repo, pr.head.sha);
      const known = new Set(head?.jobs.flatMap((j) => j.attrs.map((a) => a.attr)) ?? []);
      const unknown = head ? command.attrs.filter((a) => !known.has(a)) : [];
      if (unknown.length > 0) return `no attribute ${unknown.map(codeSpan).join(', ')} in this pull request.`;
    }
    return undefined;
  }

  private async execute(
    command: Exclude<PrCommand, { kind: 'invalid' }>,
    served: Served,
    repo: string,
    pr: PullRequestRef,
    comment: CommandSource,
    answer: Answer,
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
      case 'approve': {
        // An approval covers what the approver could have seen: the commit they name, or else the head of the
        // moment they wrote the comment — never a commit pushed after it.
        const seen = command.sha
          ? this.deps.runs
              .headsMatching(repo, pr.number, command.sha)
              .concat(pr.head.sha.startsWith(command.sha) ? [pr.head.sha] : [])[0]
          : this.deps.runs.headBefore(repo, pr.number, comment.createdAt);
        if (seen === undefined) {
          await answer.refused(
            `eka-ci cannot tell which commit you saw${command.sha ? ` (no head ${command.sha} of this pull request)` : ''}; comment \`@eka-ci approve ${pr.head.sha}\` to approve the current head.`,
          );
          return;
        }
        this.deps.runs.setApproval(repo, pr.number, comment.author, seen);
        this.deps.audit.record(actor, 'approve', { repo, pr: pr.number, head: seen });
        if (seen !== pr.head.sha) {
          await answer.accepted(
            `approved ${seen}; the pull request has moved on to ${pr.head.sha} since, which needs its own approval.`,
          );
          return;
        }
        await this.deps.startRun(served, repo, pr, baseCloneUrl, {});
        break;
      }
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
    await answer.accepted();
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
    // Green checks are not enough when some changed attribute was never built: there is no evidence it works.
    const unbuilt = decision.action === 'merge' ? await this.deps.unbuilt(repo, row.base_sha, row.head_sha) : [];
    if (unbuilt === undefined || unbuilt.length > 0) {
      this.deps.runs.setMerge(repo, number, undefined);
      const what =
        unbuilt === undefined
          ? 'there is no review of this head yet'
          : `${unbuilt.length} changed attribute${unbuilt.length === 1 ? ' was' : 's were'} not built (${unbuilt.slice(0, 10).join(', ')}${unbuilt.length > 10 ? ', …' : ''})`;
      await api.reply(number, `@${row.merge_by}: not merging: ${what}; a merge needs every change built.`);
      return;
    }
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
}
