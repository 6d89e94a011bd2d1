/**
 * Response bodies shaped like GitHub's: the fields clients read, with GitHub's names and types (ids are numbers,
 * absent values are null rather than missing).
 */
import { stableId, type CheckRun, type Comment, type Installation, type Reaction, type Repo } from './state.js';
import type { StandInState } from './state.js';
import type { Permission, StandInPull } from './types.js';

const HTML = 'https://github.com';
// A fixed moment for things that exist before the test starts, so snapshots of bodies do not churn.
const CREATED_AT = '2024-01-01T00:00:00Z';
// What the stand-in's app was granted: the permissions eka-ci asks for when installed.
const APP_PERMISSIONS = {
  checks: 'write',
  contents: 'write',
  issues: 'write',
  metadata: 'read',
  pull_requests: 'write',
} as const;
const APP_EVENTS = ['check_run', 'issue_comment', 'pull_request', 'push'];

type Body = Record<string, unknown>;

function nodeId(kind: string, id: number): string {
  return Buffer.from(`0:${kind}${id}`).toString('base64');
}

export function userShape(api: string, login: string): Body {
  const id = stableId(login);
  return {
    login,
    id,
    node_id: nodeId('User', id),
    avatar_url: `https://avatars.githubusercontent.com/u/${id}?v=4`,
    gravatar_id: '',
    url: `${api}/users/${encodeURIComponent(login)}`,
    html_url: `${HTML}/${login}`,
    type: login.endsWith('[bot]') ? 'Bot' : 'User',
    site_admin: false,
  };
}

export function appShape(api: string, state: StandInState): Body {
  return {
    id: state.appId,
    slug: state.appSlug,
    node_id: nodeId('Integration', state.appId),
    client_id: `Iv1.${state.appId}`,
    owner: userShape(api, 'eka-ci'),
    name: 'eka-ci (stand-in)',
    description: 'The GitHub App that the stand-in plays the part of GitHub for.',
    external_url: 'https://eka-ci.invalid',
    html_url: `${HTML}/apps/${state.appSlug}`,
    created_at: CREATED_AT,
    updated_at: CREATED_AT,
    permissions: APP_PERMISSIONS,
    events: APP_EVENTS,
    installations_count: state.installations.size,
  };
}

export function installationShape(api: string, state: StandInState, installation: Installation): Body {
  return {
    id: installation.id,
    account: { ...userShape(api, installation.account), type: 'Organization' },
    repository_selection: 'selected',
    access_tokens_url: `${api}/app/installations/${installation.id}/access_tokens`,
    repositories_url: `${api}/installation/repositories`,
    html_url: `${HTML}/organizations/${installation.account}/settings/installations/${installation.id}`,
    app_id: state.appId,
    app_slug: state.appSlug,
    target_id: stableId(installation.account),
    target_type: 'Organization',
    permissions: APP_PERMISSIONS,
    events: APP_EVENTS,
    created_at: CREATED_AT,
    updated_at: CREATED_AT,
    single_file_name: null,
    suspended_by: null,
    suspended_at: null,
  };
}

export function repoShape(api: string, repo: Pick<Repo, 'owner' | 'name' | 'id'> & Partial<Repo>, fork = false): Body {
  const fullName = `${repo.owner}/${repo.name}`;
  return {
    id: repo.id,
    node_id: nodeId('Repository', repo.id),
    name: repo.name,
    full_name: fullName,
    owner: userShape(api, repo.owner),
    private: repo.private ?? false,
    visibility: repo.private ? 'private' : 'public',
    html_url: `${HTML}/${fullName}`,
    description: null,
    fork,
    url: `${api}/repos/${fullName}`,
    clone_url: repo.cloneUrl ?? `${HTML}/${fullName}.git`,
    git_url: `git://github.com/${fullName}.git`,
    ssh_url: `git@github.com:${fullName}.git`,
    default_branch: repo.defaultBranch ?? 'main',
    archived: false,
    disabled: false,
    created_at: CREATED_AT,
    updated_at: CREATED_AT,
    pushed_at: CREATED_AT,
  };
}

export function checkRunShape(api: string, state: StandInState, run: CheckRun): Body {
  return {
    id: run.id,
    node_id: nodeId('CheckRun', run.id),
    name: run.name,
    head_sha: run.headSha,
    external_id: run.externalId ?? '',
    url: `${api}/repos/${run.repo}/check-runs/${run.id}`,
    html_url: `${HTML}/${run.repo}/runs/${run.id}`,
    details_url: run.detailsUrl ?? null,
    status: run.status,
    conclusion: run.conclusion,
    started_at: run.startedAt,
    completed_at: run.completedAt,
    output: {
      title: run.output.title ?? null,
      summary: run.output.summary ?? null,
      text: run.output.text ?? null,
      annotations_count: 0,
      annotations_url: `${api}/repos/${run.repo}/check-runs/${run.id}/annotations`,
    },
    check_suite: { id: stableId(`${run.repo}@${run.headSha}`) },
    app: appShape(api, state),
    pull_requests: [],
  };
}

export function commentShape(api: string, comment: Comment): Body {
  return {
    id: comment.id,
    node_id: nodeId('IssueComment', comment.id),
    url: `${api}/repos/${comment.repo}/issues/comments/${comment.id}`,
    html_url: `${HTML}/${comment.repo}/pull/${comment.issueNumber}#issuecomment-${comment.id}`,
    issue_url: `${api}/repos/${comment.repo}/issues/${comment.issueNumber}`,
    body: comment.body,
    user: userShape(api, comment.user),
    created_at: comment.createdAt,
    updated_at: comment.updatedAt,
    author_association: 'NONE',
  };
}

export function reactionShape(api: string, state: StandInState, reaction: Reaction): Body {
  return {
    id: reaction.id,
    node_id: nodeId('Reaction', reaction.id),
    user: userShape(api, state.botLogin),
    content: reaction.content,
    created_at: reaction.createdAt,
  };
}

/** GitHub's legacy `permission` (admin/write/read/none) next to the finer `role_name`. */
export function permissionShape(api: string, login: string, permission: Permission): Body {
  const legacy = { admin: 'admin', maintain: 'write', write: 'write', triage: 'read', read: 'read', none: 'none' };
  return { permission: legacy[permission], role_name: permission, user: userShape(api, login) };
}

function branchShape(api: string, state: StandInState, fullName: string, ref: string, sha: string): Body {
  const base = state.repo(fullName);
  const [owner = '', name = ''] = fullName.split('/');
  const repo = base ? repoShape(api, base) : repoShape(api, { owner, name, id: stableId(fullName) }, true);
  return { label: `${owner}:${ref}`, ref, sha, user: userShape(api, owner), repo };
}

function commitsOf(pull: StandInPull): Array<{ sha: string; message: string }> {
  return pull.commits ?? [{ sha: pull.headSha, message: pull.title }];
}

export function pullShape(api: string, state: StandInState, fullName: string, pull: StandInPull): Body {
  const merged = state.mergesOf(fullName).some((m) => m.number === pull.number);
  const mergeable = pull.mergeable ?? true;
  return {
    url: `${api}/repos/${fullName}/pulls/${pull.number}`,
    id: stableId(`${fullName}#${pull.number}`),
    node_id: nodeId('PullRequest', pull.number),
    html_url: `${HTML}/${fullName}/pull/${pull.number}`,
    number: pull.number,
    state: pull.state ?? 'open',
    locked: false,
    title: pull.title,
    user: userShape(api, pull.user),
    body: null,
    labels: [],
    draft: pull.draft ?? false,
    created_at: CREATED_AT,
    updated_at: CREATED_AT,
    closed_at: null,
    merged_at: null,
    merge_commit_sha: null,
    head: branchShape(api, state, pull.headRepo ?? fullName, pull.headRef, pull.headSha),
    base: branchShape(api, state, fullName, pull.baseRef, pull.baseSha),
    author_association: pull.authorAssociation,
    merged,
    mergeable,
    mergeable_state: mergeable ? 'clean' : 'dirty',
    comments: 0,
    review_comments: 0,
    commits: commitsOf(pull).length,
    additions: 0,
    deletions: 0,
    changed_files: 0,
  };
}

export function pullCommitsShape(api: string, fullName: string, pull: StandInPull): Body[] {
  const author = { name: pull.user, email: `${pull.user}@users.noreply.github.com`, date: CREATED_AT };
  let parent = pull.baseSha;
  return commitsOf(pull).map(({ sha, message }) => {
    const shape = {
      sha,
      node_id: nodeId('Commit', stableId(sha)),
      url: `${api}/repos/${fullName}/commits/${sha}`,
      html_url: `${HTML}/${fullName}/commit/${sha}`,
      commit: { message, author, committer: author, tree: { sha: '0'.repeat(40) }, comment_count: 0 },
      author: userShape(api, pull.user),
      committer: userShape(api, pull.user),
      parents: [{ sha: parent, url: `${api}/repos/${fullName}/commits/${parent}` }],
    };
    parent = sha;
    return shape;
  });
}
