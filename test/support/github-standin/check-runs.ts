/** Check runs: created, updated and listed as GitHub's Checks API does for a GitHub App. */
import { notFound, now, paginate, repoPath, type Context, type Endpoint, type Reply } from './endpoint-kit.js';
import { checkRunShape } from './shapes.js';
import type { CheckRun } from './state.js';

interface CheckRunBody {
  name?: string;
  head_sha?: string;
  details_url?: string;
  external_id?: string;
  status?: string;
  conclusion?: string;
  started_at?: string;
  completed_at?: string;
  output?: { title?: string; summary?: string; text?: string };
  actions?: unknown[];
}

/** Applies a create or update body the way GitHub does: a conclusion implies `completed`, which needs one. */
function applyCheckRun(run: CheckRun, body: CheckRunBody): string[] {
  if (body.name !== undefined) run.name = body.name;
  if (body.details_url !== undefined) run.detailsUrl = body.details_url;
  if (body.external_id !== undefined) run.externalId = body.external_id;
  if (body.started_at !== undefined) run.startedAt = body.started_at;
  if (body.output !== undefined) run.output = { ...body.output };
  if (body.actions !== undefined) run.actions = [...body.actions];
  if (body.status !== undefined) run.status = body.status;
  if (body.conclusion !== undefined) {
    run.conclusion = body.conclusion;
    run.status = 'completed';
  }
  if (run.status === 'completed') run.completedAt = body.completed_at ?? run.completedAt ?? now();
  return run.status === 'completed' && run.conclusion === null
    ? ['conclusion is required when status is completed']
    : [];
}

function checkRunReply(ctx: Context, status: number, run: CheckRun, errors: string[]): Reply {
  if (errors.length) return { status: 422, body: { message: `Invalid request.\n\n${errors.join('\n')}` }, errors };
  return { status, body: checkRunShape(ctx.api, ctx.state, run) };
}

function findCheckRun(ctx: Context): CheckRun | undefined {
  const id = Number(ctx.params.check_run_id);
  return ctx.state.checkRunsOf(ctx.repo!.fullName).find((c) => c.id === id);
}

/** The latest run of each name, as `filter=latest` (GitHub's default) lists them. */
function latestByName(runs: CheckRun[]): CheckRun[] {
  const latest = new Map<string, CheckRun>();
  for (const run of runs) if ((latest.get(run.name)?.id ?? -1) < run.id) latest.set(run.name, run);
  return [...latest.values()];
}

export const CHECK_RUN_ENDPOINTS: Record<string, Endpoint> = {
  'checks/create': {
    auth: 'installation',
    handle: (ctx) => {
      const body = ctx.body as CheckRunBody & { name: string; head_sha: string };
      const run: CheckRun = {
        id: ctx.state.nextId(),
        repo: ctx.repo!.fullName,
        headSha: body.head_sha,
        name: body.name,
        status: 'queued',
        conclusion: null,
        output: {},
        actions: [],
        updates: 0,
        startedAt: now(),
        completedAt: null,
      };
      const errors = applyCheckRun(run, body);
      if (!errors.length) ctx.state.checkRuns.push(run);
      return checkRunReply(ctx, 201, run, errors);
    },
  },
  'checks/update': {
    auth: 'installation',
    handle: (ctx) => {
      const existing = findCheckRun(ctx);
      if (!existing) return notFound();
      const run = { ...existing, output: { ...existing.output }, updates: existing.updates + 1 };
      const errors = applyCheckRun(run, ctx.body as CheckRunBody);
      if (!errors.length) Object.assign(existing, run);
      return checkRunReply(ctx, 200, existing, errors);
    },
  },
  'checks/get': {
    auth: 'installation',
    handle: (ctx) => {
      const run = findCheckRun(ctx);
      return run ? { status: 200, body: checkRunShape(ctx.api, ctx.state, run) } : notFound();
    },
  },
  'checks/list-for-ref': {
    auth: 'installation',
    handle: (ctx) => {
      const sha = ctx.state.resolveRef(ctx.repo!.fullName, ctx.params.ref!);
      let runs = ctx.state.checkRunsOf(ctx.repo!.fullName, sha);
      if (ctx.query.check_name !== undefined) runs = runs.filter((r) => r.name === ctx.query.check_name);
      if (ctx.query.status !== undefined) runs = runs.filter((r) => r.status === ctx.query.status);
      if ((ctx.query.filter ?? 'latest') === 'latest') runs = latestByName(runs);
      const { items, headers } = paginate(ctx, `${repoPath(ctx)}/commits/${ctx.params.ref}/check-runs`, runs);
      const checkRuns = items.map((r) => checkRunShape(ctx.api, ctx.state, r));
      return { status: 200, body: { total_count: runs.length, check_runs: checkRuns }, headers };
    },
  },
};
