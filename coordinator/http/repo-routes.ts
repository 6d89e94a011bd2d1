import type Router from '@koa/router';
import type { RouterContext } from '@koa/router';
import type { PullRequestRow, RunRow, RunSummary } from '../github/run-store.js';
import { TimelineCache } from '../github/run-timeline.js';
import type { RunEta } from '../scheduler/eta.js';
import { z } from 'zod';
import {
  actorOf,
  badRequest,
  conflict,
  mayActOn,
  mayReadRepo,
  notFound,
  numberParam,
  queryParam,
  readJsonBody,
} from './respond.js';
import type { ApiSources } from './api.js';
import { CHECK_TERMINAL_STATES } from '../checks/check-manager.js';
import { followLogFile, serveLog } from './log-routes.js';
import type { RequestState } from './server.js';

/** How a list of pull requests can be ordered: most rebuilds, most newly failing, or most recently updated first. */
const PULL_SORTS = ['updated', 'rebuilds', 'failing'] as const;
type PullSort = (typeof PULL_SORTS)[number];

/**
 * Repositories, their pull requests, a commit's evaluations and runs, and an attribute's sizes across commits: what
 * the overview and review pages read. Every answer is filtered by the repository's visibility.
 */
export function addRepoRoutes(router: Router, sources: ApiSources): void {
  const { access, runs, evaluations, store } = sources;
  const timelines = new TimelineCache(store);
  const repoOf = (ctx: RouterContext): string => `${ctx.params.owner ?? ''}/${ctx.params.repo ?? ''}`;
  // A building run's ETA (coordinator/scheduler/eta.ts), shared with its check runs' progress.
  const etaOf = (r: RunRow): RunEta | null =>
    r.state === 'building'
      ? sources.manager.etas.of(`run:${r.id}`, () => runs.roots(r.id).map((root) => root.drvPath))
      : null;
  const runOf = (r: RunRow) => runObject(r, etaOf(r));
  const pullOf = (repo: string, p: PullRequestRow & { run: RunRow | undefined }) => pullObject(repo, p, runOf);

  router.get('/repos', async (ctx) => {
    const principal = (ctx.state as RequestState).principal;
    const readable = new Set<string>();
    const github = new Map(runs.repositories().map((r) => [r.full_name, r]));
    const evaluated = new Map(evaluations.repositories().map((r) => [r.repo, r.lastEvaluatedAt]));
    const openCount = runs.db.prepare(
      "SELECT COUNT(*) AS n FROM github_pull_requests WHERE repo = ? AND state = 'open'",
    );
    const all = [...new Set([...github.keys(), ...evaluated.keys()])].sort();
    // A logged-in user's private repositories are asked of GitHub (cached): those they can read are listed too.
    for (const name of all)
      if (await access.mayReadRepo(principal, name, sources.repoVisibility(name))) readable.add(name);
    const names = all.filter((name) => readable.has(name));
    ctx.body = {
      repositories: names.map((name) => {
        const g = github.get(name);
        return {
          name,
          github: g !== undefined,
          private: sources.repoVisibility(name) === 'private',
          defaultBranch: g?.default_branch ?? null,
          openPullRequests: g ? (openCount.get(name) as { n: number }).n : 0,
          lastEvaluatedAt: evaluated.get(name) ?? null,
        };
      }),
    };
  });

  router.get('/repos/:owner/:repo/pulls', async (ctx) => {
    const repo = repoOf(ctx);
    const state = queryParam(ctx, 'state') ?? 'open';
    const sort = queryParam(ctx, 'sort') ?? 'updated';
    if (state !== 'open' && state !== 'closed' && state !== 'all') {
      return badRequest(ctx, 400, `state must be open, closed or all, got "${state}"`);
    }
    if (!PULL_SORTS.includes(sort as PullSort)) {
      return badRequest(ctx, 400, `sort must be one of ${PULL_SORTS.join(', ')}, got "${sort}"`);
    }
    if (!(await mayReadRepo(ctx, access, repo, sources.repoVisibility(repo)))) return;
    if (!runs.repository(repo)) return notFound(ctx, `no GitHub App serves ${repo}`);
    const pulls = runs.pullRequests(repo, state).map((p) => pullOf(repo, p));
    ctx.body = { pullRequests: sortPulls(pulls, sort as PullSort) };
  });

  router.get('/repos/:owner/:repo/pulls/:number', async (ctx) => {
    const repo = repoOf(ctx);
    if (!(await mayReadRepo(ctx, access, repo, sources.repoVisibility(repo)))) return;
    const number = numberParam(ctx, 'number');
    const pr = number === undefined ? undefined : runs.pullRequest(repo, number);
    if (!pr) return notFound(ctx, `${repo} has no pull request ${ctx.params.number ?? ''} eka-ci has seen`);
    ctx.body = pullOf(repo, { ...pr, run: runs.latestPullRun(repo, pr.number, pr.head_sha) });
  });

  // A comment command given on the web UI by a logged-in GitHub user (`approve SHA`, `merge [method]`,
  // `merge cancel`, `rebuild`, `build ATTR…`): the rules of the comment, the answer to the caller.
  router.post('/repos/:owner/:repo/pulls/:number/commands', async (ctx) => {
    const repo = repoOf(ctx);
    const principal = (ctx.state as RequestState).principal;
    if (principal.kind !== 'user') {
      ctx.status = principal.kind === 'anonymous' ? 401 : 403;
      ctx.body = {
        error: { code: 'EKACI_ERR_AUTH', message: 'commands are given as a GitHub user: log in with GitHub' },
      };
      return;
    }
    const body = await readJsonBody(ctx, 4096);
    if (body === undefined) return;
    const parsed = commandBody.safeParse(body);
    if (!parsed.success) return badRequest(ctx, 400, `command: ${parsed.error.issues[0]!.message}`);
    const number = numberParam(ctx, 'number');
    const outcome =
      number === undefined ? undefined : await sources.runCommand(repo, number, principal.name, parsed.data.command);
    if (!outcome) return notFound(ctx, `no GitHub App serves ${repo}, or no pull request ${ctx.params.number ?? ''}`);
    ctx.status = outcome.accepted ? 202 : 403;
    ctx.body = outcome.accepted
      ? { accepted: true, message: outcome.message }
      : { error: { code: 'EKACI_ERR_REFUSED', message: outcome.message } };
  });

  // A commit (a unique prefix of 7+ hex digits will do): each job's evaluation in figures, the runs of it (pull
  // requests, pushes, merge groups) with their builds' states, and the reviews recorded with it as head.
  router.get('/repos/:owner/:repo/commits/:sha', async (ctx) => {
    const repo = repoOf(ctx);
    if (!(await mayReadRepo(ctx, access, repo, sources.repoVisibility(repo)))) return;
    const prefix = (ctx.params.sha ?? '').toLowerCase();
    const commit = evaluations.resolveCommit(repo, prefix) ?? runCommit(runs.db, repo, prefix);
    if (!commit) return notFound(ctx, `${repo} has no evaluation or run of a commit ${prefix} (or it is ambiguous)`);
    const reviewed = runs.db
      .prepare('SELECT DISTINCT base_commit FROM rebuild_diffs WHERE repo = ? AND head_commit = ? ORDER BY base_commit')
      .all(repo, commit) as Array<{ base_commit: string }>;
    const buildStates = runs.db.prepare(
      `SELECT d.state, COUNT(*) AS n FROM github_run_roots r JOIN derivations d ON d.drv_path = r.drv_path
        WHERE r.run_id = ? AND r.side = 'head' GROUP BY d.state`,
    );
    ctx.body = {
      repo,
      commit,
      evaluations: evaluations.summaries(repo, commit),
      runs: runs.runsOf({ repo, headSha: commit }).map((r) => ({
        ...runOf(r),
        builds: Object.fromEntries(
          (buildStates.all(r.id) as Array<{ state: string; n: number }>).map((b) => [b.state, b.n]),
        ),
      })),
      reviews: reviewed.map((r) => ({
        base: r.base_commit,
        url: reviewUrl(repo, r.base_commit, commit),
      })),
      checks: sources.checks.resultsOf(repo, commit).map((c) => ({
        ...c,
        logUrl: `/api/v1/repos/${repo}/commits/${commit}/checks/${encodeURIComponent(c.name)}/log?system=${encodeURIComponent(c.system)}`,
      })),
    };
  });

  // A repository check's output (its latest attempt): `Range` reads part of it; `follow=1` (or `Accept:
  // text/event-stream`) follows it live as Server-Sent Events until the check ends. `system` picks one when the
  // check runs on several.
  router.get('/repos/:owner/:repo/commits/:sha/checks/:name/log', async (ctx) => {
    const repo = repoOf(ctx);
    if (!(await mayReadRepo(ctx, access, repo, sources.repoVisibility(repo)))) return;
    const prefix = (ctx.params.sha ?? '').toLowerCase();
    // A whole sha needs no resolving (`ekaci review`'s checks have no run to find it by).
    const whole = /^[0-9a-f]{40}$/.test(prefix) ? prefix : undefined;
    const commit = evaluations.resolveCommit(repo, prefix) ?? runCommit(runs.db, repo, prefix) ?? whole;
    const system = queryParam(ctx, 'system');
    const rows = commit
      ? sources.checks
          .checksOf(repo, commit)
          .filter((c) => c.name === ctx.params.name && (!system || c.system === system))
      : [];
    const row = rows[0];
    if (!row || rows.length > 1) {
      return notFound(
        ctx,
        rows.length > 1
          ? `check ${ctx.params.name ?? ''} runs on ${rows.map((r) => r.system).join(', ')}: name one with ?system=`
          : `${repo} has no check ${ctx.params.name ?? ''} on a commit ${prefix}`,
      );
    }
    if (row.log_path === null) return notFound(ctx, `check ${row.name} has not started (it is ${row.state})`);
    const follow = ctx.query.follow === '1' || ctx.get('Accept').includes('text/event-stream');
    if (!follow) return serveLog(ctx, row.log_path);
    const id = row.id;
    followLogFile(ctx, sources.logs, row.log_path, () => {
      const now = sources.checks.row(id);
      if (!now || !CHECK_TERMINAL_STATES.has(now.state)) return undefined;
      return { attempt: now.attempts, state: now.state, exitCode: now.exit_code, error: now.error };
    });
  });

  // "Rebuild failed" for a commit: its newest run again, failed builds included (writers of the repository).
  router.post('/repos/:owner/:repo/commits/:sha/rebuild-failed', async (ctx) => {
    const repo = repoOf(ctx);
    if (!(await mayActOn(ctx, access, 'builds', [repo]))) return;
    const sha = (ctx.params.sha ?? '').toLowerCase();
    if (!/^[0-9a-f]{40}$/.test(sha)) return badRequest(ctx, 400, 'name the commit by its full sha');
    if (!(await sources.rebuildFailed(repo, sha, actorOf(ctx)))) {
      return conflict(
        ctx,
        `nothing to build again: ${sha} has no run in ${repo}, or is no longer an open pull request's head`,
      );
    }
    ctx.status = 202;
    ctx.body = { repo, commit: sha };
  });

  // A run's builds per agent over time, and its critical path (the timeline page).
  router.get('/runs/:id/timeline', async (ctx) => {
    const id = numberParam(ctx, 'id');
    const run = id === undefined ? undefined : runs.run(id);
    if (!run) return notFound(ctx, `no run ${ctx.params.id ?? ''}`);
    if (!(await mayReadRepo(ctx, access, run.repo, sources.repoVisibility(run.repo)))) return;
    ctx.body = { run: runOf(run), ...(await timelines.timeline(run, () => runs.roots(run.id))) };
  });

  // An attribute's output sizes in each evaluated commit, oldest first (the chart of a review page).
  router.get('/repos/:owner/:repo/attributes/:attr/sizes', async (ctx) => {
    const repo = repoOf(ctx);
    if (!(await mayReadRepo(ctx, access, repo, sources.repoVisibility(repo)))) return;
    const attr = ctx.params.attr ?? '';
    const history = evaluations.attrHistory(repo, attr, queryParam(ctx, 'job'));
    if (history.length === 0) return notFound(ctx, `no evaluation of ${repo} has an attribute ${attr}`);
    const states = store.states(history.flatMap((h) => (h.drvPath ? [h.drvPath] : [])));
    ctx.body = {
      repo,
      attr,
      points: history.map((h) => ({
        commit: h.commit,
        job: h.job,
        evaluatedAt: h.evaluatedAt,
        drvPath: h.drvPath,
        system: h.system,
        error: h.error,
        state: h.drvPath ? (states.get(h.drvPath)?.state ?? null) : null,
        outputs: h.drvPath
          ? store.outputsOf(h.drvPath).map((o) => ({ name: o.name, narSize: o.nar_size, closureSize: o.closure_size }))
          : [],
      })),
    };
  });
}

/** The run of a commit named by a prefix, for a commit that has runs but no evaluation yet (queued, failed). */
function runCommit(db: ApiSources['runs']['db'], repo: string, prefix: string): string | undefined {
  if (!/^[0-9a-f]{7,64}$/.test(prefix)) return undefined;
  const rows = db
    .prepare('SELECT DISTINCT head_sha FROM github_runs WHERE repo = ? AND head_sha >= ? AND head_sha < ? LIMIT 2')
    .all(repo, prefix, `${prefix}\uffff`) as Array<{ head_sha: string }>;
  return rows.length === 1 ? rows[0]!.head_sha : undefined;
}

type Pull = ReturnType<typeof pullObject>;

/** Where the API serves the review of two commits. */
function reviewUrl(repo: string, base: string, head: string): string {
  return `/api/v1/reviews?repo=${encodeURIComponent(repo)}&base=${base}&head=${head}`;
}

const commandBody = z.object({ command: z.string().min(1).max(1000) }).strict();

function runObject(r: RunRow, eta: RunEta | null) {
  const summary = r.summary_json === null ? null : (JSON.parse(r.summary_json) as RunSummary);
  return {
    id: r.id,
    repo: r.repo,
    kind: r.kind,
    prNumber: r.pr_number,
    baseSha: r.base_sha,
    headSha: r.head_sha,
    state: r.state,
    error: r.error,
    untrusted: r.untrusted === 1,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    rebuildCountBySystem: summary?.rebuildCountBySystem ?? null,
    review: summary?.review ?? null,
    eta,
  };
}

function pullObject(
  repo: string,
  p: PullRequestRow & { run: RunRow | undefined },
  runOf: (r: RunRow) => ReturnType<typeof runObject>,
) {
  const run = p.run ? runOf(p.run) : null;
  const rebuilds = run?.rebuildCountBySystem ? Object.values(run.rebuildCountBySystem).reduce((a, b) => a + b, 0) : 0;
  return {
    number: p.number,
    title: p.title,
    author: p.author,
    state: p.state,
    draft: p.draft === 1,
    headSha: p.head_sha,
    baseSha: p.base_sha,
    baseRef: p.base_ref,
    updatedAt: p.updated_at,
    rebuilds,
    newlyFailing: run?.review?.['newly-failing'] ?? null,
    run,
    /** The review of the run's commits, once its diff is recorded. */
    review: run?.baseSha && run.rebuildCountBySystem ? reviewUrl(repo, run.baseSha, run.headSha) : null,
  };
}

function sortPulls(pulls: Pull[], sort: PullSort): Pull[] {
  const key: Record<PullSort, (p: Pull) => number> = {
    updated: (p) => p.updatedAt,
    rebuilds: (p) => p.rebuilds,
    failing: (p) => p.newlyFailing ?? -1,
  };
  return [...pulls].sort((a, b) => key[sort](b) - key[sort](a) || b.updatedAt - a.updatedAt || b.number - a.number);
}
