/** What the stand-in GitHub knows: installations, repositories, pull requests, and what the app did to them. */
import { createHash } from 'node:crypto';
import type { Permission, StandInCheckRun, StandInComment, StandInMerge, StandInPull, StandInRepo } from './types.js';

export interface Installation {
  id: number;
  account: string;
}

export interface Repo extends StandInRepo {
  id: number;
  fullName: string;
}

export interface Comment extends StandInComment {
  repo: string;
  issueNumber: number;
  createdAt: string;
  updatedAt: string;
}

export interface Reaction {
  id: number;
  repo: string;
  commentId: number;
  content: string;
  createdAt: string;
}

export interface CheckRun extends StandInCheckRun {
  startedAt: string;
  completedAt: string | null;
}

/** A stable positive id for a name (users, accounts, forks) that tests never registered by number. */
export function stableId(name: string): number {
  return createHash('sha256').update(name.toLowerCase()).digest().readUInt32BE(0) % 1_000_000_000;
}

/** Repository names are case-insensitive on GitHub; the stand-in keys them lower-cased. */
export function repoKey(fullName: string): string {
  return fullName.toLowerCase();
}

export class StandInState {
  readonly installations = new Map<number, Installation>();
  readonly repos = new Map<string, Repo>();
  readonly pulls = new Map<string, Map<number, StandInPull>>();
  readonly permissions = new Map<string, Map<string, Permission>>();
  readonly checkRuns: CheckRun[] = [];
  readonly comments: Comment[] = [];
  readonly reactions: Reaction[] = [];
  readonly merges = new Map<string, StandInMerge[]>();
  private lastId = 1000;

  constructor(
    readonly appId: number,
    readonly appSlug: string,
  ) {}

  /** The login GitHub shows for things the app does. */
  get botLogin(): string {
    return `${this.appSlug}[bot]`;
  }

  nextId(): number {
    this.lastId += 1;
    return this.lastId;
  }

  addInstallation(id: number, account: string): void {
    this.installations.set(id, { id, account });
  }

  addRepo(repo: StandInRepo): void {
    const fullName = `${repo.owner}/${repo.name}`;
    this.repos.set(repoKey(fullName), { ...repo, fullName, id: repo.id ?? stableId(fullName) });
  }

  repo(fullName: string): Repo | undefined {
    return this.repos.get(repoKey(fullName));
  }

  addPull(fullName: string, pull: StandInPull): void {
    const key = repoKey(fullName);
    if (!this.repos.has(key)) throw new Error(`stand-in: addRepo(${fullName}) before adding pull requests to it`);
    const pulls = this.pulls.get(key) ?? new Map<number, StandInPull>();
    pulls.set(pull.number, { ...pull });
    this.pulls.set(key, pulls);
  }

  /** Changes a pull request as a push to it or an edit would. */
  updatePull(fullName: string, number: number, change: Partial<StandInPull>): void {
    const pull = this.pull(fullName, number);
    if (!pull) throw new Error(`stand-in: no pull request ${fullName}#${number}`);
    Object.assign(pull, change);
  }

  pull(fullName: string, number: number): StandInPull | undefined {
    return this.pulls.get(repoKey(fullName))?.get(number);
  }

  setPermission(fullName: string, login: string, permission: Permission): void {
    const key = repoKey(fullName);
    const byLogin = this.permissions.get(key) ?? new Map<string, Permission>();
    byLogin.set(login.toLowerCase(), permission);
    this.permissions.set(key, byLogin);
  }

  /** As GitHub answers: an explicit grant, else `read` on a public repository and `none` on a private one. */
  permission(fullName: string, login: string): Permission {
    const granted = this.permissions.get(repoKey(fullName))?.get(login.toLowerCase());
    return granted ?? (this.repo(fullName)?.private ? 'none' : 'read');
  }

  /** The commit a ref names: a sha as is, else the head of a pull request's branch, else the ref itself. */
  resolveRef(fullName: string, ref: string): string {
    const branch = ref.replace(/^refs\/heads\//, '').replace(/^heads\//, '');
    for (const pull of this.pulls.get(repoKey(fullName))?.values() ?? []) {
      if (pull.headRef === branch && pull.headRepo === undefined) return pull.headSha;
    }
    return ref;
  }

  checkRunsOf(fullName: string, headSha?: string): CheckRun[] {
    const key = repoKey(fullName);
    return this.checkRuns.filter((c) => repoKey(c.repo) === key && (headSha === undefined || c.headSha === headSha));
  }

  commentsOn(fullName: string, issueNumber: number): Comment[] {
    const key = repoKey(fullName);
    return this.comments.filter((c) => repoKey(c.repo) === key && c.issueNumber === issueNumber);
  }

  reactionsTo(fullName: string, commentId: number): Reaction[] {
    const key = repoKey(fullName);
    return this.reactions.filter((r) => repoKey(r.repo) === key && r.commentId === commentId);
  }

  mergesOf(fullName: string): StandInMerge[] {
    return this.merges.get(repoKey(fullName)) ?? [];
  }

  recordMerge(fullName: string, merge: StandInMerge): void {
    const key = repoKey(fullName);
    this.merges.set(key, [...(this.merges.get(key) ?? []), merge]);
  }
}
