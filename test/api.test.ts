import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { Agent } from '../agent/agent.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { OPENAPI_DOCUMENT } from '../coordinator/http/openapi.js';
import { checkResponse, checkedFetch, templateOf } from './support/api-contract.js';
import { startCli } from './support/cli.js';
import { inFreshStore } from '../common/nix/test-support.js';
import { startWithAgent } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';
import { sseEvents } from '../common/sse.js';

/** The HTTP API against its OpenAPI document, and build logs read whole, in part and live, from a real build. */

const ROOT = join(import.meta.dirname, '..');
const TOKEN = 'ekaci_api-token-for-the-api-tests-0123456789';
const auth = { authorization: `Bearer ${TOKEN}` };

let coordinator: Coordinator | undefined;
let agent: Agent | undefined;
afterEach(async () => {
  await agent?.stopNow();
  agent = undefined;
  await coordinator?.stopNow();
  coordinator = undefined;
});

async function start(overrides: Record<string, unknown> = {}): Promise<Coordinator> {
  ({ coordinator, agent } = await startWithAgent(TOKEN, 'logger', overrides));
  return coordinator;
}

// A little less than the test's own time-out (vitest.config.ts): enough to say where a hung client stood.
const HANG_DIAGNOSIS_MS = 150_000;

const api = (path: string): string => `http://127.0.0.1:${coordinator!.httpPort}/api/v1${path}`;

async function submit(
  script: string,
  extra = '',
  lets = '',
): Promise<{ drvPath: string; hash: string; request: number }> {
  const file = writeNixFile(
    tempDir(),
    nonce(),
    `let ${lets || 'none = null;'} in { x = mk "logged" { script = ${JSON.stringify(script)}; ${extra} }; }`,
  );
  const drvPath = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', 'x'])).trim();
  const request = await coordinator!.manager.submit([{ attr: 'x', drvPath }], 'test');
  return { drvPath, hash: drvPath.slice('/nix/store/'.length, '/nix/store/'.length + 32), request };
}

describe('the API contract', () => {
  it('describes every /api/v1 route in the OpenAPI document it serves', async () => {
    const c = await start();
    const served = c.routes.filter((r) => r.path.startsWith('/api/v1/'));
    expect(served.length).toBeGreaterThan(5);
    for (const { method, path } of served) {
      const template = path.replace('/api/v1', '').replace(/:([a-z]+)/g, '{$1}');
      const documented = (OPENAPI_DOCUMENT.paths as Record<string, Record<string, unknown>>)[template];
      expect(documented?.[method.toLowerCase()], `${method} ${path} is not in the OpenAPI document`).toBeDefined();
    }
    // Anyone may read the contract, even of a coordinator that is not public.
    const doc = await checkedFetch(api('/openapi.json'));
    expect(doc.json<{ openapi: string }>().openapi).toBe('3.1.0');
    expect(templateOf('/derivations/abc/attempts/2/log')).toBe('/derivations/{hash}/attempts/{attempt}/log');
  });

  it('catches a response that breaks the contract', () => {
    const url = 'http://127.0.0.1:1/api/v1/derivations/0/log';
    expect(() => checkResponse('GET', url, 404, 'application/json', '{"error":"a bare string"}')).toThrow(
      /body breaks the contract/,
    );
    expect(() => checkResponse('GET', url, 418, 'application/json', '{}')).toThrow(/status 418 is not/);
    expect(() => checkResponse('GET', url, 200, 'text/html', '')).toThrow(/"text\/html" is not documented/);
  });

  it('answers errors as {error: {code, message}} with the right status', async () => {
    await start();
    const missing = await checkedFetch(api(`/derivations/${'0'.repeat(32)}`), { headers: auth });
    expect(missing.status).toBe(404);
    expect(missing.json<{ error: { code: string } }>().error.code).toBe('EKACI_ERR_NOT_FOUND');
    const noLog = await checkedFetch(api(`/derivations/${'0'.repeat(32)}/log`), { headers: auth });
    expect(noLog.status).toBe(404);
    const anonymous = await checkedFetch(api(`/derivations/${'0'.repeat(32)}`));
    expect(anonymous.status).toBe(401);
    const badBody = await checkedFetch(api('/builds'), {
      method: 'POST',
      headers: { ...auth, 'content-type': 'application/json' },
      body: '{"drvs": []}',
    });
    expect(badBody.status).toBe(400);
    expect(badBody.json<{ error: { code: string; message: string } }>().error).toMatchObject({
      code: 'EKACI_ERR_REQUEST',
      message: expect.stringMatching(/^drvs: /) as unknown,
    });
  });
});

describe('CORS', () => {
  it('lets the pages of the origins [web] cors_origins lists call the API, and no other', async () => {
    await start({ web: { port: 0, public: false, cors_origins: ['https://dash.example.org'] } });
    const preflight = (origin: string) =>
      fetch(api('/agents'), {
        method: 'OPTIONS',
        headers: { origin, 'access-control-request-method': 'GET', 'access-control-request-headers': 'authorization' },
      });
    const allowed = await preflight('https://dash.example.org');
    expect(allowed.status).toBe(204);
    expect(allowed.headers.get('access-control-allow-origin')).toBe('https://dash.example.org');
    expect(allowed.headers.get('access-control-allow-headers')).toMatch(/Authorization/);
    const other = await preflight('https://evil.example');
    expect(other.headers.get('access-control-allow-origin')).toBeNull();
    const read = await fetch(api('/agents'), { headers: { ...auth, origin: 'https://dash.example.org' } });
    expect(read.headers.get('access-control-allow-origin')).toBe('https://dash.example.org');
    expect(read.headers.get('vary')).toMatch(/Origin/);
  });
});

describe('agents over HTTP', () => {
  it('lists the agents: capabilities, connection, free slots and what each runs, to a credential only', async () => {
    await start();
    const { drvPath } = await submit('/bin/sleep 3; echo > $out');
    await expect.poll(() => coordinator!.store.attemptsOf(drvPath).length).toBe(1);
    type Listed = {
      id: string;
      connected: boolean;
      freeSlots: number;
      systems: string[];
      leases: { drvPath: string }[];
    };
    const listed = async (): Promise<Listed[]> =>
      (await checkedFetch(api('/agents'), { headers: auth })).json<{ agents: Listed[] }>().agents;
    const [running] = await listed();
    expect(running).toMatchObject({ id: 'logger', connected: true, freeSlots: 0, maxJobs: 1 });
    expect(running!.systems.length).toBeGreaterThan(0);
    expect(running!.leases.map((l) => l.drvPath)).toEqual([drvPath]);
    expect((await checkedFetch(api('/agents'))).status).toBe(401);

    await agent!.stopNow();
    agent = undefined;
    await expect.poll(async () => (await listed())[0]?.connected).toBe(false);
  });
});

const ADMIN_TOKEN = 'ekaci_api-token-of-the-operator-0123456789';
const admin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const hashOf = (drvPath: string): string => drvPath.slice('/nix/store/'.length, '/nix/store/'.length + 32);
const withAdmin = {
  api_tokens: [
    { name: 'reader', token: TOKEN },
    { name: 'operator', token: ADMIN_TOKEN },
  ],
  web: { port: 0, public: false, admins: ['operator'] },
};

describe('derivations and actions over HTTP', () => {
  it("shows a derivation's history, dependencies and dependents", async () => {
    await start();
    const { drvPath, request } = await submit('echo > $out', 'deps = [ dep ];', 'dep = mk "dep" {};');
    expect((await coordinator!.manager.waitFor(request))[0]?.state).toBe('succeeded');
    type Shown = {
      history: { state: string; attempt: number }[];
      dependencies: { count: number; derivations: { drvPath: string; state: string }[] };
      dependents: { count: number; derivations: { drvPath: string }[] };
    };
    const shown = (await checkedFetch(api(`/derivations/${hashOf(drvPath)}`), { headers: auth })).json<Shown>();
    // Submitted at created_at (queued); the history is every change after that.
    expect(shown.history.map((h) => h.state)).toEqual(['buildable', 'building', 'succeeded']);
    expect(shown.dependencies.count).toBe(1);
    const dep = shown.dependencies.derivations[0]!;
    expect(dep).toMatchObject({ state: 'succeeded', drvPath: expect.stringMatching(/-dep-.*\.drv$/) as unknown });
    const depShown = (await checkedFetch(api(`/derivations/${hashOf(dep.drvPath)}`), { headers: auth })).json<Shown>();
    expect(depShown.dependents).toEqual({ count: 1, derivations: [{ drvPath, state: 'succeeded' }] });
    expect(depShown.history.map((h) => h.state)).toEqual(['buildable', 'building', 'succeeded']);
  });

  it('cancels a running build and builds it again for a token holder; refuses anonymous callers', async () => {
    await start();
    const { drvPath, hash } = await submit('/bin/sleep 30; echo > $out');
    await expect.poll(() => coordinator!.store.derivation(drvPath)?.state).toBe('building');
    const cancel = api(`/derivations/${hash}/cancel`);
    expect((await checkedFetch(cancel, { method: 'POST' })).status).toBe(401);
    expect((await checkedFetch(cancel, { method: 'POST', headers: auth })).status).toBe(202);
    await expect.poll(() => coordinator!.store.derivation(drvPath)?.state, { timeout: 30_000 }).toBe('cancelled');
    const again = await checkedFetch(cancel, { method: 'POST', headers: auth });
    expect(again.status).toBe(409);
    expect(again.json<{ error: { message: string } }>().error.message).toMatch(/is cancelled/);

    const rebuild = await checkedFetch(api(`/derivations/${hash}/rebuild`), { method: 'POST', headers: auth });
    expect(rebuild.status).toBe(202);
    await expect.poll(() => coordinator!.store.attemptsOf(drvPath).length).toBe(2);
    expect(coordinator!.store.derivation(drvPath)?.state).toBe('building');
    const audit = coordinator!.audit.recent().map((a) => [a.actor, a.action]);
    expect(audit).toEqual(
      expect.arrayContaining([
        ['api:reader', 'api.build-cancelled'],
        ['api:reader', 'api.build-restarted'],
      ]),
    );
    // The audit log is for admins only; this coordinator names none.
    expect((await checkedFetch(api('/audit'), { headers: auth })).status).toBe(403);
  });

  it('drains an agent for an admin (no new work until resumed), audited; a plain token may not', async () => {
    await start(withAdmin);
    const drain = (headers: Record<string, string>, body?: object) =>
      checkedFetch(api('/agents/logger/drain'), {
        method: 'POST',
        headers: { ...headers, ...(body ? { 'content-type': 'application/json' } : {}) },
        ...(body ? { body: JSON.stringify(body) } : {}),
      });
    expect((await drain(auth)).status).toBe(403);
    expect((await drain({})).status).toBe(401);
    expect((await checkedFetch(api('/agents/nobody/drain'), { method: 'POST', headers: admin })).status).toBe(404);
    expect((await drain(admin, { reason: 'kernel update' })).status).toBe(200);
    type Listed = { id: string; freeSlots: number; drained: { by: string; reason: string } | null };
    const listed = async () =>
      (await checkedFetch(api('/agents'), { headers: auth })).json<{ agents: Listed[] }>().agents[0]!;
    expect(await listed()).toMatchObject({ freeSlots: 0, drained: { by: 'api:operator', reason: 'kernel update' } });

    const { drvPath, request } = await submit('echo > $out');
    // A run's ETA counts no slot of a drained agent.
    const system = coordinator!.store.derivation(drvPath)!.system;
    expect(coordinator!.manager.slotsFor(system)).toBe(0);
    // It waits in its lane, served by the drained agent only.
    await expect
      .poll(async () => (await checkedFetch(api('/queues'), { headers: auth })).json<{ pending: number }>().pending)
      .toBe(1);
    const resumedAt = Date.now();
    const resume = await checkedFetch(api('/agents/logger/resume'), { method: 'POST', headers: admin });
    expect(resume.json()).toEqual({ id: 'logger', drained: false });
    expect(coordinator!.manager.slotsFor(system)).toBeGreaterThan(0);
    expect((await coordinator!.manager.waitFor(request))[0]?.state).toBe('succeeded');
    // Nothing was assigned while it was drained.
    expect(coordinator!.store.attemptsOf(drvPath).map((a) => a.assigned_at >= resumedAt)).toEqual([true]);
    expect((await listed()).drained).toBeNull();
    const audit = (await checkedFetch(api('/audit'), { headers: admin })).json<{
      entries: { actor: string; action: string }[];
    }>();
    expect(audit.entries.filter((e) => e.action.startsWith('agent.')).map((e) => [e.actor, e.action])).toEqual([
      ['api:operator', 'agent.resumed'],
      ['api:operator', 'agent.drained'],
    ]);
  });
});

describe('ekaci as a client of a running coordinator', () => {
  it('ekaci status, agents drain/resume and cancel: what runs and waits, operated from the terminal', async () => {
    await start(withAdmin);
    const url = `http://127.0.0.1:${coordinator!.httpPort}`;
    const cli = (args: string[], token = ADMIN_TOKEN) =>
      startCli([...args, '--coordinator', url], { env: { EKACI_TOKEN: token } }).done;
    const { drvPath } = await submit('/bin/sleep 30; echo > $out');
    await expect.poll(() => coordinator!.store.derivation(drvPath)?.state).toBe('building');
    const status = await cli(['status']);
    expect(status.code).toBe(0);
    expect(status.stdout).toContain('1 unfinished, 1 building');
    expect(status.stdout).toContain(`${drvPath} (attempt 1) on logger`);
    expect(status.stdout).toMatch(/logger {2}\S+ {2}\S+ {2}0 of 1 slots free {2}1 running/);

    const refused = await cli(['agents', 'drain', 'logger'], TOKEN);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/ekaci agents: 403: draining and resuming agents needs an API token named in/);
    const drained = await cli(['agents', 'drain', 'logger', '--reason', 'disk swap']);
    expect(drained.stdout).toBe('logger: drained: it takes no new work\n');
    expect((await cli(['agents'])).stdout).toMatch(/drained by api:operator \(disk swap\)/);
    expect((await cli(['agents', 'resume', 'logger'])).code).toBe(0);
    expect((await cli(['agents', 'pause', 'logger'])).stderr).toMatch(/"pause" is not an action/);

    const cancelled = await cli(['cancel', drvPath], TOKEN);
    expect(cancelled.stdout).toBe(`${drvPath}: cancelled (its agent stops it)\n`);
    await expect.poll(() => coordinator!.store.derivation(drvPath)?.state, { timeout: 30_000 }).toBe('cancelled');
    const again = await cli(['cancel', drvPath], TOKEN);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/ekaci cancel: 409: nothing to cancel: .* is cancelled/);
    const unreachable = await startCli(['status', '--coordinator', 'http://127.0.0.1:1']).done;
    expect(unreachable.code).toBe(1);
    expect(unreachable.stderr).toMatch(/ekaci status: cannot reach the coordinator/);
  });
});

/**
 * `run`, or — should it still be running when the test is about to time out (it once did, under a loaded CI machine,
 * and nothing said where it stood) — an error saying what the coordinator had then: its queues, agents and every
 * derivation's state.
 */
async function diagnosedHang<T>(run: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const stuck = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const read = async (path: string) => (await fetch(api(path), { headers: auth })).text();
      void Promise.all([read('/queues'), read('/agents')]).then(([queues, agents]) => {
        const states = coordinator!.store.db.prepare('SELECT drv_path, state, attempts, error FROM derivations').all();
        reject(new Error(`still running: queues ${queues}\nagents ${agents}\nderivations ${JSON.stringify(states)}`));
      }, reject);
    }, HANG_DIAGNOSIS_MS);
  });
  try {
    return await Promise.race([run, stuck]);
  } finally {
    clearTimeout(timer);
  }
}

describe('ekaci build --coordinator', () => {
  it('builds what a client instantiated in its own store: the .drv closure uploaded, the results printed', async () => {
    await start();
    const url = `http://127.0.0.1:${coordinator!.httpPort}`;
    const dir = tempDir();
    const tag = nonce();
    writeFileSync(join(dir, 'data.txt'), `data ${tag}\n`);
    const file = writeNixFile(
      dir,
      tag,
      `{ ok = mk "remote-ok" { src = ./data.txt; script = "/bin/cat $src > $out"; };
         bad = mk "remote-bad" { script = "echo failing on purpose; exit 3"; }; }`,
    );
    // The client has a store of its own (another machine): nothing it instantiates is in the coordinator's.
    const client = (args: string[], token = TOKEN) =>
      diagnosedHang(
        inFreshStore(tempDir(), { ...process.env, EKACI_TOKEN: token }, [
          process.execPath,
          ...['--import', 'tsx', join(ROOT, 'cli', 'ekaci.ts'), 'build', file, ...args, '--coordinator', url],
        ]),
      );
    const built = await client(['-A', 'ok', '-A', 'bad']);
    expect(built.stderr).toMatch(/submitted request \d+/);
    expect(built.stderr).toMatch(/\[\d\/2\] ok: succeeded/);
    expect(built.code).toBe(1);
    const ok = /^succeeded +ok +(\S+)$/m.exec(built.stdout);
    expect(ok, built.stdout + built.stderr).not.toBeNull();
    expect(built.stdout).toMatch(/^failed +bad +\S+\.drv$/m);
    expect(built.stdout).toMatch(/1 succeeded, 1 failed \(2 attributes/);
    const [okDrv] = [ok![1]!];
    expect(coordinator!.store.derivation(okDrv)?.state).toBe('succeeded');
    const out = coordinator!.store.outputsOf(okDrv)[0]!.path;
    expect(readFileSync(out, 'utf8')).toBe(`data ${tag}\n`);

    const json = await client(['-A', 'ok', '--json']);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toMatchObject({ builds: [{ attr: 'ok', drv: okDrv, state: 'succeeded' }] });
    const refused = await client(['-A', 'ok'], 'not-a-token-of-this-coordinator');
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/ekaci build: 401: this coordinator is not public/);
  });
});

describe('events over HTTP', () => {
  it('streams state changes of builds and agents, resumes from Last-Event-ID, and says reset after a gap', async () => {
    await start(withAdmin);
    expect((await checkedFetch(api('/events'))).status).toBe(401);
    const controller = new AbortController();
    const response = await fetch(api('/events'), { headers: admin, signal: controller.signal });
    expect(response.status).toBe(200);
    checkResponse('GET', api('/events'), 200, response.headers.get('content-type') ?? '', '');
    const seen: Array<{ id: string; type: string; data: Record<string, unknown> }> = [];
    const reading = (async () => {
      try {
        for await (const e of sseEvents(response)) {
          seen.push({ id: e.id!, type: e.event, data: JSON.parse(e.data) as Record<string, unknown> });
        }
      } catch {
        // aborted
      }
    })();
    const { drvPath, request } = await submit('echo > $out');
    await coordinator!.manager.waitFor(request);
    await expect
      .poll(() => seen.filter((e) => e.type === 'build' && e.data.drvPath === drvPath).map((e) => e.data.state))
      .toEqual(['buildable', 'building', 'succeeded']);
    await checkedFetch(api('/agents/logger/drain'), { method: 'POST', headers: admin });
    await expect
      .poll(() => seen.find((e) => e.type === 'agent'))
      .toMatchObject({ data: { type: 'agent', id: 'logger', connected: true, drained: true } });

    // From the id of the first event on: the rest again, in order.
    const resumed = new AbortController();
    const again = await fetch(api('/events'), {
      headers: { ...admin, 'last-event-id': seen[0]!.id },
      signal: resumed.signal,
    });
    const replay: string[] = [];
    for await (const e of sseEvents(again)) {
      replay.push(e.id!);
      if (replay.length === seen.length - 1) break;
    }
    resumed.abort();
    expect(replay).toEqual(seen.slice(1).map((e) => e.id));
    // An id of another start (or one long gone) cannot be resumed: reload.
    const stale = new AbortController();
    const reset = await fetch(api('/events'), {
      headers: { ...admin, 'last-event-id': 'old:5' },
      signal: stale.signal,
    });
    const first = await sseEvents(reset).next();
    stale.abort();
    expect(first.value).toMatchObject({ event: 'reset' });
    controller.abort();
    await reading;
  });
});

describe('queues over HTTP', () => {
  it('shows what waits in which lane, who serves it, and why nobody does', async () => {
    await start({ unbuildable_grace_seconds: 3600 });
    // A feature no host here has: Nix adds `kvm` to system-features by itself where /dev/kvm exists.
    const { drvPath } = await submit('echo > $out', 'requiredSystemFeatures = [ "cuda" ];');
    type Lane = { system: string; features: string[]; buildable: number; agents: string[]; why?: string };
    const queues = async () =>
      (await checkedFetch(api('/queues'), { headers: auth })).json<{ pending: number; lanes: Lane[] }>();
    await expect.poll(async () => (await queues()).lanes.length).toBe(1);
    const { pending, lanes } = await queues();
    expect(pending).toBe(1);
    expect(lanes[0]).toMatchObject({ kind: 'build', features: ['cuda'], untrusted: false, buildable: 1, agents: [] });
    expect(lanes[0]!.why).toBe(
      `no connected agent builds ${coordinator!.store.derivation(drvPath)!.system} with features cuda`,
    );
    expect((await checkedFetch(api('/queues'))).status).toBe(401);
  });
});

describe('build logs over HTTP', () => {
  it('streams a log live from its first byte, resumes from Last-Event-ID, and ends with the final state', async () => {
    await start();
    // The builder writes, then waits long before its last line: what arrives meanwhile arrived live.
    const { drvPath, hash } = await submit(
      '/bin/sleep 2; echo first line; /bin/sleep 4; printf "second line\\n\\nlast"; echo > $out',
    );
    await expect.poll(() => coordinator!.store.attemptsOf(drvPath).length).toBe(1);
    const response = await fetch(api(`/derivations/${hash}/log?follow=1`), { headers: auth });
    expect(response.status).toBe(200);
    checkResponse('GET', api(`/derivations/${hash}/log`), 200, response.headers.get('content-type') ?? '', '');
    let text = '';
    let firstArrivedWhileRunning: boolean | undefined;
    let end: Record<string, unknown> | undefined;
    const ids: string[] = [];
    for await (const e of sseEvents(response)) {
      if (e.event === 'log') {
        text += JSON.parse(e.data) as string;
        ids.push(e.id!);
        if (firstArrivedWhileRunning === undefined && text.includes('first line')) {
          firstArrivedWhileRunning = coordinator!.store.derivation(drvPath)?.state === 'building';
        }
      } else if (e.event === 'end') end = JSON.parse(e.data) as Record<string, unknown>;
    }
    expect(firstArrivedWhileRunning).toBe(true);
    expect(end).toMatchObject({ attempt: 1, attemptState: 'succeeded', state: 'succeeded', truncated: false });
    const stored = readFileSync(coordinator!.store.attemptsOf(drvPath)[0]!.log_path, 'utf8');
    expect(text).toBe(stored);
    expect(text).toContain('second line\n\nlast');
    expect(end!.bytes).toBe(Buffer.byteLength(stored));
    expect(Number(ids.at(-1))).toBe(Buffer.byteLength(stored));

    // A follower that lost its connection after the first event gets the rest, and only the rest.
    const resumed = await fetch(api(`/derivations/${hash}/attempts/1/log`), {
      headers: { ...auth, accept: 'text/event-stream', 'last-event-id': ids[0]! },
    });
    let rest = '';
    for await (const e of sseEvents(resumed)) if (e.event === 'log') rest += JSON.parse(e.data) as string;
    expect(rest).toBe(Buffer.from(stored).subarray(Number(ids[0])).toString('utf8'));
    expect(coordinator!.logs.watcherCount).toBe(0);
  });

  it('ekaci logs prints a log, follows a running one to its end, and exits with the build', async () => {
    await start();
    const { drvPath, hash } = await submit('/bin/sleep 1; echo from the builder; /bin/sleep 1; echo done; exit 3');
    await expect.poll(() => coordinator!.store.attemptsOf(drvPath).length).toBe(1);
    const coordinatorUrl = `http://127.0.0.1:${coordinator!.httpPort}`;
    const followed = await startCli(['logs', drvPath, '--coordinator', coordinatorUrl, '--follow'], {
      env: { EKACI_TOKEN: TOKEN },
    }).done;
    expect(followed.code).toBe(1);
    expect(followed.stdout).toContain('from the builder\ndone\n');
    expect(followed.stderr).toMatch(/attempt failed, build (failed|buildable)/);
    const whole = await startCli(['logs', hash, '--coordinator', coordinatorUrl, '--attempt', '1', '--token', TOKEN])
      .done;
    expect(whole.code).toBe(0);
    expect(whole.stdout).toBe(readFileSync(coordinator!.store.attemptsOf(drvPath)[0]!.log_path, 'utf8'));
    const refused = await startCli(['logs', hash, '--coordinator', coordinatorUrl]).done;
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/401: this coordinator is not public/);
  });

  it('gives followers that follow together the same whole log, characters split across chunks included', async () => {
    await start();
    // 200 KiB of two-byte characters after one one-byte character: every 64 KiB boundary falls inside a character.
    const { drvPath, hash } = await submit(
      'printf x; i=0; while [ $i -lt 400 ]; do printf "%s" "$LINE"; i=$((i+1)); done; echo; echo > $out',
      `LINE = "${'é'.repeat(256)}";`,
    );
    await expect.poll(() => coordinator!.store.attemptsOf(drvPath).length).toBe(1);
    const follow = async (): Promise<string> => {
      const r = await fetch(api(`/derivations/${hash}/log?follow=1`), { headers: auth });
      let text = '';
      for await (const e of sseEvents(r)) if (e.event === 'log') text += JSON.parse(e.data) as string;
      return text;
    };
    const [a, b] = await Promise.all([follow(), follow()]);
    const stored = readFileSync(coordinator!.store.attemptsOf(drvPath)[0]!.log_path, 'utf8');
    expect(stored).toContain(`x${'é'.repeat(1000)}`);
    expect(a).toBe(stored);
    expect(b).toBe(stored);
    expect(a).not.toContain('\ufffd');
  });

  it('reads a part of a log with Range, and refuses a range past its end', async () => {
    await start();
    const { hash, request } = await submit('echo 0123456789; echo > $out');
    expect((await coordinator!.manager.waitFor(request))[0]?.state).toBe('succeeded');
    const path = api(`/derivations/${hash}/log`);
    const whole = await checkedFetch(path, { headers: auth });
    expect(whole.status).toBe(200);
    expect(whole.text).toContain('0123456789\n');
    const size = Buffer.byteLength(whole.text);
    const head = await checkedFetch(path, { headers: { ...auth, range: 'bytes=0-3' } });
    expect(head.status).toBe(206);
    expect(head.text).toBe(whole.text.slice(0, 4));
    expect(head.headers.get('content-range')).toBe(`bytes 0-3/${size}`);
    const tail = await checkedFetch(path, { headers: { ...auth, range: 'bytes=-3' } });
    expect(tail.text).toBe(whole.text.slice(-3));
    const past = await checkedFetch(path, { headers: { ...auth, range: `bytes=${size}-` } });
    expect(past.status).toBe(416);
    expect(past.headers.get('content-range')).toBe(`bytes */${size}`);
  });
});
