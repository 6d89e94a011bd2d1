import type { RouterContext } from '@koa/router';
import type { AccessControl, Action, Visibility } from '../access/access-control.js';
import type { RequestState } from './server.js';

/** How API routes answer: errors as `{ "error": { "code", "message" } }`, and the access checks every route makes. */

export function notFound(ctx: RouterContext, message: string): void {
  ctx.status = 404;
  ctx.body = { error: { code: 'EKACI_ERR_NOT_FOUND', message } };
}

export function badRequest(ctx: RouterContext, status: number, message: string): void {
  ctx.status = status;
  ctx.body = { error: { code: 'EKACI_ERR_REQUEST', message } };
}

/** 409: what was asked does not fit the state of what it names (nothing to cancel, nothing to run again). */
export function conflict(ctx: RouterContext, message: string): void {
  ctx.status = 409;
  ctx.body = { error: { code: 'EKACI_ERR_STATE', message } };
}

/** A whole-number path parameter, or undefined for anything else. */
export function numberParam(ctx: RouterContext, name: string): number | undefined {
  const v = ctx.params[name];
  return v !== undefined && /^[0-9]+$/.test(v) ? Number(v) : undefined;
}

function denied(ctx: RouterContext, message: string): void {
  const principal = (ctx.state as RequestState).principal;
  ctx.status = principal.kind === 'anonymous' ? 401 : 403;
  ctx.body = { error: { code: 'EKACI_ERR_AUTH', message } };
}

/** False (after answering 401/403) when the caller may not read data of this visibility. */
export function mayRead(ctx: RouterContext, access: AccessControl, visibility: Visibility): boolean {
  if (access.mayRead((ctx.state as RequestState).principal, visibility)) return true;
  denied(ctx, 'this belongs to a private repository: send an API token');
  return false;
}

/**
 * False (after answering 401/403) when the caller may not read a derivation (its state, attempts, logs): a private
 * one is read with an API token, or by a GitHub user who may read a repository it was built for (`repos`).
 */
export async function mayReadBuiltFor(
  ctx: RouterContext,
  access: AccessControl,
  repos: () => readonly string[],
  visibility: Visibility,
): Promise<boolean> {
  const principal = (ctx.state as RequestState).principal;
  const candidates = visibility === 'private' && principal.kind === 'user' ? repos() : [];
  if (await access.mayReadAnyRepo(principal, candidates, visibility)) return true;
  denied(
    ctx,
    'this was built for a private repository: send an API token, or log in with GitHub as a user who can read it',
  );
  return false;
}

// Both ways in: an API token, or a GitHub login (the web UI), each as the configuration names them.
/** False (after answering 401/403) when the caller may not read this repository's data (see `mayReadRepo`). */
export async function mayReadRepo(
  ctx: RouterContext,
  access: AccessControl,
  repo: string,
  visibility: Visibility,
): Promise<boolean> {
  if (await access.mayReadRepo((ctx.state as RequestState).principal, repo, visibility)) return true;
  denied(ctx, `${repo} is a private repository: send an API token, or log in with GitHub as a user who can read it`);
  return false;
}

const ACTION_NEEDS: Record<Action, string> = {
  builds:
    'changing builds needs an API token, or a GitHub login named in [oauth] admins; other GitHub logins change ' +
    'only the builds of repositories they have write access to',
  agents:
    'draining and resuming agents needs an API token named in [web] admins, or a GitHub login named in [oauth] admins',
  audit: 'the audit log is for the API tokens named in [web] admins and the GitHub logins named in [oauth] admins',
};

/** False (after answering 401/403) when the caller may not take this action. */
export function mayAct(ctx: RouterContext, access: AccessControl, action: Action): boolean {
  if (access.mayAct((ctx.state as RequestState).principal, action)) return true;
  denied(ctx, ACTION_NEEDS[action]);
  return false;
}

/** False (after answering 401/403) when the caller may not take this action on what these repositories build. */
export async function mayActOn(
  ctx: RouterContext,
  access: AccessControl,
  action: Action,
  repos: readonly string[],
): Promise<boolean> {
  if (await access.mayActOn((ctx.state as RequestState).principal, action, repos)) return true;
  denied(
    ctx,
    repos.length > 0
      ? `changing this build needs an API token, or write access to ${repos.join(' or ')}`
      : ACTION_NEEDS[action],
  );
  return false;
}

/** Who acts, as the audit log names them. */
export function actorOf(ctx: RouterContext): string {
  const p = (ctx.state as RequestState).principal;
  if (p.kind === 'anonymous') return 'anonymous';
  return p.kind === 'user' ? `github:${p.name}` : `${p.kind}:${p.name}`;
}

/** The request's JSON body, or undefined after answering 413/400/415. */
export async function readJsonBody(ctx: RouterContext, max: number): Promise<unknown> {
  if (!ctx.is('application/json')) return badRequest(ctx, 415, 'send the body as application/json');
  const chunks: Buffer[] = [];
  let bytes = 0;
  for await (const chunk of ctx.req as AsyncIterable<Buffer>) {
    bytes += chunk.length;
    if (bytes > max) {
      ctx.set('Connection', 'close');
      return badRequest(ctx, 413, `the body is larger than ${max} bytes`);
    }
    chunks.push(chunk);
  }
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
  } catch (err) {
    return badRequest(ctx, 400, `the body is not JSON: ${(err as Error).message}`);
  }
}

/** A query parameter given once and not empty, or undefined. */
export function queryParam(ctx: RouterContext, name: string): string | undefined {
  const v = ctx.query[name];
  return typeof v === 'string' && v !== '' ? v : undefined;
}
