import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent } from '../agent/agent.js';
import { silentLogger } from '../common/logging.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import type { CommitEvaluation } from '../coordinator/eval/repo-evaluation.js';
import { isAnonymousRequest } from '../coordinator/http/server.js';
import { startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

/** Who may read what over HTTP (ARCHITECTURE.md §7, "Reading"), on a real coordinator. */

const API_TOKEN = 'ekaci_api-token-for-the-access-tests-0123456789';
const AGENT_TOKEN = 'ekaci_agent-token-for-the-access-tests-0123456789';

let coordinator: Coordinator | undefined;
let agent: Agent | undefined;
afterEach(async () => {
  await agent?.stopNow();
  agent = undefined;
  await coordinator?.stopNow();
  coordinator = undefined;
});

async function start(publicReads: boolean): Promise<Coordinator> {
  coordinator = await startCoordinator(tempDir(), {
    web: { port: 0, public: publicReads },
    api_tokens: [{ name: 'dashboard', token: API_TOKEN }],
    agent_tokens: [{ name: 'builder', token: AGENT_TOKEN }],
  });
  return coordinator;
}

// A value for each path parameter, so that every route can be called.
const SAMPLES: Record<string, string> = {
  '{*path}': 'nix-cache-info',
  ':hash': '0'.repeat(32),
  ':attempt': '1',
  ':id': '1',
};

function concrete(path: string): string {
  return Object.entries(SAMPLES).reduce((p, [k, v]) => p.replace(k, v), path);
}

function call(method: string, path: string, token?: string): Promise<Response> {
  const url = `http://127.0.0.1:${coordinator!.httpPort}${concrete(path)}`;
  return fetch(url, {
    method,
    headers: token ? { authorization: `Bearer ${token}` } : {},
    ...(method === 'PUT' || method === 'POST' ? { body: 'x' } : {}),
  });
}

/** Two evaluations of `repo` with one changed real derivation, recorded as a run or `ekaci review` would. */
async function recordReview(c: Coordinator, repo: string): Promise<{ base: string; head: string }> {
  const drv = async (body: string): Promise<string> =>
    (
      await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, writeNixFile(tempDir(), nonce(), body), '-A', 'x'])
    ).trim();
  const side = (commit: string, drvPath: string): CommitEvaluation => ({
    commit,
    configDigest: 'same',
    jobs: [
      {
        name: 'pkgs',
        allowEvalFailures: false,
        maxIncreasePercent: undefined,
        seconds: 0,
        attrs: [{ attr: 'x', drvPath, system: 'x86_64-linux', outputs: {} }],
      },
    ],
  });
  const base = side('a'.repeat(40), await drv('{ x = mk "x" {}; }'));
  const head = side('b'.repeat(40), await drv('{ x = mk "x2" {}; }'));
  await c.reviews.record(repo, base, head);
  return { base: base.commit, head: head.commit };
}

describe('reading the coordinator', () => {
  it('refuses anonymous callers on every route of a coordinator that is not public, but for probes, webhooks and the web UI’s files', async () => {
    const c = await start(false);
    expect(c.routes.length).toBeGreaterThan(5);
    for (const { method, path } of c.routes) {
      const open = isAnonymousRequest(method, concrete(path));
      const r = await call(method, path);
      if (open) expect(r.status, `${method} ${path}`).not.toBe(401);
      else expect(r.status, `${method} ${path}`).toBe(401);
    }
    // A credential passes the gate (what it then finds is another matter: 404 for a sample that does not exist).
    for (const { method, path } of c.routes.filter((r) => r.method === 'GET')) {
      const r = await call(method, path, API_TOKEN);
      expect(r.status, `${method} ${path} with an API token`).not.toBe(401);
    }
    expect((await call('GET', '/cache/nix-cache-info', AGENT_TOKEN)).status).toBe(200);
    expect((await call('GET', '/metrics', API_TOKEN)).status).toBe(200);
  });

  it('serves a private repository’s review only with a credential, even on a public coordinator', async () => {
    const c = await start(true);
    c.db
      .prepare(
        `INSERT INTO github_repositories (full_name, installation_id, clone_url, default_branch, private, updated_at)
         VALUES (?, 1, 'x', 'main', ?, 0)`,
      )
      .run('acme/secret', 1);
    c.db
      .prepare(
        `INSERT INTO github_repositories (full_name, installation_id, clone_url, default_branch, private, updated_at)
         VALUES (?, 1, 'x', 'main', ?, 0)`,
      )
      .run('acme/open', 0);
    const secret = await recordReview(c, 'acme/secret');
    const open = await recordReview(c, 'acme/open');
    const review = (repo: string, pair: { base: string; head: string }, token?: string) =>
      call('GET', `/api/v1/reviews?repo=${encodeURIComponent(repo)}&base=${pair.base}&head=${pair.head}`, token);

    expect((await review('acme/secret', secret)).status).toBe(401);
    expect((await review('acme/secret', secret, API_TOKEN)).status).toBe(200);
    expect((await review('acme/open', open)).status).toBe(200);
  });

  it('never computes a review nobody recorded, whoever asks', async () => {
    const c = await start(true);
    c.db
      .prepare(
        `INSERT INTO github_repositories (full_name, installation_id, clone_url, default_branch, private, updated_at)
         VALUES ('acme/open', 1, 'x', 'main', 0, 0)`,
      )
      .run();
    const recorded = await recordReview(c, 'acme/open');
    // Both commits are evaluated, but head → base was never asked for by a run.
    const reversed = await call(
      'GET',
      `/api/v1/reviews?repo=acme%2Fopen&base=${recorded.head}&head=${recorded.base}`,
      API_TOKEN,
    );
    expect(reversed.status).toBe(404);
    const diffs = c.db.prepare('SELECT COUNT(*) AS n FROM rebuild_diffs').get() as { n: number };
    expect(diffs.n).toBe(1);
  });

  it('finds a derivation only by its whole hash, so nobody can walk them by prefix', async () => {
    const c = await start(true);
    const drv = (
      await runNixChecked('nix-instantiate', [
        ...NO_SUBSTITUTERS,
        writeNixFile(tempDir(), nonce(), '{ x = mk "x" {}; }'),
        '-A',
        'x',
      ])
    ).trim();
    await c.manager.submit([{ attr: 'x', drvPath: drv }], 'test', { private: false });
    const hash = drv.slice('/nix/store/'.length, '/nix/store/'.length + 32);
    expect((await call('GET', `/api/v1/derivations/${hash}`)).status).toBe(200);
    expect((await call('GET', `/api/v1/derivations/${hash.slice(0, 8)}`)).status).toBe(404);
  });
});

describe('submitting builds through the API', () => {
  const submit = (body: string, token?: string, type = 'application/json'): Promise<Response> =>
    fetch(`http://127.0.0.1:${coordinator!.httpPort}/api/v1/builds`, {
      method: 'POST',
      headers: { 'content-type': type, ...(token ? { authorization: `Bearer ${token}` } : {}) },
      body,
    });
  const instantiate = async (body: string): Promise<string> =>
    (
      await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, writeNixFile(tempDir(), nonce(), body), '-A', 'x'])
    ).trim();

  it('takes them from an API token only, even on a public coordinator, and audits who asked', async () => {
    const c = await start(true);
    const drv = await instantiate('{ x = mk "x" { script = "echo built > $out"; }; }');
    const body = JSON.stringify({ drvs: [drv] });

    expect((await submit(body)).status).toBe(401);
    expect((await submit(body, AGENT_TOKEN)).status).toBe(403);
    expect(c.store.derivation(drv)).toBeUndefined();

    agent = new Agent({
      coordinator: c.grpcTarget,
      token: c.localAgentToken('local'),
      spoolDir: join(tempDir(), 'spool'),
      logger: silentLogger(),
    });
    await agent.start();
    const r = await submit(body, API_TOKEN);
    expect(r.status).toBe(202);
    const { id, url } = (await r.json()) as { id: number; url: string };
    expect(url).toBe(`/api/v1/requests/${id}`);
    const [result] = await c.manager.waitFor(id);
    expect(result).toMatchObject({ drvPath: drv, state: 'succeeded' });
    const followed = (await (await fetch(`http://127.0.0.1:${c.httpPort}${url}`)).json()) as { settled: boolean };
    expect(followed.settled).toBe(true);
    const audit = c.audit.recent().find((a) => a.action === 'api.builds-submitted');
    expect(audit).toMatchObject({ actor: 'api:dashboard' });
    expect(JSON.parse(audit!.detail)).toEqual({ request: id, roots: 1 });
  });

  it.each([
    ['not JSON', '{"drvs": [', 'application/json', 400, /not JSON/],
    ['another content type', '{}', 'text/plain', 415, /application\/json/],
    ['no derivation', '{"drvs": []}', 'application/json', 400, /drvs/],
    [
      'an unknown key',
      '{"drvs": ["/nix/store/00000000000000000000000000000000-x.drv"], "x": 1}',
      'application/json',
      400,
      /x/,
    ],
    ['a path that is no .drv', '{"drvs": ["/etc/passwd"]}', 'application/json', 400, /drvs.0: a .drv store path/],
    [
      'a .drv missing from the store',
      '{"drvs": ["/nix/store/00000000000000000000000000000000-x.drv"]}',
      'application/json',
      422,
      /neither in the coordinator's store nor in its cache: \/nix\/store\/0{32}-x.drv/,
    ],
  ])('refuses %s, saying why, and builds nothing', async (_what, body, type, status, message) => {
    const c = await start(true);
    const r = await submit(body, API_TOKEN, type);
    expect(r.status).toBe(status);
    expect(((await r.json()) as { error: { message: string } }).error.message).toMatch(message);
    expect(c.audit.recent().some((a) => a.action === 'api.builds-submitted')).toBe(false);
  });
});
