import Router from '@koa/router';
import type { BuildManager } from '../scheduler/build-manager.js';
import type { BuildStore } from '../scheduler/build-store.js';
import type { LogStore } from '../logs/log-store.js';
import type { EvaluationStore } from '../eval/evaluation-store.js';
import { renderMarkdown } from '../review/markdown.js';
import type { ReviewService } from '../review/review-service.js';

export interface ApiSources {
  store: BuildStore;
  logs: LogStore;
  manager: BuildManager;
  reviews: ReviewService;
  evaluations: EvaluationStore;
}

/** Read-only API: a derivation's state, attempts and logs; build requests; reviews of commit pairs. */
export function apiRouter({ store, logs, manager, reviews, evaluations }: ApiSources): Router {
  const router = new Router();
  router.get('/derivations/:hash', (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return;
    ctx.body = {
      derivation: store.derivation(drvPath),
      outputs: store.outputsOf(drvPath),
      attempts: store.attemptsOf(drvPath).map(({ log_path: _ignored, ...a }) => a),
    };
  });
  router.get('/derivations/:hash/attempts/:attempt/log', (ctx) => {
    const drvPath = findDrv(store, ctx.params.hash ?? '');
    if (!drvPath) return;
    ctx.type = 'text/plain; charset=utf-8';
    ctx.body = logs.read(logs.pathFor(drvPath, Number(ctx.params.attempt)));
  });
  router.get('/requests/:id', (ctx) => {
    const id = Number(ctx.params.id);
    ctx.body = { settled: manager.isSettled(id), builds: manager.results(id) };
  });
  // The review of any pair of commits the coordinator has evaluated, as JSON or (format=markdown) the summary
  // a check run shows. Commits may be named by a unique prefix of at least 7 hex digits.
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
    const baseCommit = evaluations.resolveCommit(repo, base);
    const headCommit = evaluations.resolveCommit(repo, head);
    const unknown = [!baseCommit && base, !headCommit && head].filter(Boolean);
    if (!baseCommit || !headCommit) {
      ctx.status = 404;
      ctx.body = { error: `no evaluation of ${unknown.join(' or ')} in ${repo} (or the prefix is ambiguous)` };
      return;
    }
    const jobs = ctx.query.job === undefined ? [] : [ctx.query.job].flat();
    const review = await reviews.reviewOf(repo, baseCommit, headCommit, jobs);
    if (!review) {
      ctx.status = 404;
      ctx.body = { error: `no evaluation of ${base} or ${head} in ${repo}` };
      return;
    }
    if (format === 'markdown') {
      ctx.type = 'text/markdown; charset=utf-8';
      ctx.body = renderMarkdown(review);
    } else ctx.body = review;
  });
  return router;
}

function findDrv(store: BuildStore, hashOrName: string): string | undefined {
  const row = store.db
    .prepare('SELECT drv_path FROM derivations WHERE drv_path >= ? AND drv_path < ? LIMIT 1')
    .get(`/nix/store/${hashOrName}`, `/nix/store/${hashOrName}\uffff`) as { drv_path: string } | undefined;
  return row?.drv_path;
}
