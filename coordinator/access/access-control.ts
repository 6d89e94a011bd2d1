import type { Session, Sessions } from './sessions.js';
import type { TokenStore } from './token-store.js';

/**
 * The one place that decides who a caller is and what they may do (ARCHITECTURE.md §7). Every credential eka-ci
 * accepts — an agent's token on its gRPC stream or in a cache request, an API token on an HTTP request, a web
 * session after a GitHub login — is checked here, and every read, upload or action asks here whether it is allowed.
 * Routes and services never compare tokens themselves.
 */

export type Principal =
  | { kind: 'anonymous' }
  /** An agent, named by its token (the name is the agent id). */
  | { kind: 'agent'; name: string }
  /** A person or program holding an API token. */
  | { kind: 'api'; name: string }
  /** A person logged in with GitHub (the web UI's session cookie): `name` is the GitHub login. */
  | { kind: 'user'; name: string; session: Session };

/** Data of public repositories (and of no repository), or of private ones. */
export type Visibility = 'public' | 'private';

export interface AccessOptions {
  /** `[web] public`: anonymous callers may read what belongs to public repositories. */
  publicReads: boolean;
  /** `[web] admins`: names of API tokens whose holders operate the coordinator (agents, the audit log). */
  admins?: readonly string[];
  /** `[oauth] admins`: GitHub logins that operate the coordinator. */
  userAdmins?: readonly string[];
  /** Web sessions, when GitHub login is configured. */
  sessions?: Sessions;
  /**
   * A GitHub user's permission on a repository (`admin`, `maintain`, `write`, `triage`, `read` or `none`), asked of
   * GitHub through the App that serves the repository; undefined when no App does.
   */
  repoPermission?: (repo: string, login: string) => Promise<string | undefined>;
}

/**
 * What a caller may change: `builds` — submit, cancel and rebuild derivations; `agents` — drain and resume agents;
 * `audit` — read the audit log.
 */
export type Action = 'builds' | 'agents' | 'audit';

export const ANONYMOUS: Principal = { kind: 'anonymous' };

const WRITERS = new Set(['write', 'maintain', 'admin']);
const READERS = new Set(['read', 'triage', ...WRITERS]);

export class AccessControl {
  constructor(
    private readonly agentTokens: TokenStore,
    private readonly apiTokens: TokenStore,
    private readonly options: AccessOptions,
  ) {}

  /**
   * Who presents this `Authorization` header (`Bearer TOKEN`, or Basic with the token as password), or else this web
   * session cookie. A token that does not check out is anonymous, whatever the cookie says.
   */
  principal(authorizationHeader: string | undefined, sessionCookie?: string): Principal {
    const token = bearerOrBasicToken(authorizationHeader);
    if (token === undefined) {
      const session = this.options.sessions?.verify(sessionCookie);
      return session ? { kind: 'user', name: session.login, session } : ANONYMOUS;
    }
    const agent = this.agentTokens.verify(token);
    if (agent) return { kind: 'agent', name: agent.name };
    const api = this.apiTokens.verify(token);
    if (api) return { kind: 'api', name: api.name };
    return ANONYMOUS;
  }

  /** The agent a token belongs to (gRPC streams), or undefined for an unknown or revoked token. */
  agentOf(token: string | undefined): string | undefined {
    return this.agentTokens.verify(token)?.name;
  }

  /** Web sessions, when GitHub login is configured. */
  get sessions(): Sessions | undefined {
    return this.options.sessions;
  }

  /** Whether anonymous callers may read anything at all. */
  get publicReads(): boolean {
    return this.options.publicReads;
  }

  /**
   * Reading API data, logs or reviews. Any token reads everything; anonymous callers read public data, and only while
   * the coordinator is public; a GitHub user reads public data (whatever `[web] public` says), private data as admin
   * (and a private repository's data when GitHub lets them read it: `mayReadRepo`).
   */
  mayRead(p: Principal, visibility: Visibility): boolean {
    // Anyone can log in with GitHub: a user reads public data, and private data only as an admin.
    if (p.kind === 'user') return visibility === 'public' || this.isAdmin(p);
    if (p.kind !== 'anonymous') return true;
    return this.options.publicReads && visibility === 'public';
  }

  /**
   * Reading a repository's data (its pull requests, runs, reviews, sizes): what `mayRead` allows, and a GitHub user
   * who may read the repository on GitHub (any permission but `none`), asked through the App that serves it.
   */
  async mayReadRepo(p: Principal, repo: string, visibility: Visibility): Promise<boolean> {
    if (this.mayRead(p, visibility)) return true;
    if (p.kind !== 'user' || !this.options.repoPermission) return false;
    const permission = await this.options.repoPermission(repo, p.name);
    return permission !== undefined && READERS.has(permission);
  }

  /**
   * Reading what was built for any of `repos` (a private derivation and its logs): `mayRead`, or `mayReadRepo` of
   * one of them.
   */
  async mayReadAnyRepo(p: Principal, repos: readonly string[], visibility: Visibility): Promise<boolean> {
    if (this.mayRead(p, visibility)) return true;
    for (const repo of repos) if (await this.mayReadRepo(p, repo, visibility)) return true;
    return false;
  }

  /**
   * Reading the binary cache: agents substitute from it, so their tokens read it; so do API tokens. Anonymous
   * callers read it like any other public data.
   */
  mayReadCache(p: Principal, visibility: Visibility): boolean {
    return this.mayRead(p, visibility);
  }

  /**
   * Uploading content-addressed paths (`.drv` files and sources, which prove their own content) to the binary cache
   * without a lease: an API token that may submit builds (`ekaci build --coordinator` uploads what it asks to build).
   */
  mayUploadContentAddressed(p: Principal): boolean {
    return p.kind === 'api' && this.mayAct(p, 'builds');
  }

  /**
   * Acting for a lease — uploading its outputs and logs to the binary cache, downloading a check's source: only the
   * agent that holds the lease now.
   */
  holdsLease(p: Principal, lease: { agentId: string } | undefined): boolean {
    return p.kind === 'agent' && lease !== undefined && lease.agentId === p.name;
  }

  /**
   * Acting through the API. Builds: any API token (agents build what they are given; anonymous callers nothing).
   * Operating the fleet and reading the audit log: the API tokens `[web] admins` names, and the GitHub logins
   * `[oauth] admins` names. A logged-in user changes builds only through `mayActOn`, per repository.
   */
  mayAct(p: Principal, action: Action): boolean {
    if (this.isAdmin(p)) return true;
    return p.kind === 'api' && action === 'builds';
  }

  /**
   * Changing builds that belong to these repositories (cancel, rebuild): what `mayAct` allows, and a GitHub user with
   * write access (write, maintain or admin) to one of them.
   */
  async mayActOn(p: Principal, action: Action, repos: readonly string[]): Promise<boolean> {
    if (this.mayAct(p, action)) return true;
    if (p.kind !== 'user' || action !== 'builds' || !this.options.repoPermission) return false;
    for (const repo of repos) {
      const permission = await this.options.repoPermission(repo, p.name);
      if (permission !== undefined && WRITERS.has(permission)) return true;
    }
    return false;
  }

  /** Operators: API tokens in `[web] admins`, GitHub logins in `[oauth] admins`. */
  isAdmin(p: Principal): boolean {
    if (p.kind === 'api') return (this.options.admins ?? []).includes(p.name);
    if (p.kind === 'user') return (this.options.userAdmins ?? []).some((a) => a.toLowerCase() === p.name.toLowerCase());
    return false;
  }

  /** The CSRF token a logged-in user's page sends back (`GET /api/v1/me` tells it); undefined for other callers. */
  csrfTokenOf(p: Principal): string | undefined {
    return p.kind === 'user' ? this.options.sessions?.csrfToken(p.session) : undefined;
  }

  /**
   * Whether a state-changing request may go on: a session (a cookie the browser sends by itself, even for another
   * site's page) must show its CSRF token; tokens in headers are never sent by a browser on its own.
   */
  csrfOk(p: Principal, header: string | undefined): boolean {
    if (p.kind !== 'user') return true;
    return this.options.sessions?.csrfMatches(p.session, header) ?? false;
  }

  /** Whether a caller may see anything of `/metrics` and the like: the same rule as public data. */
  mayReadServerState(p: Principal): boolean {
    return this.mayRead(p, 'public');
  }
}

/** The token in an `Authorization` header: a Bearer token, or the password of Basic auth (any user name). */
export function bearerOrBasicToken(authorizationHeader: string | undefined): string | undefined {
  const match = /^(Basic|Bearer) +(\S+)$/i.exec(authorizationHeader?.trim() ?? '');
  if (!match?.[1] || !match[2]) return undefined;
  if (match[1].toLowerCase() === 'bearer') return match[2];
  const decoded = Buffer.from(match[2], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  const password = colon < 0 ? '' : decoded.slice(colon + 1);
  return password === '' ? undefined : password;
}
