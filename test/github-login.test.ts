import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { EmbeddedSystem } from '../cli/embedded.js';
import { sseEvents } from '../common/sse.js';
import { checkedFetch } from './support/api-contract.js';
import { freePort } from './support/coordinator-harness.js';
import { FakeGitHub, deliver, startGitHubCoordinator } from './support/github-app.js';
import { tempDir } from './support/nix-project.js';

/** Logging in to the web UI with GitHub (the stand-in's OAuth web flow), and what a login may change. */

const ROOT = join(import.meta.dirname, '..');
const DEMO = join(ROOT, 'examples', 'review');
const REPO = 'acme/login';
const JWT_SECRET = 'a-session-signing-secret-of-forty-characters';

/** The value of one cookie a response sets, and the attributes it was set with. */
function setCookie(r: Response, name: string): { value: string; attributes: string } | undefined {
  const line = r.headers.getSetCookie().find((c) => c.startsWith(`${name}=`));
  if (!line) return undefined;
  const [pair = '', ...rest] = line.split(';');
  return { value: pair.slice(name.length + 1), attributes: rest.join(';').toLowerCase() };
}

describe('logging in with GitHub', () => {
  let github: FakeGitHub;
  let system: EmbeddedSystem;
  let base: string;
  let root: string;

  beforeAll(async () => {
    github = await FakeGitHub.start();
    const port = await freePort();
    base = `http://127.0.0.1:${port}`;
    system = await startGitHubCoordinator(github, join(tempDir('ekaci-login-'), 'data'), {
      web: { port, public: false },
      oauth: {
        client_id: github.api.oauth.clientId,
        client_secret: github.api.oauth.clientSecret,
        redirect_url: `${base}/auth/callback`,
        jwt_secret: JWT_SECRET,
        api_url: github.api.url,
        admins: ['olga'],
      },
    });
    github.api.setPermission(REPO, 'alice', 'write');
    github.api.setPermission(REPO, 'mallory', 'read');
    const repo = github.pullRequest(REPO, DEMO, { number: 1 });
    expect((await deliver(system, 'pull_request', repo.payload('opened'))).status).toBe(202);
    await github.api.waitFor(
      () => system.coordinator.github!.runs.runsOf({ repo: REPO })[0]?.state === 'done',
      'the pull request run to finish',
    );
    root = system.coordinator.github!.runs.roots(system.coordinator.github!.runs.runsOf({ repo: REPO })[0]!.id)[0]!
      .drvPath;
  });

  afterAll(async () => {
    await system?.stop();
    await github?.close();
  });

  /** The whole web flow as a browser goes through it; returns the session cookie. */
  async function logIn(login: string, back = '/agents'): Promise<string> {
    github.api.oauth.signedIn = login;
    const start = await fetch(`${base}/auth/login?return=${encodeURIComponent(back)}`, { redirect: 'manual' });
    expect(start.status).toBe(302);
    const state = setCookie(start, 'ekaci_oauth_state')!;
    expect(state.attributes).toContain('httponly');
    const authorize = new URL(start.headers.get('location')!);
    expect(authorize.origin + authorize.pathname).toBe(`${github.api.url}/login/oauth/authorize`);
    expect(authorize.searchParams.get('client_id')).toBe(github.api.oauth.clientId);
    const approved = await fetch(authorize, { redirect: 'manual' });
    const callback = approved.headers.get('location')!;
    expect(callback.startsWith(`${base}/auth/callback?`)).toBe(true);
    const done = await fetch(callback, { redirect: 'manual', headers: { cookie: `ekaci_oauth_state=${state.value}` } });
    expect(done.status).toBe(302);
    expect(done.headers.get('location')).toBe(back);
    const session = setCookie(done, 'ekaci_session')!;
    expect(session.attributes).toMatch(/httponly/);
    expect(session.attributes).toMatch(/samesite=lax/);
    // Served over plain HTTP here; `Secure` is set when the redirect URL is HTTPS.
    expect(session.attributes).not.toMatch(/secure/);
    return `ekaci_session=${session.value}`;
  }

  /** Follows /api/v1/events as `cookie`'s user: the ids of the events `pick` takes, as they come. */
  async function follow(cookie: string, pick: (type: string, data: { repo?: string; drvPath?: string }) => boolean) {
    const controller = new AbortController();
    const response = await fetch(`${base}/api/v1/events`, { headers: { cookie }, signal: controller.signal });
    expect(response.status).toBe(200);
    const ids: number[] = [];
    void (async () => {
      try {
        for await (const e of sseEvents(response)) {
          if (pick(e.event ?? 'message', JSON.parse(e.data) as { repo?: string }))
            ids.push(Number(e.id!.split(':')[1]));
        }
      } catch {
        // aborted
      }
    })();
    return { ids, stop: () => controller.abort() };
  }

  const me = async (cookie?: string) =>
    (await checkedFetch(`${base}/api/v1/me`, { headers: cookie ? { cookie } : {} })).json<{
      kind: string;
      name: string | null;
      admin: boolean;
      csrfToken: string | null;
    }>();
  const rebuild = (headers: Record<string, string>) =>
    checkedFetch(`${base}/api/v1/derivations/${root.slice(11, 43)}/rebuild`, { method: 'POST', headers });

  it('logs a writer in, who may rebuild a build of the repository with the CSRF token, and only with it', async () => {
    const cookie = await logIn('alice');
    const alice = await me(cookie);
    expect(alice).toMatchObject({ kind: 'user', name: 'alice', admin: false });
    expect(alice.csrfToken).toMatch(/^[A-Za-z0-9_-]{43}$/);
    const withoutCsrf = await rebuild({ cookie });
    expect(withoutCsrf.status).toBe(403);
    expect(withoutCsrf.json<{ error: { code: string } }>().error.code).toBe('EKACI_ERR_CSRF');
    const attempts = system.coordinator.store.derivation(root)!.attempts;
    const accepted = await rebuild({ cookie, 'x-csrf-token': alice.csrfToken! });
    expect(accepted.status).toBe(202);
    expect(system.coordinator.audit.recent().find((a) => a.action === 'api.build-restarted')?.actor).toBe(
      'github:alice',
    );
    expect(system.coordinator.audit.recent().map((a) => [a.actor, a.action])).toContainEqual([
      'github:alice',
      'user.login',
    ]);
    await expect.poll(() => system.coordinator.store.derivation(root)!.attempts).toBeGreaterThan(attempts);
  });

  it('refuses a reader, an anonymous caller, a forged session and a login that did not start here', async () => {
    const cookie = await logIn('mallory');
    const mallory = await me(cookie);
    const refused = await rebuild({ cookie, 'x-csrf-token': mallory.csrfToken! });
    expect(refused.status).toBe(403);
    expect(refused.json<{ error: { message: string } }>().error.message).toMatch(/write access to acme\/login/);
    expect((await rebuild({})).status).toBe(401);
    // The payload changed to another login, the signature kept: not a session.
    const [header, payload, signature] = cookie.slice('ekaci_session='.length).split('.');
    const claims = JSON.parse(Buffer.from(payload!, 'base64url').toString()) as Record<string, unknown>;
    const forged = Buffer.from(JSON.stringify({ ...claims, login: 'alice' })).toString('base64url');
    expect((await me(`ekaci_session=${header}.${forged}.${signature}`)).kind).toBe('anonymous');
    // A callback with a code but a state nobody issued (a login forced on someone from another site).
    const stray = await fetch(`${base}/auth/callback?code=abc&state=def`, { redirect: 'manual' });
    expect(stray.status).toBe(400);
    expect(
      stray.headers.getSetCookie().some((c) => c.startsWith('ekaci_session=') && !c.startsWith('ekaci_session=;')),
    ).toBe(false);
    // Somewhere else after the login: only a path on this site.
    const elsewhere = await fetch(`${base}/auth/login?return=${encodeURIComponent('//evil.example/')}`, {
      redirect: 'manual',
    });
    const state = setCookie(elsewhere, 'ekaci_oauth_state')!;
    const approved = await fetch(elsewhere.headers.get('location')!, { redirect: 'manual' });
    const done = await fetch(approved.headers.get('location')!, {
      redirect: 'manual',
      headers: { cookie: `ekaci_oauth_state=${state.value}` },
    });
    expect(done.headers.get('location')).toBe('/');
  });

  it("runs a pull request's failed builds again for a writer, not for a reader", async () => {
    const runs = () => system.coordinator.github!.runs.runsOf({ repo: REPO });
    const head = runs()[0]!.head_sha;
    const url = `${base}/api/v1/repos/${REPO}/commits/${head}/rebuild-failed`;
    const mallory = await logIn('mallory');
    const refused = await checkedFetch(url, {
      method: 'POST',
      headers: { cookie: mallory, 'x-csrf-token': (await me(mallory)).csrfToken! },
    });
    expect(refused.status).toBe(403);
    const before = runs().length;
    const alice = await logIn('alice');
    const accepted = await checkedFetch(url, {
      method: 'POST',
      headers: { cookie: alice, 'x-csrf-token': (await me(alice)).csrfToken! },
    });
    expect(accepted.status).toBe(202);
    expect(runs().length).toBe(before + 1);
    expect(runs().at(-1)).toMatchObject({ head_sha: head, rebuild_failed: 1 });
    const unknown = await checkedFetch(`${base}/api/v1/repos/${REPO}/commits/${'0'.repeat(40)}/rebuild-failed`, {
      method: 'POST',
      headers: { cookie: alice, 'x-csrf-token': (await me(alice)).csrfToken! },
    });
    expect(unknown.status).toBe(409);
  });

  it('gives the admins [oauth] names the operator actions, and private data', async () => {
    const cookie = await logIn('olga');
    const olga = await me(cookie);
    expect(olga).toMatchObject({ kind: 'user', name: 'olga', admin: true });
    const agents = await checkedFetch(`${base}/api/v1/agents`, { headers: { cookie } });
    expect(agents.status).toBe(200);
    const drain = await checkedFetch(`${base}/api/v1/agents/local-1/drain`, {
      method: 'POST',
      headers: { cookie, 'x-csrf-token': olga.csrfToken! },
    });
    expect(drain.status).toBe(200);
    await checkedFetch(`${base}/api/v1/agents/local-1/resume`, {
      method: 'POST',
      headers: { cookie, 'x-csrf-token': olga.csrfToken! },
    });
    // A plain user does not read operators' data.
    const alice = await logIn('alice');
    expect((await checkedFetch(`${base}/api/v1/agents`, { headers: { cookie: alice } })).status).toBe(403);
  });
  it("lets a user read a private repository's data when GitHub lets them read the repository, and nobody else", async () => {
    // What the repository's webhooks say once it is made private on GitHub.
    system.coordinator.db.prepare('UPDATE github_repositories SET private = 1 WHERE full_name = ?').run(REPO);
    github.api.setPermission(REPO, 'eve', 'none');
    const pulls = (cookie?: string) =>
      checkedFetch(`${base}/api/v1/repos/${REPO}/pulls`, { headers: cookie ? { cookie } : {} });
    const listed = async (cookie: string) =>
      (await checkedFetch(`${base}/api/v1/repos`, { headers: { cookie } }))
        .json<{ repositories: Array<{ name: string }> }>()
        .repositories.map((r) => r.name);
    const mallory = await logIn('mallory'); // read access
    expect((await pulls(mallory)).status).toBe(200);
    expect(await listed(mallory)).toContain(REPO);
    const eve = await logIn('eve'); // no access at all
    const refused = await pulls(eve);
    expect(refused.status).toBe(403);
    expect(refused.json<{ error: { message: string } }>().error.message).toMatch(
      /acme\/login is a private repository: .*log in with GitHub as a user who can read it/,
    );
    expect(await listed(eve)).not.toContain(REPO);
    expect((await pulls()).status).toBe(401);

    // Live events of the repository's runs: the reader gets them; the other user only once it is public again.
    const runEvent = (type: string, data: { repo?: string }) => type === 'run' && data.repo === REPO;
    const [reader, other] = [await follow(mallory, runEvent), await follow(eve, runEvent)];
    const alice = await logIn('alice');
    const head = system.coordinator.github!.runs.runsOf({ repo: REPO })[0]!.head_sha;
    const rerun = async () => {
      const r = await checkedFetch(`${base}/api/v1/repos/${REPO}/commits/${head}/rebuild-failed`, {
        method: 'POST',
        headers: { cookie: alice, 'x-csrf-token': (await me(alice)).csrfToken! },
      });
      expect(r.status).toBe(202);
    };
    await rerun();
    await expect.poll(() => reader.ids.length).toBeGreaterThan(0);
    const lastPrivate = Math.max(...reader.ids);
    system.coordinator.db.prepare('UPDATE github_repositories SET private = 0 WHERE full_name = ?').run(REPO);
    await rerun();
    await expect.poll(() => other.ids.length).toBeGreaterThan(0);
    // Events reach each stream in order: had the private run's events been let through, they would be here first.
    expect(Math.min(...other.ids)).toBeGreaterThan(lastPrivate);
    reader.stop();
    other.stop();
  });

  it('lets a user read the builds made for a private repository they may read, dependencies too, and their logs', async () => {
    const { store, db } = system.coordinator;
    const runs = system.coordinator.github!.runs;
    const hello = runs
      .runsOf({ repo: REPO })
      .flatMap((r) => runs.roots(r.id))
      .find((r) => r.attr === 'packages.hello' && r.side === 'head')!.drvPath;
    const [dependency] = store.inputsOf(hello); // greeting
    // What a private repository's run leaves: derivations only it asked for, private. Greeting is an attribute of
    // its own too: without its roots, it is only what hello was built from.
    for (const d of [hello, dependency!]) db.prepare('UPDATE derivations SET private = 1 WHERE drv_path = ?').run(d);
    db.prepare('DELETE FROM github_run_roots WHERE drv_path = ?').run(dependency);
    github.api.setPermission(REPO, 'eve', 'none');
    const get = (path: string, cookie?: string) =>
      checkedFetch(`${base}/api/v1${path}`, { headers: cookie ? { cookie } : {} });
    const [mallory, eve] = [await logIn('mallory'), await logIn('eve')];
    for (const d of [hello, dependency!]) {
      const hash = d.slice('/nix/store/'.length, '/nix/store/'.length + 32);
      expect((await get(`/derivations/${hash}`, mallory)).status).toBe(200);
      const log = await get(`/derivations/${hash}/log`, mallory);
      expect(log.status).toBe(200);
      expect((await get(`/derivations/${hash}/attempts/1/log`, mallory)).text).toBe(log.text);
      const refused = await get(`/derivations/${hash}/log`, eve);
      expect(refused.status).toBe(403);
      expect(refused.json<{ error: { message: string } }>().error.message).toMatch(
        /built for a private repository: .*log in with GitHub as a user who can read it/,
      );
      expect((await get(`/derivations/${hash}`)).status).toBe(401);
    }

    // Its live events too: the reader gets the private build's; the other user only once it is public.
    const helloEvent = (type: string, data: { drvPath?: string }) => type === 'build' && data.drvPath === hello;
    const [reader, other] = [await follow(mallory, helloEvent), await follow(eve, helloEvent)];
    const alice = await logIn('alice');
    const hash = hello.slice('/nix/store/'.length, '/nix/store/'.length + 32);
    // A failed build, built again: each time, its events go from queued to its end.
    const rebuildHello = async () => {
      db.prepare("UPDATE derivations SET state = 'failed' WHERE drv_path = ?").run(hello);
      const r = await checkedFetch(`${base}/api/v1/derivations/${hash}/rebuild`, {
        method: 'POST',
        headers: { cookie: alice, 'x-csrf-token': (await me(alice)).csrfToken! },
      });
      expect(r.status).toBe(202);
      // Its outputs are valid already: it ends substituted, with events on the way.
      await expect.poll(() => store.derivation(hello)?.state).toMatch(/^(succeeded|substituted)$/);
    };
    await rebuildHello();
    await expect.poll(() => reader.ids.length).toBeGreaterThan(0);
    const lastPrivate = Math.max(...reader.ids);
    db.prepare('UPDATE derivations SET private = 0 WHERE drv_path = ?').run(hello);
    await rebuildHello();
    await expect.poll(() => other.ids.length).toBeGreaterThan(0);
    // In order on each stream: had the private build's events been let through, they would be here first.
    expect(Math.min(...other.ids)).toBeGreaterThan(lastPrivate);
    reader.stop();
    other.stop();
  });
});
