import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent } from '../agent/agent.js';
import { silentLogger } from '../common/logging.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { OPENAPI_DOCUMENT } from '../coordinator/http/openapi.js';
import { checkResponse, checkedFetch, templateOf } from './support/api-contract.js';
import { startCli } from './support/cli.js';
import { startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';
import { sseEvents } from '../common/sse.js';

/** The HTTP API against its OpenAPI document, and build logs read whole, in part and live, from a real build. */

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
  coordinator = await startCoordinator(tempDir(), {
    web: { port: 0, public: false },
    api_tokens: [{ name: 'reader', token: TOKEN }],
    ...overrides,
  });
  agent = new Agent({
    coordinator: coordinator.grpcTarget,
    token: coordinator.localAgentToken('logger'),
    agentId: 'logger',
    maxJobs: 1,
    spoolDir: join(tempDir(), 'spool'),
    logger: silentLogger(),
  });
  await agent.start();
  return coordinator;
}

const api = (path: string): string => `http://127.0.0.1:${coordinator!.httpPort}/api/v1${path}`;

async function submit(script: string, extra = ''): Promise<{ drvPath: string; hash: string; request: number }> {
  const file = writeNixFile(
    tempDir(),
    nonce(),
    `{ x = mk "logged" { script = ${JSON.stringify(script)}; ${extra} }; }`,
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

describe('queues over HTTP', () => {
  it('shows what waits in which lane, who serves it, and why nobody does', async () => {
    await start({ unbuildable_grace_seconds: 3600 });
    const { drvPath } = await submit('echo > $out', 'requiredSystemFeatures = [ "kvm" ];');
    type Lane = { system: string; features: string[]; buildable: number; agents: string[]; why?: string };
    const queues = async () =>
      (await checkedFetch(api('/queues'), { headers: auth })).json<{ pending: number; lanes: Lane[] }>();
    await expect.poll(async () => (await queues()).lanes.length).toBe(1);
    const { pending, lanes } = await queues();
    expect(pending).toBe(1);
    expect(lanes[0]).toMatchObject({ kind: 'build', features: ['kvm'], untrusted: false, buildable: 1, agents: [] });
    expect(lanes[0]!.why).toBe(
      `no connected agent builds ${coordinator!.store.derivation(drvPath)!.system} with features kvm`,
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
