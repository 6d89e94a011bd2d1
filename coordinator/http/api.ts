import { storeFileExists } from '../../common/nix/derivation.js';
import Router, { type RouterContext } from '@koa/router';
import { LRUCache } from 'lru-cache';
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
import { addRepoRoutes } from './repo-routes.js';
import { addSizeRoutes } from './sizes-routes.js';
import type { SizeHistory } from '../review/size-history.js';
import { eventsRoute } from './events-route.js';
import { addHookRoutes } from '../hooks/hook-routes.js';
import type { HookService } from '../hooks/hook-service.js';
import {
  actorOf,
  badRequest,
  conflict,
  mayAct,
  mayActOn,
  mayRead,
  mayReadBuiltFor,
  mayReadRepo,
  notFound,
  queryParam,
  readJsonBody,
} from './respond.js';
import { TERMINAL_STATES } from '../scheduler/build-state.js';
import type { RequestState } from './server.js';
import type { RunStore } from '../github/run-store.js';
import type { EventBus } from '../events.js';
import type { CheckManager } from '../checks/check-manager.js';

export interface ApiSources {
  store: BuildStore;
  logs: LogStore;
  manager: BuildManager;
  /** Repository checks: a commit's, and their logs. */
  checks: CheckManager;
  reviews: ReviewService;
  /** Branches' output sizes over time. */
  sizes: SizeHistory;
  evaluations: EvaluationStore;
  access: AccessControl;
  audit: AuditLog;
  /** Whether a repository's data is public: only a repository GitHub says is public is. */
  repoVisibility(repo: string): Visibility;
  /** The agents connected now (none while the coordinator is not running). */
  connectedAgents(): Array<{ agentId: string; freeSlots: number; draining: boolean }>;
  /** What the connected agents can build. */
  capabilities(): AgentCapabilities[];
  /** Which of these store paths the coordinator's binary cache holds. */
  cachedPaths(paths: readonly string[]): Promise<Set<string>>;
  /** Copies .drv closures from the binary cache into the coordinator's store. */
  importDerivations(drvPaths: readonly string[]): Promise<void>;
  /** An operator's drain and resume of an agent (false: no such agent). */
  drainAgent(agentId: string, actor: string, reason: string): boolean;
  resumeAgent(agentId: string, actor: string): boolean;
  /** A commit's newest run again, failed builds included; false when there is none to run again. */
  rebuildFailed(repo: string, headSha: string, actor: string): Promise<boolean>;
  /** A comment command given on the web UI by a GitHub user; undefined when no App serves the repository. */
  runCommand(
    repo: string,
    number: number,
    login: string,
    command: string,
  ): Promise<{ accepted: boolean; message: string } | undefined>;
  /** Repositories, pull requests and runs (GitHub). */
  runs: RunStore;
  events: EventBus;
  /** Post-build hooks: a derivation's runs and their output. */
  hooks: Pick<HookService, 'runsOf' | 'run'>;
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
  drained_at: number | null;
  drained_by: string | null;
  drain_reason: string | null;
}

const drainBody = z.object({ reason: z.string().min(1).max(500).optional() }).strict();

// A request names its roots; their closures are read from the store. A megabyte is some 10,000 paths.
const MAX_SUBMIT_BYTES = 4 * 1024 * 1024;

const drvPath = z.string().refine(isDrvPath, 'a .drv store path');
const submitBody = z
  .object({
    drvs: z.array(drvPath).min(1).optional(),
    /** The same, each under the name the results should show (`ekaci build -A NAME`). */
    roots: z
      .array(z.object({ attr: z.string().min(1).max(1000), drvPath }).strict())
      .min(1)
      .optional(),
    /** Whether the request's data belongs to a private repository (readable with a credential only). */
    private: z.boolean().default(false),
  })
  .strict()
  .refine((b) => (b.drvs === undefined) !== (b.roots === undefined), 'give either drvs or roots');

/**
 * The API: a derivation's state, attempts and logs; build requests; reviews of commit pairs. Every route asks
 * AccessControl whether the caller may do what it asks; data of private repositories is never anonymous.
 */
export function apiRouter(sources: ApiSources): Router {
  const { store, logs, manager, reviews, evaluations, access } = sources;
  const router = new Router();
  const readable = (ctx: RouterContext, visibility: Visibility): boolean => mayRead(ctx, access, visibility);
  const drvVisibility = (drvPath: string): Visibility => (store.isPrivate(drvPath) ? 'private' : 'public');
  const mayReadDrv = (ctx: RouterContext, drvPath: string): Promise<boolean> =>
    mayReadBuiltFor(ctx, access, () => sources.runs.repositoriesBuilding(drvPath), drvVisibility(drvPath));

  // Every agent that ever said Hello, whether it is connected now, its free slots and what it runs. Operators'
  // information (host names, what builds where): with a credential only.
  router.get('/agents', (ctx) => {
    if (!readable(ctx, 'private')) return;
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
        drained: r.drained_at === null ? null : { at: r.drained_at, by: r.drained_by, reason: r.drain_reason },
        connected: live.has(r.agent_id),
        freeSlots: live.get(r.agent_id)?.freeSlots ?? 0,
        draining: live.get(r.agent_id)?.draining ?? false,
        leases: leases.filter((l) => l.agentId === r.agent_id).map(({ agentId: _self, ...l }) => l),
      })),
    };
  });

  // The queues: per lane what is buildable, since when, who serves it, and why nobody does.
  router.get('/queues', (ctx) => {
    if (!readable(ctx, 'private')) return;
    ctx.body = manager.queues(sources.capabilities());
  });
  // An operator's drain (no new work; what runs finishes) and its end, kept across reconnects and restarts.
  router.post('/agents/:id/drain', async (ctx) => {
    if (!mayAct(ctx, access, 'agents')) return;
    let reason = 'drained by an operator';
    if (ctx.request.length) {
      const body = await readJsonBody(ctx, 4096);
      if (body === undefined) return;
      const parsed = drainBody.safeParse(body);
      if (!parsed.success) return badRequest(ctx, 400, `reason: ${parsed.error.issues[0]!.message}`);
      reason = parsed.data.reason ?? reason;
    }
    if (!sources.drainAgent(ctx.params.id ?? '', actorOf(ctx), reason)) {
      return notFound(ctx, `no agent ${ctx.params.id ?? ''} ever connected`);
    }
    ctx.body = { id: ctx.params.id, drained: true };
  });
  router.post('/agents/:id/resume', (ctx) => {
    if (!mayAct(ctx, access, 'agents')) return;
    if (!sources.resumeAgent(ctx.params.id ?? '', actorOf(ctx))) {
      return notFound(ctx, `no agent ${ctx.params.id ?? ''} ever connected`);
    }
    ctx.body = { id: ctx.params.id, drained: false };
  });
  // The repositories a private build's events are for (see eventsRoute): asked of the database once a minute at most
  // per derivation, whatever the number of readers following, since one build sends several events.
  const buildRepos = new LRUCache<string, readonly string[]>({ max: 20_000, ttl: 60_000 });
  const reposOfBuild = (drvPath: string): readonly string[] => {
    let repos = buildRepos.get(drvPath);
    if (!repos) buildRepos.set(drvPath, (repos = sources.runs.repositoriesBuilding(drvPath)));
    return repos;
  };
  router.get('/events', (ctx) => eventsRoute(ctx, sources.events, access, reposOfBuild));
  // Who the caller is, as the pages need it: what to show, and the CSRF token a login session sends with changes.
  router.get('/me', (ctx) => {
    const p = (ctx.state as RequestState).principal;
    ctx.body = {
      kind: p.kind,
      name: p.kind === 'anonymous' ? null : p.name,
      admin: access.isAdmin(p),
      csrfToken: access.csrfTokenOf(p) ?? null,
      login: access.sessions ? '/auth/login' : null,
    };
  });
  router.get('/audit', (ctx) => {
    if (!mayAct(ctx, access, 'audit')) return;
    const limit = Math.min(Math.max(Number(ctx.query.limit ?? 100) || 100, 1), 1000);
    ctx.body = { entries: sources.audit.recent(limit) };
  });
  addRepoRoutes(router, sources);
  addSizeRoutes(router, sources);
  addHookRoutes(router, { hooks: sources.hooks, logs, access, findDrv: (hash) => findDrv(store, hash) });

  router.get('/openapi.json', (ctx) => {
    ctx.body = OPENAPI_DOCUMENT;
  });
  router.get('/derivations/:hash', async (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return notFound(ctx, `no derivation ${ctx.params.hash ?? ''}`);
    if (!(await mayReadDrv(ctx, drvPath))) return;
    ctx.body = {
      derivation: store.derivation(drvPath),
      outputs: store.outputsOf(drvPath),
      attempts: store.attemptsOf(drvPath).map(({ log_path: _ignored, ...a }) => a),
      history: store.db
        .prepare('SELECT attempt, state, agent_id, detail, at FROM events WHERE drv_path = ? ORDER BY id LIMIT ?')
        .all(drvPath, MAX_LISTED),
      dependencies: neighbours(store, 'SELECT input_drv AS d FROM derivation_inputs WHERE drv_path = ?', drvPath),
      dependents: neighbours(store, 'SELECT drv_path AS d FROM derivation_inputs WHERE input_drv = ?', drvPath),
    };
  });
  // Actions on a derivation: cancel it (queued or running; what only it blocked ends dependency-failed), or build
  // it again (a failure is final until someone asks).
  /** The derivation an action names, after checking who acts (API tokens; writers of a repository it is built for). */
  const actionTarget = async (ctx: RouterContext): Promise<string | undefined> => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    const repos = drvPath ? sources.runs.repositoriesOf(drvPath) : [];
    if (!(await mayActOn(ctx, access, 'builds', repos))) return undefined;
    if (!drvPath) notFound(ctx, `no derivation ${ctx.params.hash ?? ''}`);
    return drvPath;
  };
  router.post('/derivations/:hash/cancel', async (ctx) => {
    const drvPath = await actionTarget(ctx);
    if (!drvPath) return;
    const state = store.derivation(drvPath)!.state;
    if (TERMINAL_STATES.has(state)) return conflict(ctx, `nothing to cancel: ${drvPath} is ${state}`);
    const actor = actorOf(ctx);
    manager.cancel([drvPath], `cancelled by ${actor}`);
    sources.audit.record(actor, 'api.build-cancelled', { drvPath });
    ctx.status = 202;
    ctx.body = { drvPath, state: store.derivation(drvPath)!.state };
  });
  router.post('/derivations/:hash/rebuild', async (ctx) => {
    const drvPath = await actionTarget(ctx);
    if (!drvPath) return;
    const row = store.derivation(drvPath)!;
    const actor = actorOf(ctx);
    let id: number;
    try {
      // The code stays whose it was: a rebuild asked by anyone does not make someone else's code trusted.
      id = await manager.submit([{ attr: drvPath, drvPath }], actor, {
        rebuildFailed: true,
        untrusted: row.untrusted === 1,
        private: row.private === 1,
      });
    } catch (err) {
      return badRequest(ctx, 422, `cannot build ${drvPath} again: ${(err as Error).message}`);
    }
    sources.audit.record(actor, 'api.build-restarted', { drvPath, request: id });
    ctx.status = 202;
    ctx.body = { id, url: `/api/v1/requests/${id}` };
  });
  // A build's log: the current (latest) attempt's, or a given attempt's; `Range` reads part of it, `follow=1` (or
  // `Accept: text/event-stream`) follows it live as Server-Sent Events until the attempt ends.
  const log = async (ctx: RouterContext, pick: (attempts: AttemptRow[]) => AttemptRow | undefined): Promise<void> => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return notFound(ctx, `no derivation ${ctx.params.hash ?? ''}`);
    if (!(await mayReadDrv(ctx, drvPath))) return;
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
    if (!mayAct(ctx, access, 'builds')) return;
    const body = await readJsonBody(ctx, MAX_SUBMIT_BYTES);
    if (body === undefined) return;
    const parsed = submitBody.safeParse(body);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      return badRequest(ctx, 400, `${issue.path.join('.') || 'body'}: ${issue.message}`);
    }
    const roots = parsed.data.roots ?? parsed.data.drvs!.map((d) => ({ attr: d, drvPath: d }));
    const drvs = [...new Set(roots.map((r) => r.drvPath))];
    // Neither in the coordinator's store nor in its evaluation store: uploaded to its cache (`ekaci build
    // --coordinator`) and imported from there.
    const absent = drvs.filter((d) => !storeFileExists(d));
    const inCache = absent.length > 0 ? await sources.cachedPaths(absent) : new Set<string>();
    const missing = absent.filter((d) => !inCache.has(d));
    if (missing.length > 0) {
      return badRequest(
        ctx,
        422,
        `neither in the coordinator's store nor in its cache: ${missing.slice(0, 5).join(', ')}`,
      );
    }
    if (inCache.size > 0) {
      try {
        await sources.importDerivations([...inCache]);
      } catch (err) {
        return badRequest(ctx, 422, `cannot take the derivations from the cache: ${(err as Error).message}`);
      }
    }
    const actor = actorOf(ctx);
    let id: number;
    try {
      id = await manager.submit(roots, actor, { private: parsed.data.private });
    } catch (err) {
      // A .drv that is not one, or an input missing from the store.
      return badRequest(ctx, 422, `cannot read the derivations: ${(err as Error).message}`);
    }
    sources.audit.record(actor, 'api.builds-submitted', { request: id, roots: roots.length });
    ctx.status = 202;
    ctx.body = { id, url: `/api/v1/requests/${id}` };
  });
  router.get('/requests/:id', (ctx) => {
    const id = Number(ctx.params.id);
    const roots = store.requestRoots(id);
    const visibility = roots.some((r) => store.isPrivate(r.drvPath)) ? 'private' : 'public';
    if (!readable(ctx, visibility)) return;
    ctx.body = { settled: manager.isSettled(id), builds: manager.results(id) };
  });
  // The review of a pair of commits that a run (GitHub) or `ekaci review` recorded, as JSON or (format=markdown)
  // the summary a check run shows. Commits may be named by a unique prefix of at least 7 hex digits. Nothing is
  // computed for a pair nobody recorded.
  router.get('/reviews', async (ctx) => {
    const param = (name: string): string | undefined => queryParam(ctx, name);
    const [repo, base, head, format] = [param('repo'), param('base'), param('head'), param('format') ?? 'json'];
    if (!repo || !base || !head) {
      return badRequest(ctx, 400, 'repo, base and head are required query parameters');
    }
    if (format !== 'json' && format !== 'markdown') {
      return badRequest(ctx, 400, `format must be json or markdown, got "${format}"`);
    }
    if (!(await mayReadRepo(ctx, access, repo, sources.repoVisibility(repo)))) return;
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
    // A pull request's run says what the base's build rules held back; the review's builds are those it made.
    const heldBack = sources.runs.heldBack(repo, baseCommit, headCommit);
    if (heldBack) review.heldBack = heldBack;
    if (format === 'markdown') {
      ctx.type = 'text/markdown; charset=utf-8';
      ctx.body = renderMarkdown(review);
    } else ctx.body = review;
  });
  return router;
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

// Lists in a derivation's page (its history, dependencies, dependents) stop here; the count says how many there are.
const MAX_LISTED = 500;

/** A derivation's inputs or dependents with their states: the first MAX_LISTED, and how many there are. */
function neighbours(
  store: BuildStore,
  sql: string,
  drvPath: string,
): { count: number; derivations: Array<{ drvPath: string; state: string | null }> } {
  const all = (store.db.prepare(sql).all(drvPath) as Array<{ d: string }>).map((r) => r.d);
  const shown = all.slice(0, MAX_LISTED);
  const states = store.states(shown);
  return {
    count: all.length,
    derivations: shown.map((d) => ({ drvPath: d, state: states.get(d)?.state ?? null })),
  };
}
