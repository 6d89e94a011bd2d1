/** What endpoint handlers share: the request context, the reply, and GitHub's conventions for pages and 404s. */
import type { AppAuth } from './app-auth.js';
import type { Repo, StandInState } from './state.js';

// GitHub's page size when a request names none, and the largest it allows.
const DEFAULT_PER_PAGE = 30;
const MAX_PER_PAGE = 100;

export interface Context {
  /** The stand-in's API base URL. */
  api: string;
  state: StandInState;
  auth: AppAuth;
  params: Record<string, string>;
  query: Record<string, string>;
  /** The JSON body, already validated against the operation's schema. */
  body: unknown;
  installationId: number | undefined;
  /** The repository a `/repos/{owner}/{repo}/…` path names, already checked to belong to the installation. */
  repo: Repo | undefined;
}

export interface Reply {
  status: number;
  body?: unknown;
  headers?: Record<string, string>;
  /** Rules of the API that the request broke although its shape conforms (recorded as invalid). */
  errors?: string[];
}

export interface Endpoint {
  auth: 'app-jwt' | 'installation';
  handle(ctx: Context): Reply;
}

export const notFound = (): Reply => ({ status: 404, body: { message: 'Not Found' } });

export function now(): string {
  return new Date().toISOString().replace(/\.\d{3}Z$/, 'Z');
}

/** One page of `items` as `per_page`/`page` ask, with the `Link` header that Octokit's paginate follows. */
export function paginate<T>(ctx: Context, path: string, items: T[]): { items: T[]; headers: Record<string, string> } {
  const perPage = Math.min(Number(ctx.query.per_page ?? DEFAULT_PER_PAGE), MAX_PER_PAGE);
  const page = Number(ctx.query.page ?? 1);
  const last = Math.max(1, Math.ceil(items.length / perPage));
  const link = (p: number, rel: string) => `<${ctx.api}${path}?per_page=${perPage}&page=${p}>; rel="${rel}"`;
  const links = page < last ? [link(page + 1, 'next'), link(last, 'last')] : [];
  const headers: Record<string, string> = links.length ? { link: links.join(', ') } : {};
  return { items: items.slice((page - 1) * perPage, page * perPage), headers };
}

/** The path of the repository a request names, for `Link` headers. */
export function repoPath(ctx: Context): string {
  return `/repos/${ctx.repo!.fullName}`;
}
