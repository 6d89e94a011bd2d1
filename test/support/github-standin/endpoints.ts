/**
 * The operations the stand-in implements, keyed by GitHub's operationId. Requests reach a handler only after they
 * were validated against the OpenAPI description, authenticated, and (for repository paths) found to be within
 * the calling installation.
 */
import { createHash } from 'node:crypto';
import { CHECK_RUN_ENDPOINTS } from './check-runs.js';
import { notFound, now, paginate, repoPath, type Endpoint } from './endpoint-kit.js';
import {
  appShape,
  commentShape,
  installationShape,
  permissionShape,
  pullCommitsShape,
  pullShape,
  reactionShape,
  repoShape,
} from './shapes.js';

export const ENDPOINTS: Record<string, Endpoint> = {
  'apps/get-authenticated': { auth: 'app-jwt', handle: (ctx) => ({ status: 200, body: appShape(ctx.api, ctx.state) }) },
  'apps/list-installations': {
    auth: 'app-jwt',
    handle: (ctx) => {
      const all = [...ctx.state.installations.values()].map((i) => installationShape(ctx.api, ctx.state, i));
      const { items, headers } = paginate(ctx, '/app/installations', all);
      return { status: 200, body: items, headers };
    },
  },
  'apps/get-installation': {
    auth: 'app-jwt',
    handle: (ctx) => {
      const installation = ctx.state.installations.get(Number(ctx.params.installation_id));
      return installation ? { status: 200, body: installationShape(ctx.api, ctx.state, installation) } : notFound();
    },
  },
  'apps/get-repo-installation': {
    auth: 'app-jwt',
    handle: (ctx) => {
      const repo = ctx.state.repo(`${ctx.params.owner}/${ctx.params.repo}`);
      const installation = repo && ctx.state.installations.get(repo.installationId);
      return installation ? { status: 200, body: installationShape(ctx.api, ctx.state, installation) } : notFound();
    },
  },
  'apps/create-installation-access-token': {
    auth: 'app-jwt',
    handle: (ctx) => {
      const installation = ctx.state.installations.get(Number(ctx.params.installation_id));
      if (!installation) return notFound();
      const { token, expiresAt } = ctx.auth.issueToken(installation.id);
      const shape = installationShape(ctx.api, ctx.state, installation);
      const body = { token, expires_at: expiresAt.toISOString(), permissions: shape.permissions };
      return { status: 201, body: { ...body, repository_selection: 'selected' } };
    },
  },
  'apps/list-repos-accessible-to-installation': {
    auth: 'installation',
    handle: (ctx) => {
      const mine = [...ctx.state.repos.values()].filter((r) => r.installationId === ctx.installationId);
      const { items, headers } = paginate(ctx, '/installation/repositories', mine);
      const repositories = items.map((r) => repoShape(ctx.api, r));
      return {
        status: 200,
        body: { total_count: mine.length, repository_selection: 'selected', repositories },
        headers,
      };
    },
  },
  'repos/get': { auth: 'installation', handle: (ctx) => ({ status: 200, body: repoShape(ctx.api, ctx.repo!) }) },
  'repos/get-collaborator-permission-level': {
    auth: 'installation',
    handle: (ctx) => {
      const login = ctx.params.username!;
      return { status: 200, body: permissionShape(ctx.api, login, ctx.state.permission(ctx.repo!.fullName, login)) };
    },
  },
  ...CHECK_RUN_ENDPOINTS,
  'issues/create-comment': {
    auth: 'installation',
    handle: (ctx) => {
      const issueNumber = Number(ctx.params.issue_number);
      if (!ctx.state.pull(ctx.repo!.fullName, issueNumber)) return notFound();
      const at = now();
      const comment = {
        id: ctx.state.nextId(),
        body: (ctx.body as { body: string }).body,
        user: ctx.state.botLogin,
        repo: ctx.repo!.fullName,
        issueNumber,
        createdAt: at,
        updatedAt: at,
      };
      ctx.state.comments.push(comment);
      return { status: 201, body: commentShape(ctx.api, comment) };
    },
  },
  'issues/list-comments': {
    auth: 'installation',
    handle: (ctx) => {
      const issueNumber = Number(ctx.params.issue_number);
      if (!ctx.state.pull(ctx.repo!.fullName, issueNumber)) return notFound();
      const all = ctx.state.commentsOn(ctx.repo!.fullName, issueNumber);
      const { items, headers } = paginate(ctx, `${repoPath(ctx)}/issues/${issueNumber}/comments`, all);
      return { status: 200, body: items.map((c) => commentShape(ctx.api, c)), headers };
    },
  },
  'issues/update-comment': {
    auth: 'installation',
    handle: (ctx) => {
      const id = Number(ctx.params.comment_id);
      const comment = ctx.state.comments.find((c) => c.id === id && c.repo === ctx.repo!.fullName);
      if (!comment) return notFound();
      comment.body = (ctx.body as { body: string }).body;
      comment.updatedAt = now();
      return { status: 200, body: commentShape(ctx.api, comment) };
    },
  },
  // Comments that people wrote reach eka-ci by webhook, so the stand-in accepts reactions to any comment id.
  'reactions/create-for-issue-comment': {
    auth: 'installation',
    handle: (ctx) => {
      const commentId = Number(ctx.params.comment_id);
      const content = (ctx.body as { content: string }).content;
      const existing = ctx.state.reactionsTo(ctx.repo!.fullName, commentId).find((r) => r.content === content);
      if (existing) return { status: 200, body: reactionShape(ctx.api, ctx.state, existing) };
      const reaction = { id: ctx.state.nextId(), repo: ctx.repo!.fullName, commentId, content, createdAt: now() };
      ctx.state.reactions.push(reaction);
      return { status: 201, body: reactionShape(ctx.api, ctx.state, reaction) };
    },
  },
  'pulls/get': {
    auth: 'installation',
    handle: (ctx) => {
      const pull = ctx.state.pull(ctx.repo!.fullName, Number(ctx.params.pull_number));
      return pull ? { status: 200, body: pullShape(ctx.api, ctx.state, ctx.repo!.fullName, pull) } : notFound();
    },
  },
  'pulls/list-commits': {
    auth: 'installation',
    handle: (ctx) => {
      const pull = ctx.state.pull(ctx.repo!.fullName, Number(ctx.params.pull_number));
      if (!pull) return notFound();
      const all = pullCommitsShape(ctx.api, ctx.repo!.fullName, pull);
      const { items, headers } = paginate(ctx, `${repoPath(ctx)}/pulls/${pull.number}/commits`, all);
      return { status: 200, body: items, headers };
    },
  },
  'pulls/merge': {
    auth: 'installation',
    handle: (ctx) => {
      const fullName = ctx.repo!.fullName;
      const pull = ctx.state.pull(fullName, Number(ctx.params.pull_number));
      if (!pull) return notFound();
      const body = (ctx.body ?? {}) as { sha?: string; merge_method?: string };
      if ((pull.state ?? 'open') !== 'open' || pull.mergeable === false) {
        return { status: 405, body: { message: 'Pull Request is not mergeable' } };
      }
      if (body.sha !== undefined && body.sha !== pull.headSha) {
        return { status: 409, body: { message: 'Head branch was modified. Review and try the merge again.' } };
      }
      const merge = { number: pull.number, method: body.merge_method ?? 'merge' };
      ctx.state.recordMerge(fullName, body.sha === undefined ? merge : { ...merge, sha: body.sha });
      pull.state = 'closed';
      const sha = createHash('sha1').update(`merge ${fullName}#${pull.number} ${pull.headSha}`).digest('hex');
      return { status: 200, body: { sha, merged: true, message: 'Pull Request successfully merged' } };
    },
  },
};
