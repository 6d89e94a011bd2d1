import { generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { createServer, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { App } from '@octokit/app';
import { Octokit } from '@octokit/core';
import { verify as verifyWebhookSignature } from '@octokit/webhooks-methods';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  deliverWebhook,
  signWebhook,
  startGitHubStandIn,
  webhookExamples,
  type GitHubStandIn,
} from './support/github-standin.js';

const HEAD = 'a'.repeat(40);
const BASE = 'b'.repeat(40);
let standIn: GitHubStandIn;

function appJwt(claims: Record<string, unknown> = {}, key: string | KeyObject = standIn.privateKey): string {
  const now = Math.floor(Date.now() / 1000);
  const part = (value: unknown) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const unsigned = `${part({ alg: 'RS256', typ: 'JWT' })}.${part({ iat: now - 30, exp: now + 540, iss: standIn.appId, ...claims })}`;
  return `${unsigned}.${sign('RSA-SHA256', Buffer.from(unsigned), key).toString('base64url')}`;
}

async function call(
  method: string,
  path: string,
  options: { auth?: string; body?: unknown; rawBody?: string } = {},
): Promise<{ status: number; body: Record<string, unknown> & { message?: string }; headers: Headers }> {
  const headers: Record<string, string> = { accept: 'application/vnd.github+json' };
  if (options.auth) headers.authorization = options.auth;
  let body = options.rawBody;
  if (options.body !== undefined) {
    body = JSON.stringify(options.body);
    headers['content-type'] = 'application/json; charset=utf-8';
  }
  const res = await fetch(`${standIn.url}${path}`, { method, headers, body });
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : {}, headers: res.headers };
}

async function installationToken(installationId = 1): Promise<string> {
  const res = await call('POST', `/app/installations/${installationId}/access_tokens`, { auth: `Bearer ${appJwt()}` });
  expect(res.status).toBe(201);
  return `token ${String(res.body.token)}`;
}

beforeAll(async () => {
  standIn = await startGitHubStandIn({ appId: 777 });
  standIn.addInstallation(1, 'nixos');
  standIn.addInstallation(2, 'elsewhere');
  standIn.addRepo({ owner: 'nixos', name: 'nixpkgs', installationId: 1, cloneUrl: 'http://127.0.0.1:1/nixos/nixpkgs' });
  standIn.addRepo({ owner: 'elsewhere', name: 'secret', installationId: 2, private: true });
  standIn.addPull('nixos/nixpkgs', {
    number: 7,
    title: 'hello: 2.12 -> 2.13',
    user: 'alice',
    authorAssociation: 'CONTRIBUTOR',
    headSha: HEAD,
    headRef: 'hello-update',
    headRepo: 'alice/nixpkgs',
    baseSha: BASE,
    baseRef: 'master',
    commits: [
      { sha: 'c'.repeat(40), message: 'hello: 2.12 -> 2.13' },
      { sha: HEAD, message: 'hello: fix tests' },
    ],
  });
  standIn.addPull('nixos/nixpkgs', {
    number: 8,
    title: 'conflicted',
    user: 'bob',
    authorAssociation: 'MEMBER',
    headSha: 'd'.repeat(40),
    headRef: 'x',
    baseSha: BASE,
    baseRef: 'master',
    mergeable: false,
  });
});
afterAll(async () => {
  await standIn.close();
});
afterEach(() => {
  // Tests that send invalid requests on purpose clear what they sent; anything left is a stand-in defect.
  expect(standIn.invalid.splice(0)).toEqual([]);
});

describe('GitHub stand-in: app authentication', () => {
  it('refuses app endpoints without a JWT signed by the app key, from the app, and unexpired', async () => {
    const other = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey;
    const now = Math.floor(Date.now() / 1000);
    for (const auth of [
      undefined,
      `Bearer ${appJwt({}, other)}`,
      `Bearer ${appJwt({ iss: 778 })}`,
      `Bearer ${appJwt({ iat: now - 700, exp: now - 60 })}`,
      `Bearer ${appJwt({ exp: now + 3600 })}`,
    ]) {
      const res = await call('GET', '/app', { auth });
      expect(res.status, auth).toBe(401);
      expect(res.body.documentation_url).toMatch(/^https:\/\/docs\.github\.com/);
    }
    const ok = await call('GET', '/app', { auth: `Bearer ${appJwt()}` });
    expect(ok.status).toBe(200);
    expect(ok.body).toMatchObject({ id: 777, slug: 'eka-ci-test' });
  });

  it('issues an hour-long ghs_ installation token that reaches only that installation’s repositories', async () => {
    const res = await call('POST', '/app/installations/1/access_tokens', { auth: `Bearer ${appJwt()}` });
    expect(res.body.token).toMatch(/^ghs_[A-Za-z0-9]{36}$/);
    const lifetime = Date.parse(String(res.body.expires_at)) - Date.now();
    expect(lifetime).toBeGreaterThan(59 * 60 * 1000);
    expect(lifetime).toBeLessThanOrEqual(60 * 60 * 1000);
    const token = `token ${String(res.body.token)}`;

    const listed = await call('GET', '/installation/repositories', { auth: token });
    expect(listed.body).toMatchObject({ total_count: 1, repositories: [{ full_name: 'nixos/nixpkgs' }] });
    expect((await call('GET', '/repos/nixos/nixpkgs', { auth: token.replace('token', 'Bearer') })).status).toBe(200);
    expect((await call('GET', '/repos/elsewhere/secret', { auth: token })).status).toBe(404);
    expect((await call('GET', '/repos/nixos/unknown', { auth: token })).status).toBe(404);
    expect((await call('GET', '/repos/nixos/nixpkgs', { auth: 'token ghs_unknown' })).status).toBe(401);
    expect((await call('GET', '/repos/nixos/nixpkgs', { auth: `Bearer ${appJwt()}` })).status).toBe(401);
    expect((await call('GET', '/app', { auth: token })).status).toBe(401);
    const unknownToken = standIn.requests.at(-3)!;
    expect(unknownToken).toMatchObject({ auth: 'installation', status: 401 });
    expect(unknownToken.installationId).toBeUndefined();
  });

  it('finds the installation of a repository, and 404s where the app is not installed', async () => {
    const auth = `Bearer ${appJwt()}`;
    expect((await call('GET', '/repos/nixos/nixpkgs/installation', { auth })).body).toMatchObject({
      id: 1,
      app_id: 777,
    });
    expect((await call('GET', '/repos/nobody/nothing/installation', { auth })).status).toBe(404);
    expect((await call('GET', '/app/installations', { auth })).body).toHaveLength(2);
    expect((await call('POST', '/app/installations/99/access_tokens', { auth })).status).toBe(404);
  });
});

describe('GitHub stand-in: validation against the OpenAPI description', () => {
  it('answers an unknown path with 404 and records it as invalid', async () => {
    const res = await call('GET', '/repos/nixos/nixpkgs/no-such-thing', { auth: await installationToken() });
    expect(res.status).toBe(404);
    expect(standIn.invalid).toHaveLength(1);
    expect(standIn.invalid[0]!.errors[0]).toContain('GET /repos/nixos/nixpkgs/no-such-thing');
    standIn.invalid.length = 0;
  });

  it('answers a body that breaks the schema with 422 naming each broken field, and records the reasons', async () => {
    const auth = await installationToken();
    const res = await call('POST', '/repos/nixos/nixpkgs/check-runs', {
      auth,
      body: { name: 7, status: 'done', detail_url: 'https://x', output: { title: 't' } },
    });
    expect(res.status).toBe(422);
    expect(res.body.documentation_url).toContain('checks#create-a-check-run');
    const errors = standIn.invalid[0]!.errors;
    expect(errors).toEqual(
      expect.arrayContaining([
        "body must have required property 'head_sha'",
        'body/name must be string',
        expect.stringMatching(/^body\/status must be equal to one of the allowed values/),
        'body must NOT have additional properties (detail_url)',
        "body/output must have required property 'summary'",
      ]),
    );
    expect(standIn.invalid[0]).toMatchObject({ operationId: 'checks/create', status: 422 });
    standIn.invalid.length = 0;
  });

  it('checks path and query parameters against their declared types, and refuses undeclared ones', async () => {
    const auth = await installationToken();
    expect((await call('GET', '/repos/nixos/nixpkgs/check-runs/abc', { auth })).status).toBe(422);
    expect((await call('GET', `/repos/nixos/nixpkgs/commits/${HEAD}/check-runs?per_page=x`, { auth })).status).toBe(
      422,
    );
    expect((await call('GET', `/repos/nixos/nixpkgs/commits/${HEAD}/check-runs?perpage=5`, { auth })).status).toBe(422);
    expect(standIn.invalid.map((r) => r.errors)).toEqual([
      ['path/check_run_id must be integer'],
      ['query/per_page must be integer'],
      ['query must NOT have additional properties (perpage)'],
    ]);
    standIn.invalid.length = 0;
    expect((await call('GET', `/repos/nixos/nixpkgs/commits/${HEAD}/check-runs?per_page=5`, { auth })).status).toBe(
      200,
    );
  });

  it('accepts null where the description marks a field nullable (OpenAPI 3.0), and nowhere else', async () => {
    const auth = await installationToken();
    const ok = await call('PATCH', '/repos/nixos/nixpkgs/issues/7', { auth, body: { body: null, milestone: null } });
    expect(ok).toMatchObject({ status: 501, body: { message: 'stand-in does not implement issues/update' } });
    expect((await call('PUT', '/repos/nixos/nixpkgs/pulls/8/merge', { auth, rawBody: 'null' })).status).toBe(405);
    expect((await call('PATCH', '/repos/nixos/nixpkgs/issues/7', { auth, body: { state: null } })).status).toBe(422);
    expect(standIn.invalid).toHaveLength(1);
    standIn.invalid.length = 0;
  });

  it('answers a body that is not JSON with 400, as GitHub does', async () => {
    const auth = await installationToken();
    const res = await call('POST', '/repos/nixos/nixpkgs/issues/7/comments', { auth, rawBody: '{oops' });
    expect(res).toMatchObject({ status: 400, body: { message: 'Problems parsing JSON' } });
    expect(standIn.invalid).toHaveLength(1);
    standIn.invalid.length = 0;
  });
});

describe('GitHub stand-in: repository operations', () => {
  it('creates, updates, gets and lists check runs, counting updates and keeping only the latest of each name', async () => {
    const auth = await installationToken();
    const created = await call('POST', '/repos/nixos/nixpkgs/check-runs', {
      auth,
      body: {
        name: 'eka-ci',
        head_sha: HEAD,
        status: 'in_progress',
        external_id: 'eval-1',
        details_url: 'https://ci/1',
      },
    });
    expect(created).toMatchObject({ status: 201, body: { name: 'eka-ci', head_sha: HEAD, status: 'in_progress' } });
    const id = created.body.id as number;
    expect(typeof id).toBe('number');
    const actions = [{ label: 'Merge', description: 'Merge when green', identifier: 'merge' }];
    await call('PATCH', `/repos/nixos/nixpkgs/check-runs/${id}`, {
      auth,
      body: { output: { title: 'T', summary: 'S' } },
    });
    const done = await call('PATCH', `/repos/nixos/nixpkgs/check-runs/${id}`, {
      auth,
      body: { conclusion: 'success', actions },
    });
    expect(done.body).toMatchObject({
      status: 'completed',
      conclusion: 'success',
      output: { title: 'T', summary: 'S' },
    });
    expect(typeof done.body.completed_at).toBe('string');
    await call('POST', '/repos/nixos/nixpkgs/check-runs', { auth, body: { name: 'eka-ci', head_sha: HEAD } });

    expect((await call('GET', `/repos/nixos/nixpkgs/check-runs/${id}`, { auth })).body).toMatchObject({
      id,
      conclusion: 'success',
    });
    const latest = await call('GET', `/repos/nixos/nixpkgs/commits/${HEAD}/check-runs`, { auth });
    expect(latest.body).toMatchObject({ total_count: 1, check_runs: [{ status: 'queued' }] });
    const all = await call('GET', `/repos/nixos/nixpkgs/commits/${HEAD}/check-runs?filter=all`, { auth });
    expect(all.body.total_count).toBe(2);
    const [first] = standIn.checkRuns('nixos/nixpkgs', HEAD);
    expect(first).toMatchObject({ id, updates: 2, externalId: 'eval-1', detailsUrl: 'https://ci/1', actions });
  });

  it('refuses a completed check run without a conclusion with 422', async () => {
    const auth = await installationToken();
    const res = await call('POST', '/repos/nixos/nixpkgs/check-runs', {
      auth,
      body: { name: 'x', head_sha: BASE, status: 'completed' },
    });
    expect(res.status).toBe(422);
    expect(standIn.invalid[0]!.errors).toEqual(['conclusion is required when status is completed']);
    expect(standIn.checkRuns('nixos/nixpkgs', BASE)).toEqual([]);
    standIn.invalid.length = 0;
  });

  it('records comments (404 on unknown issues) and reactions, and edits its own comments', async () => {
    const auth = await installationToken();
    const posted = await call('POST', '/repos/nixos/nixpkgs/issues/7/comments', { auth, body: { body: 'Review: ok' } });
    expect(posted).toMatchObject({
      status: 201,
      body: { body: 'Review: ok', user: { login: 'eka-ci-test[bot]', type: 'Bot' } },
    });
    const id = posted.body.id as number;
    await call('PATCH', `/repos/nixos/nixpkgs/issues/comments/${id}`, { auth, body: { body: 'Review: failed' } });
    expect(standIn.comments('nixos/nixpkgs', 7)).toEqual([{ id, body: 'Review: failed', user: 'eka-ci-test[bot]' }]);
    expect((await call('POST', '/repos/nixos/nixpkgs/issues/99/comments', { auth, body: { body: 'x' } })).status).toBe(
      404,
    );

    const reacted = await call('POST', '/repos/nixos/nixpkgs/issues/comments/555/reactions', {
      auth,
      body: { content: 'eyes' },
    });
    const again = await call('POST', '/repos/nixos/nixpkgs/issues/comments/555/reactions', {
      auth,
      body: { content: 'eyes' },
    });
    expect([reacted.status, again.status]).toEqual([201, 200]);
    await call('POST', '/repos/nixos/nixpkgs/issues/comments/555/reactions', { auth, body: { content: '+1' } });
    expect(standIn.reactions('nixos/nixpkgs', 555)).toEqual(['eyes', '+1']);
  });

  it('reports collaborator permissions with GitHub’s legacy level next to the role', async () => {
    const auth = await installationToken();
    standIn.setPermission('nixos/nixpkgs', 'carol', 'maintain');
    const carol = await call('GET', '/repos/nixos/nixpkgs/collaborators/carol/permission', { auth });
    expect(carol.body).toMatchObject({ permission: 'write', role_name: 'maintain', user: { login: 'carol' } });
    const stranger = await call('GET', '/repos/nixos/nixpkgs/collaborators/mallory/permission', { auth });
    expect(stranger.body).toMatchObject({ permission: 'read', role_name: 'read' });
  });

  it('serves pull requests with fork heads, and their commits', async () => {
    const auth = await installationToken();
    const pull = await call('GET', '/repos/nixos/nixpkgs/pulls/7', { auth });
    expect(pull.body).toMatchObject({
      number: 7,
      state: 'open',
      author_association: 'CONTRIBUTOR',
      head: { sha: HEAD, ref: 'hello-update', repo: { full_name: 'alice/nixpkgs', fork: true } },
      base: {
        sha: BASE,
        ref: 'master',
        repo: { full_name: 'nixos/nixpkgs', clone_url: 'http://127.0.0.1:1/nixos/nixpkgs' },
      },
    });
    const commits = await call('GET', '/repos/nixos/nixpkgs/pulls/7/commits?per_page=1', { auth });
    expect(commits.body).toMatchObject([{ sha: 'c'.repeat(40), parents: [{ sha: BASE }] }]);
    expect(commits.headers.get('link')).toContain('rel="next"');
    expect((await call('GET', '/repos/nixos/nixpkgs/pulls/1', { auth })).status).toBe(404);
  });

  it('merges only a mergeable pull request whose head matches the given sha, and records the merge', async () => {
    const auth = await installationToken();
    expect((await call('PUT', '/repos/nixos/nixpkgs/pulls/8/merge', { auth, body: {} })).status).toBe(405);
    const stale = await call('PUT', '/repos/nixos/nixpkgs/pulls/7/merge', { auth, body: { sha: BASE } });
    expect(stale.status).toBe(409);
    const merged = await call('PUT', '/repos/nixos/nixpkgs/pulls/7/merge', {
      auth,
      body: { sha: HEAD, merge_method: 'squash' },
    });
    expect(merged).toMatchObject({ status: 200, body: { merged: true } });
    expect(standIn.merges('nixos/nixpkgs')).toEqual([{ number: 7, method: 'squash', sha: HEAD }]);
    expect((await call('GET', '/repos/nixos/nixpkgs/pulls/7', { auth })).body).toMatchObject({
      state: 'closed',
      merged: true,
    });
    expect((await call('PUT', '/repos/nixos/nixpkgs/pulls/7/merge', { auth, body: {} })).status).toBe(405);
  });

  it('answers a valid operation it does not implement with 501 naming it, and records it', async () => {
    const auth = await installationToken();
    const res = await call('GET', '/repos/nixos/nixpkgs/branches', { auth });
    expect(res).toMatchObject({ status: 501, body: { message: 'stand-in does not implement repos/list-branches' } });
    expect(standIn.requests.at(-1)).toMatchObject({ operationId: 'repos/list-branches', status: 501 });
  });
});

describe('GitHub stand-in: failures and rate limits', () => {
  it('gives the next matching requests an injected response, then serves normally', async () => {
    const auth = await installationToken();
    standIn.failNext(
      { method: 'GET', pathPrefix: '/repos/nixos/nixpkgs/pulls' },
      { status: 502, body: { message: 'Bad gateway' } },
      2,
    );
    expect((await call('GET', '/repos/nixos/nixpkgs', { auth })).status).toBe(200);
    expect((await call('GET', '/repos/nixos/nixpkgs/pulls/8', { auth })).status).toBe(502);
    const retryAfter = await call('GET', '/repos/nixos/nixpkgs/pulls/8', { auth });
    expect(retryAfter).toMatchObject({ status: 502, body: { message: 'Bad gateway' } });
    expect((await call('GET', '/repos/nixos/nixpkgs/pulls/8', { auth })).status).toBe(200);
  });

  it('reports the budget in x-ratelimit headers and refuses with 403 once spent, until the reset', async () => {
    const auth = await installationToken();
    // At least a whole second away: a reset one second up from a clock at x.999 s would pass before the next call.
    const reset = Math.floor(Date.now() / 1000) + 2;
    standIn.setRateLimit(1, reset);
    const last = await call('GET', '/repos/nixos/nixpkgs', { auth });
    expect([last.status, last.headers.get('x-ratelimit-remaining'), last.headers.get('x-ratelimit-reset')]).toEqual([
      200,
      '0',
      String(reset),
    ]);
    const refused = await call('GET', '/repos/nixos/nixpkgs', { auth });
    expect(refused.status).toBe(403);
    expect(refused.body.message).toMatch(/^API rate limit exceeded for installation ID 1\./);
    await standIn.waitFor(() => Date.now() >= reset * 1000, 'the rate-limit reset');
    const refilled = await call('GET', '/repos/nixos/nixpkgs', { auth });
    expect([refilled.status, refilled.headers.get('x-ratelimit-remaining')]).toEqual([200, '4999']);
  });
});

describe('GitHub stand-in with real Octokit clients', () => {
  it('serves @octokit/app: JWT, installation token, and installation requests', async () => {
    const app = new App({
      appId: standIn.appId,
      privateKey: standIn.privateKey,
      Octokit: Octokit.defaults({ baseUrl: standIn.url }),
    });
    const { data } = await app.octokit.request('GET /repos/{owner}/{repo}/installation', {
      owner: 'nixos',
      repo: 'nixpkgs',
    });
    const octokit = await app.getInstallationOctokit(data.id);
    const repo = await octokit.request('GET /repos/{owner}/{repo}', { owner: 'nixos', repo: 'nixpkgs' });
    expect(repo.data.default_branch).toBe('main');
    const run = await octokit.request('POST /repos/{owner}/{repo}/check-runs', {
      owner: 'nixos',
      repo: 'nixpkgs',
      name: 'octokit',
      head_sha: BASE,
    });
    expect(run.status).toBe(201);
    expect(standIn.requests.filter((r) => r.operationId === 'apps/create-installation-access-token').at(-1)?.auth).toBe(
      'app-jwt',
    );
  });
});

describe('webhook helpers', () => {
  it('delivers GitHub’s example payloads with the headers and signature GitHub sends', async () => {
    const received: Array<{ headers: IncomingMessage['headers']; body: string }> = [];
    const server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        received.push({ headers: req.headers, body: Buffer.concat(chunks).toString('utf8') });
        res.writeHead(202).end('accepted');
      });
    });
    server.listen(0, '127.0.0.1');
    await new Promise<void>((resolve) => server.once('listening', resolve));
    try {
      const [payload] = webhookExamples('pull_request', 'opened');
      expect(payload).toMatchObject({ action: 'opened', pull_request: { number: expect.any(Number) as number } });
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/webhook`;
      const res = await deliverWebhook(url, 's3cret', 'pull_request', payload, { deliveryId: 'd-1' });
      expect(res).toEqual({ status: 202, body: 'accepted' });
      const [got] = received;
      expect(got!.headers).toMatchObject({ 'x-github-event': 'pull_request', 'x-github-delivery': 'd-1' });
      expect(await verifyWebhookSignature('s3cret', got!.body, String(got!.headers['x-hub-signature-256']))).toBe(true);
      expect(signWebhook('s3cret', got!.body)).toBe(got!.headers['x-hub-signature-256']);
    } finally {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });

  it('finds examples by event and action, as copies, and throws for an event with none', () => {
    expect(webhookExamples('issue_comment', 'created').every((p) => p.action === 'created')).toBe(true);
    webhookExamples('installation')[0]!.action = 'mutated';
    expect(webhookExamples('installation')[0]!.action).not.toBe('mutated');
    expect(() => webhookExamples('no_such_event')).toThrow(/no no_such_event payload/);
  });
});
