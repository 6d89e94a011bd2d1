import Router, { type RouterContext } from '@koa/router';
import type { AccessControl, Visibility } from '../access/access-control.js';
import type { BuildManager } from '../scheduler/build-manager.js';
import type { BuildStore } from '../scheduler/build-store.js';
import type { LogStore } from '../logs/log-store.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import { renderMarkdown } from '../review/markdown.js';
import type { ReviewService } from '../review/review-service.js';
import type { RequestState } from './server.js';

export interface ApiSources {
  store: BuildStore;
  logs: LogStore;
  manager: BuildManager;
  reviews: ReviewService;
  evaluations: EvaluationStore;
  access: AccessControl;
  /** Whether a repository's data is public: only a repository GitHub says is public is. */
  repoVisibility(repo: string): Visibility;
}

/**
 * Read-only API: a derivation's state, attempts and logs; build requests; reviews of commit pairs. Every route asks
 * AccessControl whether the caller may read what it serves; data of private repositories is never anonymous.
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

  router.get('/derivations/:hash', (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath || !mayRead(ctx, drvVisibility(drvPath))) return;
    ctx.body = {
      derivation: store.derivation(drvPath),
      outputs: store.outputsOf(drvPath),
      attempts: store.attemptsOf(drvPath).map(({ log_path: _ignored, ...a }) => a),
    };
  });
  router.get('/derivations/:hash/attempts/:attempt/log', (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath || !mayRead(ctx, drvVisibility(drvPath))) return;
    ctx.type = 'text/plain; charset=utf-8';
    ctx.body = logs.read(logs.pathFor(drvPath, Number(ctx.params.attempt)));
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
      ctx.status = 400;
      ctx.body = { error: 'repo, base and head are required query parameters' };
      return;
    }
    if (format !== 'json' && format !== 'markdown') {
      ctx.status = 400;
      ctx.body = { error: `format must be json or markdown, got "${format}"` };
      return;
    }
    if (!mayRead(ctx, sources.repoVisibility(repo))) return;
    const baseCommit = evaluations.resolveCommit(repo, base);
    const headCommit = evaluations.resolveCommit(repo, head);
    const unknown = [!baseCommit && base, !headCommit && head].filter(Boolean);
    if (!baseCommit || !headCommit) {
      ctx.status = 404;
      ctx.body = { error: `no evaluation of ${unknown.join(' or ')} in ${repo} (or the prefix is ambiguous)` };
      return;
    }
    const jobs = ctx.query.job === undefined ? [] : [ctx.query.job].flat();
    const review = await reviews.reviewOf(repo, baseCommit, headCommit, jobs, { recordedOnly: true });
    if (!review) {
      ctx.status = 404;
      ctx.body = { error: `no review of ${base}..${head} in ${repo} was recorded` };
      return;
    }
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
