import {
  chmodSync,
  closeSync,
  existsSync,
  fstatSync,
  openSync,
  readSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { randomUUID } from 'node:crypto';
import { createServer as createHttpServer, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { ServerCredentials, status } from '@grpc/grpc-js';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AuthError } from '../common/errors.js';
import { runNixChecked } from '../common/nix/cli.js';
import { createLogger, silentLogger } from '../common/logging.js';
import { PROTOCOL_VERSION } from '../common/protocol-version.js';
import { Outcome, type Assign, type JobEvent } from '../common/proto/ekaci/agent/v1/agent.js';
import { Agent } from './agent.js';
import { CoordinatorRefusedError } from './errors.js';
import { compileAgentOptions, type AgentOptionsInput } from './options.js';
import { shellDerivation } from './testing/derivations.js';
import { testAssign } from './testing/assign.js';
import { is, ScriptedCoordinator, type ScriptOptions } from './testing/scripted-coordinator.js';
import { alive } from './testing/processes.js';

let dir: string;
let cacheDir: string;
const agents: Agent[] = [];
const coordinators: ScriptedCoordinator[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-agent-'));
  cacheDir = join(dir, 'cache');
});

afterEach(async () => {
  await Promise.all(agents.splice(0).map((a) => a.stopNow()));
  await Promise.all(coordinators.splice(0).map((c) => c.stop()));
  rmSync(dir, { recursive: true, force: true });
});

async function coordinator(options: Partial<ScriptOptions> = {}): Promise<ScriptedCoordinator> {
  const c = await ScriptedCoordinator.start({
    ...options,
    welcome: { cacheUrl: `file://${cacheDir}`, ...options.welcome },
  });
  coordinators.push(c);
  return c;
}

function agent(c: ScriptedCoordinator, options: Partial<AgentOptionsInput> = {}): Agent {
  const a = new Agent(
    compileAgentOptions({
      coordinator: c.address,
      token: 'test-token',
      agentId: 'test-agent',
      maxJobs: 2,
      spoolDir: join(dir, 'spool'),
      logger: silentLogger(),
      backoffBaseMs: 20,
      backoffCapMs: 100,
      ...options,
    }),
  );
  agents.push(a);
  return a;
}

function assign(leaseId: string, drvPath: string, extra: Partial<Assign> = {}): { $case: 'assign'; value: Assign } {
  return { $case: 'assign', value: testAssign(leaseId, drvPath, extra) };
}

function finishedOf(event: JobEvent) {
  if (event.event?.$case !== 'finished') throw new Error(`not a finished event: ${event.event?.$case}`);
  return event.event.value;
}

const HELLO_LOG = 'echo hello; i=0; while [ $i -lt 20 ]; do echo "line $i"; i=$((i+1)); done; echo x > $out';

describe('Agent', () => {
  it('opens the stream with the bearer token and a Hello describing this builder', async () => {
    const c = await coordinator();
    const a = agent(c, { systems: ['x86_64-linux', 'i686-linux'], features: ['kvm'], mandatoryFeatures: ['big'] });
    await a.start();
    const s = await c.stream(0);
    expect(s.metadata.get('authorization')).toEqual(['Bearer test-token']);
    expect(s.hello).toMatchObject({
      agentId: 'test-agent',
      protocolVersion: PROTOCOL_VERSION,
      os: 'linux',
      systems: ['x86_64-linux', 'i686-linux'],
      supportedFeatures: ['kvm'],
      mandatoryFeatures: ['big'],
      maxJobs: 2,
      runningLeases: [],
      sessionNonce: a.sessionNonce,
    });
    expect(s.hello?.nixVersion).toMatch(/^\d+\.\d+/);
    expect(s.received[0]?.msg?.$case).toBe('hello');
    expect(a.status).toBe('running');
  });

  it('advertises its free slots after Welcome and builds a trivial derivation end to end', async () => {
    const c = await coordinator();
    const a = agent(c, { logChunkBytes: 10 });
    await a.start();
    const s = await c.stream(0);
    const credit = await s.waitFor(is.credit);
    expect(credit.msg?.value).toEqual({ freeSlots: 2, draining: false });

    const drv = await shellDerivation(HELLO_LOG);
    s.send(assign('lease-1', drv));
    const settled = new Promise((resolve) => a.once('settled', resolve));
    await s.waitFor(is.event('lease-1', 'finished'));
    await settled;

    const kinds = c.events.filter((e) => e.leaseId === 'lease-1').map((e) => e.event?.$case);
    expect(kinds).toEqual(['accepted', 'started', 'finished']);
    const finished = finishedOf(c.eventsOf('lease-1', 'finished')[0] as JobEvent);
    expect(finished.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(finished.outputs).toHaveLength(1);
    expect(finished.outputs[0]).toMatchObject({ name: 'out' });
    expect(finished.outputs[0]?.narSize).toBeGreaterThan(0);
    expect(finished.outputs[0]?.closureSize).toBeGreaterThan(0);

    const log = c.logs.get('lease-1')?.toString() ?? '';
    expect(log).toContain('hello\nline 0\n');
    expect(log).toContain('line 19\n');
    expect(finished.logBytes).toBe(Buffer.byteLength(log));
    const chunks = s.received.filter((m) => m.msg?.$case === 'logChunk');
    expect(chunks.length).toBeGreaterThan(10);
    for (const m of chunks) if (m.msg?.$case === 'logChunk') expect(m.msg.value.data.length).toBeLessThanOrEqual(10);
    expect(c.violations).toEqual([]);
    // Settled: the spool file and GC roots are gone.
    expect(readdirSync(join(dir, 'spool', 'logs'))).toEqual([]);
    expect(readdirSync(join(dir, 'spool', 'gcroots'))).toEqual([]);
    const hash = finished.outputs[0]?.path.slice(11, 43) ?? '';
    expect(existsSync(join(cacheDir, `${hash}.narinfo`))).toBe(true);
    expect(readFileSync(join(dir, 'spool', 'netrc'), 'utf8')).toBe(
      'machine 127.0.0.1 login ekaci password test-token\n',
    );
  });

  it('leaves outputs in a store it shares with the coordinator, and uploads them from a store of its own', async () => {
    // A path only this machine's store holds stands for the coordinator's marker; an agent here shares that store.
    writeFileSync(join(dir, 'marker'), `marker ${randomUUID()}\n`);
    const marker = (await runNixChecked('nix-store', ['--add', join(dir, 'marker')])).trim();
    const elsewhere = `/nix/store/${'0'.repeat(32)}-ekaci-store-marker`;
    for (const [storeMarker, shared] of [
      [marker, true],
      [elsewhere, false],
    ] as const) {
      const c = await coordinator({ welcome: { storeMarker } });
      const a = agent(c);
      await a.start();
      const s = await c.stream(0);
      const drv = await shellDerivation(`echo ${randomUUID()} > $out`);
      s.send(assign('lease-1', drv));
      await s.waitFor(is.event('lease-1', 'finished'));
      const finished = finishedOf(c.eventsOf('lease-1', 'finished')[0] as JobEvent);
      expect(finished.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
      expect(finished.outputsInCoordinatorStore).toBe(shared);
      expect(finished.outputs[0]?.narSize).toBeGreaterThan(0);
      const hash = finished.outputs[0]?.path.slice(11, 43) ?? '';
      expect(existsSync(join(cacheDir, `${hash}.narinfo`))).toBe(!shared);
      await a.stopNow();
    }
  });

  it('advertises only free slots: a coordinator that assigns by its credits never makes a build wait', async () => {
    const trace = traceFile();
    const drvs = await Promise.all([1, 2, 3, 4, 5, 6].map(() => shellDerivation(tracedBuild(trace))));
    const queue = [...drvs];
    const inFlight = new Set<string>();
    let next = 0;
    const c = await coordinator({
      // No cache: builds start as soon as they are accepted, without waiting for a cache warm-up.
      welcome: { cacheUrl: '' },
      onMessage: (m, s) => {
        if (m.msg?.$case === 'jobEvent' && m.msg.value.event?.$case === 'accepted')
          inFlight.delete(m.msg.value.leaseId);
        if (m.msg?.$case !== 'credit') return;
        // The rule of agent.proto: a Credit's free slots minus the assignments the agent has not yet accepted.
        for (let budget = m.msg.value.freeSlots - inFlight.size; budget > 0 && queue.length > 0; budget--) {
          const leaseId = `pull-${next++}`;
          inFlight.add(leaseId);
          s.send(assign(leaseId, queue.shift() as string));
        }
      },
    });
    const a = agent(c, { maxJobs: 2 });
    const finished: string[] = [];
    a.on('finished', (id) => finished.push(id));
    await a.start();
    await expect.poll(() => finished.length, { timeout: 60_000 }).toBe(drvs.length);
    const s = await c.stream(0);
    const credits = s.received.filter((m) => m.msg?.$case === 'credit');
    expect(credits[0]?.msg?.value).toEqual({ freeSlots: 2, draining: false });
    // A credit that counted a busy slot as free would draw an Assign that waits in the agent's local queue: its
    // Accepted would not be followed at once by its Started.
    const events = s.received.flatMap((m) => (m.msg?.$case === 'jobEvent' ? [m.msg.value] : []));
    events.forEach((e, i) => {
      if (e.event?.$case !== 'accepted') return;
      const following = events[i + 1];
      expect({ leaseId: following?.leaseId, kind: following?.event?.$case }).toEqual({
        leaseId: e.leaseId,
        kind: 'started',
      });
    });
    expect(maxConcurrency(trace)).toBe(2);
  });

  it('queues an Assign beyond its free slots instead of running it', async () => {
    const trace = traceFile();
    const drvs = await Promise.all([1, 2, 3].map(() => shellDerivation(tracedBuild(trace))));
    const c = await coordinator();
    const a = agent(c, { maxJobs: 1 });
    await a.start();
    const s = await c.stream(0);
    drvs.forEach((drv, i) => s.send(assign(`over-${i}`, drv)));
    await Promise.all(drvs.map((_, i) => s.waitFor(is.event(`over-${i}`, 'finished'))));
    expect(maxConcurrency(trace)).toBe(1);
    for (let i = 0; i < 3; i++) {
      expect(finishedOf(c.eventsOf(`over-${i}`, 'finished')[0] as JobEvent).outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    }
  });

  it('gives a build slot to the next build while the last one uploads, with at most max-jobs uploads at once', async () => {
    // A cache that holds every upload until the test answers it, and has nothing to read.
    const held: ServerResponse[] = [];
    const cache = createHttpServer((req, res) => {
      req.resume();
      if (req.method !== 'PUT') {
        if (req.url === '/cache/nix-cache-info') res.writeHead(200).end('StoreDir: /nix/store\n');
        else res.writeHead(404).end();
        return;
      }
      req.on('end', () => held.push(res));
    });
    await new Promise<void>((resolve) => cache.listen(0, '127.0.0.1', resolve));
    const answer = (i: number) => held[i]!.writeHead(204).end();
    try {
      const { port } = cache.address() as AddressInfo;
      const c = await coordinator({ welcome: { cacheUrl: `http://127.0.0.1:${port}/cache` } });
      const a = agent(c, { maxJobs: 1 });
      await a.start();
      const s = await c.stream(0);
      const drvs = await Promise.all([1, 2, 3].map((n) => shellDerivation(`echo ${n} > $out`)));
      drvs.forEach((drv, i) => s.send(assign(`up-${i}`, drv)));

      // up-0 uploads and its slot builds up-1; up-1's upload then keeps its slot, one upload being under way.
      await expect.poll(() => held.length, { timeout: 60_000 }).toBe(2);
      answer(0);
      await s.waitFor(is.event('up-0', 'finished'));
      answer(1);
      await expect.poll(() => held.length, { timeout: 60_000 }).toBe(3);
      answer(2);
      await Promise.all(drvs.map((_, i) => s.waitFor(is.event(`up-${i}`, 'finished'))));

      // One stream, so the events are in the order the agent sent them.
      const order = c.events.map((e) => `${e.leaseId} ${e.event?.$case}`);
      expect(order.indexOf('up-1 started')).toBeLessThan(order.indexOf('up-0 finished'));
      expect(order.indexOf('up-2 started')).toBeGreaterThan(order.indexOf('up-0 finished'));
      for (let i = 0; i < 3; i++) {
        expect(finishedOf(c.eventsOf(`up-${i}`, 'finished')[0] as JobEvent).outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
      }
    } finally {
      cache.closeAllConnections();
      await new Promise((resolve) => cache.close(resolve));
    }
  });

  it('never has more log bytes in flight than the window beyond the last LogAck', async () => {
    const window = 30;
    const acked = new Map<string, number>();
    let worst = 0;
    const c = await coordinator({
      autoAckLogs: false,
      welcome: { logWindowBytes: window },
      onMessage: (m, s) => {
        if (m.msg?.$case !== 'logChunk') return;
        const { leaseId, offset, data } = m.msg.value;
        worst = Math.max(worst, offset + data.length - (acked.get(leaseId) ?? 0));
        setTimeout(() => {
          const stored = c.logs.get(leaseId)?.length ?? 0;
          acked.set(leaseId, stored);
          s.send({ $case: 'logAck', value: { leaseId, storedBytes: stored } });
        }, 5);
      },
    });
    const a = agent(c, { logChunkBytes: 10 });
    await a.start();
    const s = await c.stream(0);
    s.send(assign('windowed', await shellDerivation(HELLO_LOG)));
    await s.waitFor(is.event('windowed', 'finished'));
    expect(worst).toBeGreaterThan(10);
    expect(worst).toBeLessThanOrEqual(window);
    expect(c.logs.get('windowed')?.toString()).toContain('line 19\n');
    expect(c.violations).toEqual([]);
  });

  it('reports a failing builder as FAILED and a silent one as TIMED_OUT', async () => {
    const c = await coordinator();
    const a = agent(c);
    await a.start();
    const s = await c.stream(0);
    s.send(assign('fails', await shellDerivation('echo broken; exit 7')));
    s.send(assign('silent', await shellDerivation('echo start; /bin/sleep 10'), { maxSilentSeconds: 1 }));
    const fails = finishedOf((await s.waitFor(is.event('fails', 'finished'))).msg?.value as JobEvent);
    expect(fails.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(fails.error).toMatch(/exit code 7/);
    expect(c.logs.get('fails')?.toString()).toContain('broken');
    const silent = finishedOf((await s.waitFor(is.event('silent', 'finished'))).msg?.value as JobEvent);
    expect(silent.outcome).toBe(Outcome.OUTCOME_TIMED_OUT);
  });

  it('resends unacknowledged events after a reconnect, in order and with the same message ids', async () => {
    const c = await coordinator({ autoAckEvents: false });
    const a = agent(c);
    await a.start();
    const first = await c.stream(0);
    first.send(assign('resend', await shellDerivation('echo x > $out')));
    await first.waitFor(is.event('resend', 'finished'));
    const before = c.events.filter((e) => e.leaseId === 'resend');
    expect(before.map((e) => e.event?.$case)).toEqual(['accepted', 'started', 'finished']);

    c.options.autoAckEvents = true;
    first.fail(status.UNAVAILABLE, 'coordinator restarting');
    const second = await c.stream(1);
    await second.waitFor(is.event('resend', 'finished'));
    expect(second.hello?.runningLeases.map((l) => l.leaseId)).toEqual(['resend']);
    expect(second.hello?.sessionNonce).toBe(first.hello?.sessionNonce);
    const again = second.received.flatMap((m) => (m.msg?.$case === 'jobEvent' ? [m.msg.value] : []));
    expect(again.map((e) => e.messageId)).toEqual(before.map((e) => e.messageId));
    expect(again).toEqual(before);
    await new Promise((resolve) => a.once('settled', resolve));
    expect(a.status).toBe('running');
  });

  it('resumes a log at the offset the coordinator has, without losing or repeating a byte', async () => {
    const c = await coordinator({ autoAckLogs: false, welcome: { logWindowBytes: 30 } });
    const a = agent(c, { logChunkBytes: 10 });
    let spooled = '';
    a.on('finished', () => (spooled = readFileSync(join(dir, 'spool', 'logs', 'resume.log'), 'utf8')));
    await a.start();
    const first = await c.stream(0);
    first.send(assign('resume', await shellDerivation(HELLO_LOG)));
    await expect.poll(() => c.logs.get('resume')?.length ?? 0).toBe(30);
    // The coordinator persisted only the first 20 bytes before it lost the stream.
    c.logs.set('resume', c.logs.get('resume')?.subarray(0, 20) ?? Buffer.alloc(0));
    c.options.autoAckLogs = true;
    c.options.welcome = { ...c.options.welcome, logWindowBytes: 1024 };
    first.fail(status.UNAVAILABLE, 'network blip');

    const second = await c.stream(1);
    await second.waitFor(is.event('resume', 'finished'));
    expect(second.hello?.runningLeases[0]?.logBytes).toBeGreaterThanOrEqual(30);
    const chunks = second.received.flatMap((m) => (m.msg?.$case === 'logChunk' ? [m.msg.value] : []));
    expect(chunks[0]?.offset).toBe(20);
    expect(c.violations).toEqual([]);
    expect(c.logs.get('resume')?.toString()).toBe(spooled);
    expect(spooled).toContain('hello\nline 0\n');
  });

  it('cancels a running build on Cancel: kills its processes, acknowledges, reports CANCELLED', async () => {
    const c = await coordinator();
    const a = agent(c);
    await a.start();
    const s = await c.stream(0);
    s.send(assign('cancel-me', await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait')));
    const pids = await pidsIn(c, 'cancel-me');
    expect(pids.every(alive)).toBe(true);
    s.send({ $case: 'cancel', value: { leaseId: 'cancel-me', graceSeconds: 2, reason: 'superseded' } });
    await s.waitFor(is.cancelAck('cancel-me'));
    await expect.poll(() => pids.filter(alive), { timeout: 2000 }).toEqual([]);
    const finished = finishedOf((await s.waitFor(is.event('cancel-me', 'finished'))).msg?.value as JobEvent);
    expect(finished.outcome).toBe(Outcome.OUTCOME_CANCELLED);
    expect(finished.error).toBe('cancelled: superseded');
    const order = s.received.map((m) => m.msg?.$case);
    expect(order.indexOf('cancelAck')).toBeLessThan(order.lastIndexOf('jobEvent'));
  });

  it('stops a lease the coordinator did not renew in a HeartbeatAck', async () => {
    let renew = true;
    const c = await coordinator({
      welcome: { heartbeatIntervalMs: 50 },
      onMessage: (m, s) => {
        if (m.msg?.$case !== 'heartbeat') return;
        const renewedLeaseIds = renew ? m.msg.value.leaseIds : [];
        s.send({ $case: 'heartbeatAck', value: { renewedLeaseIds, leaseExpiresAtMs: 0 } });
      },
    });
    const a = agent(c, { localCancelGraceMs: 1000 });
    await a.start();
    const s = await c.stream(0);
    s.send(assign('orphan', await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait')));
    const pids = await pidsIn(c, 'orphan');
    renew = false;
    await expect.poll(() => pids.filter(alive), { timeout: 5000 }).toEqual([]);
    await expect
      .poll(() => s.received.filter(is.heartbeat).at(-1)?.msg?.value, { timeout: 2000 })
      .toEqual({ leaseIds: [] });
    expect(c.eventsOf('orphan', 'finished')).toEqual([]);
  });

  it('reconnects within a heartbeat interval while it holds a lease, however long its backoff has grown', async () => {
    const c = await coordinator({ welcome: { heartbeatIntervalMs: 100 } });
    const lines: string[] = [];
    const logger = createLogger('agent', 'warn', { write: (line: string) => void lines.push(line) });
    // Left to itself, this backoff would wait 30 to 60 s: past the lease TTL a restarted coordinator allows.
    const a = agent(c, { backoffBaseMs: 60_000, backoffCapMs: 60_000, logger });
    await a.start();
    const first = await c.stream(0);
    first.send(assign('held', await shellDerivation('/bin/sleep 60')));
    await first.waitFor(is.event('held', 'started'));
    first.fail(status.UNAVAILABLE, 'the coordinator restarts');
    const second = await c.stream(1);
    const hello = await second.waitFor((m) => m.msg?.$case === 'hello');
    expect(hello.msg?.$case === 'hello' && hello.msg.value.runningLeases.map((l) => l.leaseId)).toEqual(['held']);
    const retries = lines.map((l) => JSON.parse(l) as { retryInMs?: number }).filter((l) => l.retryInMs !== undefined);
    expect(retries).toHaveLength(1);
    expect(retries[0]!.retryInMs).toBeLessThanOrEqual(100);
  });

  it('drops a lease the coordinator does not keep after a reconnect', async () => {
    const c = await coordinator();
    const a = agent(c, { localCancelGraceMs: 1000 });
    await a.start();
    const first = await c.stream(0);
    first.send(assign('stale', await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait')));
    const pids = await pidsIn(c, 'stale');
    c.options.onHello = (hello, s) => {
      const welcome = c.welcomeFor(hello);
      welcome.leaseDecisions = welcome.leaseDecisions.map((d) => ({ ...d, keep: false, reason: 'lease expired' }));
      s.send({ $case: 'welcome', value: welcome });
    };
    first.fail(status.UNAVAILABLE, 'gone');
    const second = await c.stream(1);
    await second.waitFor(is.credit);
    await expect.poll(() => pids.filter(alive), { timeout: 5000 }).toEqual([]);
    expect(second.received.filter((m) => m.msg?.$case === 'jobEvent')).toEqual([]);
    await expect.poll(() => readdirSync(join(dir, 'spool', 'logs'))).toEqual([]);
  });

  it('advertises no slots and says it is draining when the coordinator asks it to drain', async () => {
    const c = await coordinator();
    const a = agent(c);
    await a.start();
    const s = await c.stream(0);
    s.send({ $case: 'drain', value: { reason: 'maintenance' } });
    const credit = await s.waitFor(is.draining);
    expect(credit.msg?.value).toEqual({ freeSlots: 0, draining: true });
    expect(a.status).toBe('running');
  });

  it('drains on stopGracefully: takes no new work, finishes and reports the running build, then closes', async () => {
    const c = await coordinator();
    const a = agent(c);
    await a.start();
    const s = await c.stream(0);
    s.send(assign('last', await shellDerivation('/bin/sleep 0.5; echo done; echo x > $out')));
    await s.waitFor(is.event('last', 'started'));
    const stopped = a.stopGracefully();
    expect(a.status).toBe('draining');
    expect((await s.waitFor(is.draining)).msg?.value).toEqual({ freeSlots: 0, draining: true });
    await stopped;
    expect(a.status).toBe('stopped');
    expect(finishedOf(c.eventsOf('last', 'finished')[0] as JobEvent).outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
    expect(c.logs.get('last')?.toString()).toContain('done');
    await s.whenEnded();
  });

  it('kills running builds and closes at once on stopNow', async () => {
    const c = await coordinator();
    const a = agent(c, { stopNowGraceMs: 1000 });
    await a.start();
    const s = await c.stream(0);
    s.send(assign('doomed', await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait')));
    const pids = await pidsIn(c, 'doomed');
    await a.stopNow();
    expect(a.status).toBe('stopped');
    await expect.poll(() => pids.filter(alive), { timeout: 2000 }).toEqual([]);
    await s.whenEnded();
  });

  it('holds log chunks back while the coordinator does not read, then streams the log intact', async () => {
    // A window far larger than the log: only the stream's back-pressure can hold the chunks back.
    const c = await coordinator({ welcome: { logWindowBytes: 256 * 1024 * 1024 } });
    const a = agent(c, { logChunkBytes: 4096 });
    let spooled = Buffer.alloc(0);
    const spoolFile = join(dir, 'spool', 'logs', 'big.log');
    a.on('finished', () => (spooled = readFileSync(spoolFile)));
    await a.start();
    const s = await c.stream(0);
    c.options.onMessage = (m) => {
      if (m.msg?.$case === 'logChunk' && m.msg.value.offset === 0) s.pause();
    };
    const line = 'x'.repeat(999);
    const script = `/usr/bin/yes ${line} | /usr/bin/head -n 8000; echo end of the log; echo x > $out`;
    s.send(assign('big', await shellDerivation(script)));
    // The whole log (8 MB, 2,000 chunks) is spooled while the coordinator reads nothing.
    await expect.poll(() => tail(spoolFile, 64).includes('end of the log'), { timeout: 60_000 }).toBe(true);
    s.resume();
    await s.waitFor(is.event('big', 'finished'));
    expect(spooled.length).toBeGreaterThan(8_000_000);
    expect(c.logs.get('big')?.equals(spooled)).toBe(true);
    // gRPC buffers 16 messages before write() says to wait; a few small ones (credit, events) may queue behind.
    expect(a.streamBacklog.peak).toBeGreaterThanOrEqual(16);
    expect(a.streamBacklog.peak).toBeLessThanOrEqual(24);
  });

  it('reopens the stream when the coordinator stops answering heartbeats', async () => {
    const c = await coordinator({ welcome: { heartbeatIntervalMs: 30 } });
    const a = agent(c);
    const reasons: string[] = [];
    a.on('disconnected', (reason) => reasons.push(reason));
    await a.start();
    await c.stream(1);
    expect(reasons[0]).toMatch(/^CANCELLED/);
    expect(a.status).toBe('running');
  });

  it('connects over TLS when given the root certificate', async () => {
    const key = join(dir, 'key.pem');
    const cert = join(dir, 'cert.pem');
    execFileSync(
      'openssl',
      [
        ...['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost'],
        ...['-addext', 'subjectAltName=DNS:localhost', '-keyout', key, '-out', cert],
      ],
      { stdio: 'ignore' },
    );
    const credentials = ServerCredentials.createSsl(null, [
      { cert_chain: readFileSync(cert), private_key: readFileSync(key) },
    ]);
    const c = await ScriptedCoordinator.start({ welcome: { cacheUrl: `file://${cacheDir}` } }, credentials);
    coordinators.push(c);
    const a = agent(c, { tlsCaPath: cert, coordinator: `localhost:${c.port}` });
    await a.start();
    expect((await c.stream(0)).metadata.get('authorization')).toEqual(['Bearer test-token']);
  });

  it('stops with a clear error when the coordinator refuses its token', async () => {
    const c = await coordinator();
    const a = agent(c, { token: 'wrong-token' });
    const started = a.start();
    await expect(started).rejects.toBeInstanceOf(AuthError);
    await expect(started).rejects.toThrow(/token refused by coordinator/);
    await expect(a.whenStopped()).rejects.toThrow(/token refused/);
    expect(a.status).toBe('failed');
  });

  it('rejects start() with the code and message of a refusal such as a protocol mismatch', async () => {
    const c = await coordinator({
      onHello: (_hello, s) => {
        s.send({
          $case: 'error',
          value: { code: 'EKACI_ERR_PROTOCOL_MISMATCH', message: 'coordinator 2.0, agent 1.0' },
        });
        s.end();
      },
    });
    const a = agent(c);
    const error = await a.start().then(
      () => null,
      (err: unknown) => err,
    );
    expect(error).toBeInstanceOf(CoordinatorRefusedError);
    expect(error).toMatchObject({
      replyCode: 'EKACI_ERR_PROTOCOL_MISMATCH',
      replyMessage: 'coordinator 2.0, agent 1.0',
    });
    expect(a.status).toBe('failed');
    expect(c.streams).toHaveLength(1);
  });

  it('retries after a refusal that is not known to be permanent', async () => {
    const c = await coordinator({
      onHello: (hello, s) => {
        if (s.index === 0) {
          s.send({ $case: 'error', value: { code: 'EKACI_ERR_BUSY', message: 'still starting' } });
          s.end();
        } else {
          s.send({ $case: 'welcome', value: c.welcomeFor(hello) });
        }
      },
    });
    const a = agent(c);
    await a.start();
    expect(c.streams).toHaveLength(2);
  });
});

/** A file builders may append to: they run as Nix build users, not as the test's user. */
function traceFile(): string {
  const traceDir = join(dir, 'trace');
  mkdirSync(traceDir);
  chmodSync(dir, 0o755);
  const trace = join(traceDir, 'trace');
  writeFileSync(trace, '');
  // Concurrent builds run as different build users.
  chmodSync(trace, 0o666);
  return trace;
}

/** A builder that records when it starts and ends, to measure how many ran at once. */
function tracedBuild(trace: string): string {
  return `echo "+ $(/bin/date +%s%N)" >> ${trace}; /bin/sleep 0.3; echo "- $(/bin/date +%s%N)" >> ${trace}; echo x > $out`;
}

function maxConcurrency(trace: string): number {
  const marks = readFileSync(trace, 'utf8')
    .trim()
    .split('\n')
    .map((line) => line.split(' '))
    .map(([sign, ns]) => ({ delta: sign === '+' ? 1 : -1, at: BigInt(ns ?? '0') }))
    .sort((x, y) => (x.at === y.at ? x.delta - y.delta : x.at < y.at ? -1 : 1));
  let now = 0;
  let max = 0;
  for (const m of marks) max = Math.max(max, (now += m.delta));
  return max;
}

/** The last `bytes` bytes of a file ('' while it does not exist). */
function tail(path: string, bytes: number): string {
  if (!existsSync(path)) return '';
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const buffer = Buffer.alloc(Math.min(bytes, size));
    readSync(fd, buffer, 0, buffer.length, size - buffer.length);
    return buffer.toString('utf8');
  } finally {
    closeSync(fd);
  }
}

async function pidsIn(c: ScriptedCoordinator, leaseId: string): Promise<number[]> {
  await expect.poll(() => /pids \d+ \d+/.test(c.logs.get(leaseId)?.toString() ?? ''), { timeout: 10_000 }).toBe(true);
  const m = /pids (\d+) (\d+)/.exec(c.logs.get(leaseId)?.toString() ?? '');
  return m === null ? [] : [Number(m[1]), Number(m[2])];
}
