import type { AppRegistry } from './app-registry.js';
import type { RepoPermission } from './authorization.js';
import type { MergeMethod } from './commands.js';
import type { PullRequestRef } from './command-runner.js';
import { permissionResponse, pullResponse, readResponse } from './responses.js';

const PERMISSIONS: ReadonlySet<string> = new Set(['admin', 'maintain', 'write', 'triage', 'read', 'none']);

/** Permissions that let a user push to the repository: their code is the repository's own. */
export const WRITE_PERMISSIONS: ReadonlySet<RepoPermission> = new Set(['write', 'maintain', 'admin']);

/** The few REST calls commands make, on one repository. */
export class RepoApi {
  private readonly owner: string;
  private readonly repo: string;

  constructor(
    private readonly octokit: Awaited<ReturnType<AppRegistry['octokit']>>,
    fullName: string,
  ) {
    [this.owner = '', this.repo = ''] = fullName.split('/');
  }

  async pullRequest(
    number: number,
  ): Promise<PullRequestRef & { title: string; state: string; draft?: boolean | undefined }> {
    const op = 'GET /repos/{owner}/{repo}/pulls/{pull_number}';
    const response = await this.octokit.request(op, { owner: this.owner, repo: this.repo, pull_number: number });
    return readResponse(pullResponse, op, response);
  }

  async permission(username: string): Promise<RepoPermission> {
    const op = 'GET /repos/{owner}/{repo}/collaborators/{username}/permission';
    const response = await this.octokit.request(op, { owner: this.owner, repo: this.repo, username });
    const data = readResponse(permissionResponse, op, response);
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
