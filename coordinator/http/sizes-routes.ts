import type Router from '@koa/router';
import type { ApiSources } from './api.js';
import { badRequest, mayReadRepo, notFound, queryParam } from './respond.js';

// Points one answer carries at most: every output of an attribute on a few branches, each series at its retention.
const MAX_LIMIT = 10_000;
const DEFAULT_LIMIT = 1_000;

/**
 * `GET /sizes?repo=OWNER/NAME&attr=ATTR[&branch=B][&output=O][&job=J][&limit=N]`: an attribute's output sizes as
 * built on its repository's branches (SizeHistory), oldest first — the newest `limit` points that match.
 */
export function addSizeRoutes(router: Router, sources: Pick<ApiSources, 'access' | 'sizes' | 'repoVisibility'>): void {
  router.get('/sizes', async (ctx) => {
    const [repo, attr] = [queryParam(ctx, 'repo'), queryParam(ctx, 'attr')];
    if (!repo || !attr) return badRequest(ctx, 400, 'repo (OWNER/NAME) and attr are required query parameters');
    const limitParam = queryParam(ctx, 'limit');
    const limit = limitParam === undefined ? DEFAULT_LIMIT : Number(limitParam);
    if (!/^[0-9]+$/.test(limitParam ?? '1') || limit < 1 || limit > MAX_LIMIT) {
      return badRequest(ctx, 400, `limit must be a whole number from 1 to ${MAX_LIMIT}, got "${limitParam ?? ''}"`);
    }
    if (!(await mayReadRepo(ctx, sources.access, repo, sources.repoVisibility(repo)))) return;
    const filters = {
      branch: queryParam(ctx, 'branch'),
      job: queryParam(ctx, 'job'),
      output: queryParam(ctx, 'output'),
    };
    const points = sources.sizes.history({ repo, attr, ...filters, limit });
    if (points.length === 0) {
      const named = Object.entries(filters).flatMap(([k, v]) => (v === undefined ? [] : [`${k} ${v}`]));
      return notFound(ctx, `no recorded sizes of ${attr} in ${repo}${named.length ? ` (${named.join(', ')})` : ''}`);
    }
    ctx.body = {
      repo,
      attr,
      points: points.map((p) => ({
        branch: p.branch,
        commit: p.commit,
        job: p.job,
        output: p.output,
        system: p.system,
        drvPath: p.drvPath,
        narSize: p.narSize,
        closureSize: p.closureSize,
        recordedAt: p.recordedAt,
      })),
    };
  });
}
