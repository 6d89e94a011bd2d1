import { existsSync } from 'node:fs';
import Router, { type RouterContext } from '@koa/router';
import { z } from 'zod';
import { isDrvPath } from '../../common/nix/store-path.js';
import type { AccessControl, Visibility } from '../access/access-control.js';
import type { AuditLog } from '../audit-log.js';
import type { BuildManager } from '../scheduler/build-manager.js';
import type { AttemptRow, BuildStore } from '../scheduler/build-store.js';
import type { AgentCapabilities } from '../scheduler/scheduler.js';
import type { LogStore } from '../logs/log-store.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import { renderMarkdown } from '../review/markdown.js';
import type { ReviewService } from '../review/review-service.js';
import { followLog, serveLog } from './log-routes.js';
import { OPENAPI_DOCUMENT } from './openapi.js';
import type { RequestState } from './server.js';

export interface ApiSources {
  store: BuildStore;
  logs: LogStore;
  manager: BuildManager;
  reviews: ReviewService;
  evaluations: EvaluationStore;
  access: AccessControl;
  audit: AuditLog;
  /** Whether a repository's data is public: only a repository GitHub says is public is. */
  repoVisibility(repo: string): Visibility;
  /** The agents connected now (none while the coordinator is not running). */
  connectedAgents(): Array<{ agentId: string; freeSlots: number; draining: boolean }>;
  /** What the connected agents can build. */
  capabilities(): AgentCapabilities[];
}

interface AgentRow {
  agent_id: string;
  hostname: string;
  os: string;
  systems: string;
  features: string;
  mandatory: string;
  max_jobs: number;
  nix_version: string;
  last_seen: number;
  sandboxed: number;
}

// A request names its roots; their closures are read from the store. A megabyte is some 10,000 paths.
const MAX_SUBMIT_BYTES = 4 * 1024 * 1024;

const submitBody = z
  .object({
    drvs: z.array(z.string().refine(isDrvPath, 'a .drv store path')).min(1),
    /** Whether the request's data belongs to a private repository (readable with a credential only). */
    private: z.boolean().default(false),
  })
  .strict();

/**
 * The API: a derivation's state, attempts and logs; build requests; reviews of commit pairs. Every route asks
 * AccessControl whether the caller may do what it asks; data of private repositories is never anonymous.
 */
export function apiRouter(sources: ApiSources): Router {
  const { store, logs, manager, reviews, evaluations, access } = sources;
  const router = new Router();
  /** False (after answering 401/403) when the caller may not read data of this visibility. */
  const mayRead = (ctx: RouterContext, visibility: Visibility): boolean => {
    const principal = (ctx.state as RequestState).principal;
    if (access.mayRead(principal, visibility)) return true;
    ctx.status = principal.kind === 'anonymous' ? 401 : 403;
    ctx.body = {
      error: { code: 'EKACI_ERR_AUTH', message: 'this belongs to a private repository: send an API token' },
    };
    return false;
  };
  const drvVisibility = (drvPath: string): Visibility => (store.isPrivate(drvPath) ? 'private' : 'public');

  // Every agent that ever said Hello, whether it is connected now, its free slots and what it runs. Operators'
  // information (host names, what builds where): with a credential only.
  router.get('/agents', (ctx) => {
    if (!mayRead(ctx, 'private')) return;
    const live = new Map(sources.connectedAgents().map((a) => [a.agentId, a]));
    const leases = manager.openLeases();
    const rows = store.db.prepare('SELECT * FROM agents ORDER BY agent_id').all() as AgentRow[];
    ctx.body = {
      agents: rows.map((r) => ({
        id: r.agent_id,
        hostname: r.hostname,
        os: r.os,
        systems: JSON.parse(r.systems) as string[],
        supportedFeatures: JSON.parse(r.features) as string[],
        mandatoryFeatures: JSON.parse(r.mandatory) as string[],
        maxJobs: r.max_jobs,
        nixVersion: r.nix_version,
        sandboxed: r.sandboxed === 1,
        lastSeen: r.last_seen,
        connected: live.has(r.agent_id),
        freeSlots: live.get(r.agent_id)?.freeSlots ?? 0,
        draining: live.get(r.agent_id)?.draining ?? false,
        leases: leases.filter((l) => l.agentId === r.agent_id).map(({ agentId: _self, ...l }) => l),
      })),
    };
  });

  // The queues: per lane what is buildable, since when, who serves it, and why nobody does.
  router.get('/queues', (ctx) => {
    if (!mayRead(ctx, 'private')) return;
    ctx.body = manager.queues(sources.capabilities());
  });

  router.get('/openapi.json', (ctx) => {
    ctx.body = OPENAPI_DOCUMENT;
  });
  router.get('/derivations/:hash', (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return notFound(ctx, `no derivation ${ctx.params.hash ?? ''}`);
    if (!mayRead(ctx, drvVisibility(drvPath))) return;
    ctx.body = {
      derivation: store.derivation(drvPath),
      outputs: store.outputsOf(drvPath),
      attempts: store.attemptsOf(drvPath).map(({ log_path: _ignored, ...a }) => a),
    };
  });
  // A build's log: the current (latest) attempt's, or a given attempt's; `Range` reads part of it, `follow=1` (or
  // `Accept: text/event-stream`) follows it live as Server-Sent Events until the attempt ends.
  const log = (ctx: RouterContext, pick: (attempts: AttemptRow[]) => AttemptRow | undefined): void => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return notFound(ctx, `no derivation ${ctx.params.hash ?? ''}`);
    if (!mayRead(ctx, drvVisibility(drvPath))) return;
    const attempt = pick(store.attemptsOf(drvPath));
    if (!attempt) return notFound(ctx, `${drvPath} has no such attempt (it has not been built, or not that often)`);
    const follow = ctx.query.follow === '1' || ctx.get('Accept').includes('text/event-stream');
    if (follow) followLog(ctx, { store, logs }, attempt);
    else serveLog(ctx, attempt.log_path);
  };
  router.get('/derivations/:hash/log', (ctx) => log(ctx, (attempts) => attempts.at(-1)));
  router.get('/derivations/:hash/attempts/:attempt/log', (ctx) =>
    log(ctx, (attempts) => attempts.find((a) => String(a.attempt) === ctx.params.attempt)),
  );
  // Builds derivations whose .drv files are in the coordinator's store; answers the request's id at once (202), and
  // GET /requests/:id follows it.
  router.post('/builds', async (ctx) => {
    const principal = (ctx.state as RequestState).principal;
    if (!access.maySubmitBuilds(principal)) {
      ctx.status = principal.kind === 'anonymous' ? 401 : 403;
      ctx.body = { error: { code: 'EKACI_ERR_AUTH', message: 'submitting builds needs an API token' } };
      return;
    }
    const body = await readJsonBody(ctx, MAX_SUBMIT_BYTES);
    if (body === undefined) return;
    const parsed = submitBody.safeParse(body);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      return badRequest(ctx, 400, `${issue.path.join('.') || 'body'}: ${issue.message}`);
    }
    const missing = parsed.data.drvs.filter((d) => !existsSync(d));
    if (missing.length > 0) {
      return badRequest(ctx, 422, `not in the coordinator's store: ${missing.slice(0, 5).join(', ')}`);
    }
    const roots = parsed.data.drvs.map((d) => ({ attr: d, drvPath: d }));
    const actor = `api:${principal.kind === 'api' ? principal.name : 'unknown'}`;
    let id: number;
    try {
      id = await manager.submit(roots, actor, { private: parsed.data.private });
    } catch (err) {
      // A .drv that is not one, or an input missing from the store.
      return badRequest(ctx, 422, `cannot read the derivations: ${(err as Error).message}`);
    }
    sources.audit.record(actor, 'api.builds-submitted', { request: id, roots: parsed.data.drvs.length });
    ctx.status = 202;
    ctx.body = { id, url: `/api/v1/requests/${id}` };
  });
  router.get('/requests/:id', (ctx) => {
    const id = Number(ctx.params.id);
    const roots = store.requestRoots(id);
    const visibility = roots.some((r) => store.isPrivate(r.drvPath)) ? 'private' : 'public';
    if (!mayRead(ctx, visibility)) return;
    ctx.body = { settled: manager.isSettled(id), builds: manager.results(id) };
  });
  // The review of a pair of commits that a run (GitHub) or `ekaci review` recorded, as JSON or (format=markdown)
  // the summary a check run shows. Commits may be named by a unique prefix of at least 7 hex digits. Nothing is
  // computed for a pair nobody recorded.
  router.get('/reviews', async (ctx) => {
    const param = (name: string): string | undefined => {
      const v = ctx.query[name];
      return typeof v === 'string' && v !== '' ? v : undefined;
    };
    const [repo, base, head, format] = [param('repo'), param('base'), param('head'), param('format') ?? 'json'];
    if (!repo || !base || !head) {
      return badRequest(ctx, 400, 'repo, base and head are required query parameters');
    }
    if (format !== 'json' && format !== 'markdown') {
      return badRequest(ctx, 400, `format must be json or markdown, got "${format}"`);
    }
    if (!mayRead(ctx, sources.repoVisibility(repo))) return;
    const baseCommit = evaluations.resolveCommit(repo, base);
    const headCommit = evaluations.resolveCommit(repo, head);
    const unknown = [!baseCommit && base, !headCommit && head].filter(Boolean);
    if (!baseCommit || !headCommit) {
      return notFound(ctx, `no evaluation of ${unknown.join(' or ')} in ${repo} (or the prefix is ambiguous)`);
    }
    const jobs = ctx.query.job === undefined ? [] : [ctx.query.job].flat();
    const review = await reviews.reviewOf(repo, baseCommit, headCommit, jobs, { recordedOnly: true });
    if (!review) {
      return notFound(ctx, `no review of ${base}..${head} in ${repo} was recorded`);
    }
    if (format === 'markdown') {
      ctx.type = 'text/markdown; charset=utf-8';
      ctx.body = renderMarkdown(review);
    } else ctx.body = review;
  });
  return router;
}

function notFound(ctx: RouterContext, message: string): void {
  ctx.status = 404;
  ctx.body = { error: { code: 'EKACI_ERR_NOT_FOUND', message } };
}

function badRequest(ctx: RouterContext, status: number, message: string): void {
  ctx.status = status;
  ctx.body = { error: { code: 'EKACI_ERR_REQUEST', message } };
}

/** The request's JSON body, or undefined after answering 413/400/415. */
async function readJsonBody(ctx: RouterContext, max: number): Promise<unknown> {
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

// A whole store path hash, optionally with its name: a prefix would let anyone walk the derivations one by one.
const DRV_KEY = /^[0-9a-df-np-sv-z]{32}(?:-[A-Za-z0-9+\-._?=]+)?$/;

function findDrv(store: BuildStore, hashOrName: string): string | undefined {
  if (!DRV_KEY.test(hashOrName)) return undefined;
  const row = store.db
    .prepare('SELECT drv_path FROM derivations WHERE drv_path >= ? AND drv_path < ? LIMIT 1')
    .get(`/nix/store/${hashOrName}`, `/nix/store/${hashOrName}\uffff`) as { drv_path: string } | undefined;
  return row?.drv_path;
}
