import type { TokenStore } from './token-store.js';

/**
 * The one place that decides who a caller is and what they may do (ARCHITECTURE.md §7). Every credential eka-ci
 * accepts — an agent's token on its gRPC stream or in a cache request, an API token on an HTTP request — is checked
 * here, and every read or upload asks here whether it is allowed. Routes and services never compare tokens
 * themselves.
 */

export type Principal =
  | { kind: 'anonymous' }
  /** An agent, named by its token (the name is the agent id). */
  | { kind: 'agent'; name: string }
  /** A person or program holding an API token. */
  | { kind: 'api'; name: string };

/** Data of public repositories (and of no repository), or of private ones. */
export type Visibility = 'public' | 'private';

export interface AccessOptions {
  /** `[web] public`: anonymous callers may read what belongs to public repositories. */
  publicReads: boolean;
  /** `[web] admins`: names of API tokens whose holders operate the coordinator (agents, the audit log). */
  admins?: readonly string[];
}

/**
 * What a caller may change: `builds` — submit, cancel and rebuild derivations; `agents` — drain and resume agents;
 * `audit` — read the audit log.
 */
export type Action = 'builds' | 'agents' | 'audit';

export const ANONYMOUS: Principal = { kind: 'anonymous' };

export class AccessControl {
  constructor(
    private readonly agentTokens: TokenStore,
    private readonly apiTokens: TokenStore,
    private readonly options: AccessOptions,
  ) {}

  /** Who presents this `Authorization` header (`Bearer TOKEN`, or Basic with the token as password). */
  principal(authorizationHeader: string | undefined): Principal {
    const token = bearerOrBasicToken(authorizationHeader);
    if (token === undefined) return ANONYMOUS;
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

  /** Whether anonymous callers may read anything at all. */
  get publicReads(): boolean {
    return this.options.publicReads;
  }

  /**
   * Reading API data, logs or reviews. Any credential reads everything; anonymous callers read public data, and
   * only while the coordinator is public.
   */
  mayRead(p: Principal, visibility: Visibility): boolean {
    if (p.kind !== 'anonymous') return true;
    return this.options.publicReads && visibility === 'public';
  }

  /**
   * Reading the binary cache: agents substitute from it, so their tokens read it; so do API tokens. Anonymous
   * callers read it like any other public data.
   */
  mayReadCache(p: Principal, visibility: Visibility): boolean {
    return this.mayRead(p, visibility);
  }

  /** Uploading to the binary cache (outputs, logs) for a lease: only the agent that holds the lease now. */
  mayUploadFor(p: Principal, lease: { agentId: string } | undefined): boolean {
    return p.kind === 'agent' && lease !== undefined && lease.agentId === p.name;
  }

  /**
   * Acting through the API. Builds: any API token (agents build what they are given; anonymous callers nothing).
   * Operating the fleet and reading the audit log: the API tokens `[web] admins` names.
   */
  mayAct(p: Principal, action: Action): boolean {
    if (p.kind !== 'api') return false;
    return action === 'builds' || (this.options.admins ?? []).includes(p.name);
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
