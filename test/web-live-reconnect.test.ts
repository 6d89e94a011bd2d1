import { chmodSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Browser, Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Agent } from '../agent/agent.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import { type SseEvent, sseEvents } from '../common/sse.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { launchBrowser, openPage, screenshot } from './support/browser.js';
import { startWithAgent } from './support/coordinator-harness.js';
import { CuttableProxy, eventually, type ProxiedRequest } from './support/cuttable-proxy.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

/**
 * The web UI's live pages across a network break, in headless Chromium against a real coordinator and agent. The page
 * reaches the coordinator through a TCP proxy that the test cuts (every connection reset, new ones refused) and
 * restores while the coordinator stays up; the proxy's record shows what the page asked for and what it was sent.
 * The event stream resumes with `Last-Event-ID` and is replayed what it missed, or told to `reset` (read everything
 * again) when the coordinator no longer has it; a followed log resumes from the byte it had.
 */

const TOKEN = 'ekaci_api-token-for-the-web-reconnect-tests-0123';
const AGENT = 'reconnect-agent';

let browser: Browser;
let coordinator: Coordinator | undefined;
let agent: Agent | undefined;
let proxy: CuttableProxy | undefined;
let stopFollowing: (() => void) | undefined;
/** What went wrong inside the pages: uncaught errors, and anything the Content-Security-Policy refused. */
let pageErrors: string[] = [];
/** What the pages logged as errors: only a failed request of a cut connection is expected. */
let consoleErrors: string[] = [];

beforeAll(async () => {
  browser = await launchBrowser();
});

afterAll(async () => {
  await browser?.close();
});

afterEach(async () => {
  for (const context of browser.contexts()) await context.close();
  stopFollowing?.();
  stopFollowing = undefined;
  await proxy?.close();
  proxy = undefined;
  await agent?.stopNow();
  agent = undefined;
  await coordinator?.stopNow();
  coordinator = undefined;
  expect(pageErrors).toEqual([]);
  expect(consoleErrors.filter((m) => !CUT_REQUEST.test(m))).toEqual([]);
  pageErrors = [];
  consoleErrors = [];
});

/**
 * How Chromium logs a request that a cut broke: one to the API through the proxy, once it was cut, reset (while it ran,
 * or as soon as a new connection was accepted, before the request went out).
 */
const CUT_REQUEST =
  /^Failed to load resource: (net::ERR_(CONNECTION_RESET|SOCKET_NOT_CONNECTED)|the server responded with a status of 502 \(Bad Gateway\)) \(http:\/\/127\.0\.0\.1:\d+\/api\/v1\/[^ ]*, after a cut\)$/;

async function start(): Promise<void> {
  ({ coordinator, agent } = await startWithAgent(TOKEN, AGENT));
  proxy = await CuttableProxy.start(coordinator.httpPort);
}

/** The coordinator itself, not through the proxy. */
const direct = (path: string): string => `http://127.0.0.1:${coordinator!.httpPort}${path}`;
const auth = { Authorization: `Bearer ${TOKEN}` };

/** A page through the proxy, in a fresh browser context holding the API token. */
async function open(path: string): Promise<Page> {
  const page = await openPage(browser, proxy!.url(path), pageErrors, TOKEN);
  page.on('console', (m) => {
    if (m.type() === 'error')
      consoleErrors.push(`${m.text()} (${m.location().url}${proxy!.wasCut ? ', after a cut' : ''})`);
  });
  return page;
}

/** Marks the page's document: a reload would lose the mark. */
async function mark(page: Page): Promise<void> {
  await page.evaluate(() => ((window as unknown as { reconnectMark: string }).reconnectMark = 'same document'));
}

async function markOf(page: Page): Promise<string | undefined> {
  return page.evaluate(() => (window as unknown as { reconnectMark?: string }).reconnectMark);
}

/**
 * Another reader of the coordinator's events, directly (a second tab elsewhere): the coordinator keeps events for
 * replay only while someone listens. Returns what it has received so far, growing.
 */
async function anotherReader(): Promise<SseEvent[]> {
  const controller = new AbortController();
  const response = await fetch(direct('/api/v1/events'), { headers: auth, signal: controller.signal });
  expect(response.status).toBe(200);
  const events: SseEvent[] = [];
  stopFollowing = () => controller.abort();
  void (async () => {
    try {
      for await (const e of sseEvents(response)) events.push(e);
    } catch {
      // Stopped at the end of the test.
    }
  })();
  return events;
}

/**
 * What a client resuming from event `id` is sent first now: a `reset`, an event it missed (replayed), or — neither —
 * only what comes next: `next` makes something happen once the client is subscribed, and `newest` is the id of the
 * last event before it.
 */
async function resumingFrom(id: string, newest: string, next: () => void): Promise<'replayed' | 'reset' | 'missed'> {
  const controller = new AbortController();
  // Answered once subscribed (the route subscribes before its answer goes out).
  const response = await fetch(direct('/api/v1/events'), {
    headers: { ...auth, 'Last-Event-ID': id },
    signal: controller.signal,
  });
  next();
  try {
    for await (const e of sseEvents(response)) {
      if (e.event === 'reset') return 'reset';
      return eventNumber(e.id) <= eventNumber(newest) ? 'replayed' : 'missed';
    }
    throw new Error('the event stream ended at once');
  } finally {
    controller.abort();
  }
}

/** The place of an event (id `epoch:n`) in the coordinator's order. */
const eventNumber = (id: string | undefined): number => Number(id?.split(':')[1]);

const isAgentEvent = (e: SseEvent, drained: boolean): boolean =>
  e.event === 'agent' && (JSON.parse(e.data) as { id: string; drained: boolean }).drained === drained;

const eventStreams = (): ProxiedRequest[] => proxy!.requestsTo('/api/v1/events');

/** The page's `<html data-live>`: `open` once its event stream is, `failed` once it noticed the stream broke. */
const liveState = (page: Page, state: 'open' | 'failed'): Promise<void> =>
  page.locator(`html[data-live="${state}"]`).waitFor({ state: 'attached' });

const shot = screenshot;

/**
 * Opens `path` (a page with the agents table) through the proxy, with another reader of the events beside it, and
 * drains the agent while the page is connected: the page shows it by itself, and has an event to resume from.
 */
async function drainedWhileWatched(path: string) {
  await start();
  const others = await anotherReader();
  const page = await open(path);
  const row = page.locator(`table.agents tr[data-agent="${AGENT}"]`);
  await row.waitFor();
  await liveState(page, 'open');
  coordinator!.agentHub.drainAgent(AGENT, 'test', 'before the break');
  await row.locator('.drained', { hasText: 'before the break' }).waitFor();
  await mark(page);
  expect(eventStreams()).toHaveLength(1);
  const lastSeen = proxy!.eventsOf(eventStreams()[0]!).at(-1)!;
  expect(isAgentEvent(lastSeen, true)).toBe(true);
  return { others, page, row, lastSeen };
}

describe('the live pages across a network break', () => {
  it('keeps the overview live: it resumes with Last-Event-ID and is replayed what changed meanwhile', async () => {
    const { others, page, row, lastSeen } = await drainedWhileWatched('/');

    proxy!.cut();
    await liveState(page, 'failed');
    await shot(page, 'web-reconnect-overview-cut.png');
    // What changes while the page is cut off: the agent is resumed.
    coordinator!.agentHub.resumeAgent(AGENT, 'test');
    const missed = await eventually('the resume event', () =>
      others.find((e) => eventNumber(e.id) > eventNumber(lastSeen.id) && isAgentEvent(e, false)),
    );
    expect(await row.locator('.drained').count()).toBe(1);

    proxy!.restore();
    const resumed = await eventually('the event stream again', () => eventStreams()[1]);
    expect(resumed.headers['last-event-id']).toBe(lastSeen.id);
    const replayed = await eventually('the missed event replayed', () =>
      proxy!.eventsOf(resumed).find((e) => e.id === missed.id),
    );
    expect(replayed.data).toBe(missed.data);
    // Replayed, so not told to reset (the coordinator resets a client only instead of replaying).
    expect(proxy!.eventsOf(resumed).map((e) => e.event)).not.toContain('reset');
    await page.locator(`table.agents tr[data-agent="${AGENT}"]:not(:has(.drained))`).waitFor();
    await liveState(page, 'open');
    expect(await row.locator('.badge').first().textContent()).toBe('connected');
    // Without a reload: the same document, fetched once.
    expect(await markOf(page)).toBe('same document');
    expect(proxy!.requests.filter((r) => r.path === '/')).toHaveLength(1);
    await shot(page, 'web-reconnect-overview-restored.png');
  });

  it('makes the agents page read everything again when it missed more events than the coordinator keeps', async () => {
    const { others, page, row, lastSeen } = await drainedWhileWatched('/agents');

    proxy!.cut();
    await liveState(page, 'failed');
    // While the page is cut off, the agent is resumed and drained again until a client resuming where the page
    // stopped is no longer replayed (coordinator/events.ts keeps the last RECENT_EVENTS while someone listens).
    const hub = coordinator!.agentHub;
    let published = 0;
    const resume = (): void => {
      if (!hub.resumeAgent(AGENT, 'test')) throw new Error(`no agent ${AGENT}`);
      published++;
    };
    const drain = (reason: string): void => {
      if (!hub.drainAgent(AGENT, 'test', reason)) throw new Error(`no agent ${AGENT}`);
      published++;
    };
    let outcome: 'replayed' | 'reset' | 'missed';
    do {
      for (let batch = 0; batch < 5; batch++) {
        const expected = others.length + 1000;
        for (let i = 0; i < 500; i++) {
          resume();
          drain('flooding');
        }
        // The other reader takes them as they come (a reader that falls far behind is dropped).
        await eventually('the other reader keeping up', () => (others.length >= expected ? true : undefined));
      }
      outcome = await resumingFrom(lastSeen.id!, others.at(-1)!.id!, resume);
      drain('flooding');
      expect(outcome, 'a client resuming from the page’s last event missed events unwarned').not.toBe('missed');
      expect(published, 'a client resuming from the page’s last event is still replayed').toBeLessThan(60_000);
    } while (outcome === 'replayed');
    const final = `after ${published + 2} events`;
    resume();
    drain(final);
    expect(await row.locator('.drained', { hasText: 'before the break' }).count()).toBe(1);

    proxy!.restore();
    const resumed = await eventually('the event stream again', () => eventStreams()[1]);
    expect(resumed.headers['last-event-id']).toBe(lastSeen.id);
    const reset = await eventually('a reset', () => proxy!.eventsOf(resumed).find((e) => e.event === 'reset'));
    // Nothing of the gap is replayed: the page reads the agents and queues again, after the reset.
    expect(proxy!.eventsOf(resumed).filter((e) => e.event === 'agent')).toEqual([]);
    for (const data of ['/api/v1/agents', '/api/v1/queues']) {
      await eventually(`${data} read after the reset`, () => proxy!.requestsTo(data).find((r) => r.seq > reset.seq));
    }
    await row.locator('.drained', { hasText: final }).waitFor();
    await liveState(page, 'open');
    expect(await markOf(page)).toBe('same document');
    expect(proxy!.requests.filter((r) => r.path === '/agents')).toHaveLength(1);
    await shot(page, 'web-reconnect-agents-reset.png');
  });

  it('follows a build’s log across a break: every line once, in order, through the end', async () => {
    await start();
    const gates = tempDir();
    chmodSync(gates, 0o755);
    const gate = (n: number): string => join(gates, `gate-${n}`);
    // Builds here are not sandboxed and see /tmp; bounded, so that a sandboxed builder goes on by itself.
    const until = (file: string): string =>
      `j=0; while [ ! -e ${file} ] && [ $j -lt 600 ]; do /bin/sleep 0.1; j=$((j+1)); done`;
    const lines = (to: number, pause: string): string =>
      `while [ $i -le ${to} ]; do echo "line $i of 50"; ${pause} i=$((i+1)); done`;
    const script = [
      'i=1',
      lines(10, ''),
      until(gate(1)),
      // Printed slowly: the break comes while they flow.
      lines(40, '/bin/sleep 0.1;'),
      until(gate(2)),
      lines(50, ''),
      'echo > $out',
    ].join('; ');
    const file = writeNixFile(tempDir(), nonce(), `{ x = mk "log" { script = ${JSON.stringify(script)}; }; }`);
    const drvPath = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', 'x'])).trim();
    await coordinator!.manager.submit([{ attr: 'x', drvPath }], 'test');
    const hash = drvPath.slice('/nix/store/'.length, '/nix/store/'.length + 32);
    const stored = async (): Promise<string> => {
      const r = await fetch(direct(`/api/v1/derivations/${hash}/attempts/1/log`), { headers: auth });
      return r.status === 200 ? r.text() : '';
    };

    const page = await open(`/builds/${hash}`);
    const log = page.locator('.log-text');
    const status = page.locator('.log-status');
    await page.locator('.log-text', { hasText: 'line 10 of 50' }).waitFor();
    await page.locator('.log-status[data-state="live"]').waitFor();
    writeFileSync(gate(1), '');
    await page.locator('.log-text', { hasText: 'line 15 of 50' }).waitFor();

    proxy!.cut();
    await page.locator('.log-status[data-state="reconnecting"]').waitFor();
    await shot(page, 'web-reconnect-log-cut.png');
    // The build goes on meanwhile: what it prints reaches the coordinator, not the page.
    await eventually('line 40 at the coordinator', async () =>
      (await stored()).includes('line 40 of 50') ? true : undefined,
    );
    expect(await log.textContent()).not.toContain('line 40 of 50');

    // Then what a reverse proxy answers while the coordinator behind it restarts: the page tries again.
    proxy!.answerBadGateway();
    await eventually('a 502 answered to the page', () => (proxy!.badGatewayAnswers > 0 ? true : undefined));
    await status.filter({ hasText: 'trying again' }).waitFor();
    proxy!.restore();
    const follows = (): ProxiedRequest[] => proxy!.requestsTo(`/api/v1/derivations/${hash}/attempts/1/log?follow=1`);
    const resumed = await eventually('the log followed again', () => follows()[1]);
    // From the byte after the last event it had: the end of one of the events passed before the cut.
    const before = proxy!.eventsOf(follows()[0]!).filter((e) => e.event === 'log');
    expect(before.length).toBeGreaterThan(0);
    expect(before.map((e) => e.id)).toContain(resumed.headers['last-event-id']);
    await page.locator('.log-text', { hasText: 'line 40 of 50' }).waitFor();
    await page.locator('.log-status[data-state="live"]').waitFor();
    expect(await log.textContent()).toBe(await stored());
    await shot(page, 'web-reconnect-log-restored.png');

    writeFileSync(gate(2), '');
    await page.locator('#build-state', { hasText: 'succeeded' }).waitFor();
    await status.filter({ hasText: 'Attempt 1 succeeded' }).waitFor();
    const text = (await log.textContent())!;
    expect(text).toBe(await stored());
    const numbered = text.split('\n').filter((l) => l.startsWith('line '));
    expect(numbered).toEqual(Array.from({ length: 50 }, (_, i) => `line ${i + 1} of 50`));
    expect(proxy!.requests.filter((r) => r.path === `/builds/${hash}`)).toHaveLength(1);
    await shot(page, 'web-reconnect-log-ended.png');
  });
});
