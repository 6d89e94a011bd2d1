import { status } from '@grpc/grpc-js';
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { runNixChecked, NO_SUBSTITUTERS } from '../common/nix/cli.js';
import { Outcome } from '../common/proto/ekaci/agent/v1/agent.js';
import { PROTOCOL_VERSION } from '../common/protocol-version.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { RawAgent, startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

let coordinator: Coordinator | undefined;
const agents: RawAgent[] = [];

afterEach(async () => {
  for (const a of agents.splice(0)) a.close();
  await coordinator?.stopNow();
  coordinator = undefined;
});

function raw(token: string | undefined): RawAgent {
  const a = new RawAgent(coordinator!.grpcTarget, token);
  agents.push(a);
  return a;
}

async function instantiateAll(body: string): Promise<Record<string, string>> {
  const file = writeNixFile(tempDir(), nonce(), body);
  const names = JSON.parse(
    await runNixChecked('nix-instantiate', [
      ...NO_SUBSTITUTERS,
      '--eval',
      '--json',
      '-E',
      `builtins.attrNames (import ${file})`,
    ]),
  ) as string[];
  const out: Record<string, string> = {};
  for (const n of names) out[n] = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', n])).trim();
  return out;
}

function building(c: Coordinator): number {
  return (c.store.db.prepare("SELECT COUNT(*) AS n FROM derivations WHERE state = 'building'").get() as { n: number })
    .n;
}

/** A coordinator with long leases, one derivation, and a raw agent that has been given it. */
async function leaseOneBuild(overrides: Record<string, unknown> = {}) {
  coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 30, ...overrides });
  const drvs = await instantiateAll('{ only = mk "only" {}; }');
  const a = raw(coordinator.localAgentToken('raw-agent'));
  a.hello();
  await a.next('welcome');
  await coordinator.manager.submit([{ attr: 'only', drvPath: drvs.only! }], 'test');
  a.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
  return { a, lease: await a.next('assign') };
}

describe('the coordinator side of the agent protocol', () => {
  it('refuses a stream without a valid token before reading anything', async () => {
    coordinator = await startCoordinator(tempDir());
    const a = raw('ekaci_not-a-real-token');
    const end = await a.ended();
    expect(end.code).toBe(status.UNAUTHENTICATED);
    expect(end.details).toMatch(/agent token unknown or revoked/);
    await expect(raw(undefined).ended()).resolves.toMatchObject({ code: status.UNAUTHENTICATED });
    expect(coordinator.audit.recent().some((r) => r.action === 'agent.refused')).toBe(true);
  });

  it('refuses a protocol major mismatch naming both versions', async () => {
    coordinator = await startCoordinator(tempDir());
    const a = raw(coordinator.localAgentToken('raw-agent'));
    a.hello({ protocolVersion: { major: PROTOCOL_VERSION.major + 1, minor: 0 } });
    const err = await a.next('error');
    expect(err.code).toBe('EKACI_ERR_PROTOCOL_MISMATCH');
    expect(err.message).toContain(`speaks protocol ${PROTOCOL_VERSION.major + 1}.0`);
    expect(err.message).toContain(`coordinator speaks ${PROTOCOL_VERSION.major}.${PROTOCOL_VERSION.minor}`);
    expect((await a.ended()).code).toBe(status.FAILED_PRECONDITION);
  });

  it('requires Hello as the first message', async () => {
    coordinator = await startCoordinator(tempDir());
    const a = raw(coordinator.localAgentToken('raw-agent'));
    a.send({ $case: 'heartbeat', value: { leaseIds: [] } });
    expect((await a.next('error')).message).toMatch(/expected Hello/);
  });

  it('ends the stream of a revoked token with UNAUTHENTICATED', async () => {
    coordinator = await startCoordinator(tempDir());
    const token = coordinator.tokens.create('builder-1', 'test');
    const a = raw(token);
    a.hello();
    await a.next('welcome');
    coordinator.tokens.revoke('builder-1', 'test');
    coordinator.agentHub.revoked('builder-1');
    expect((await a.ended()).code).toBe(status.UNAUTHENTICATED);
    await expect(raw(token).ended()).resolves.toMatchObject({ code: status.UNAUTHENTICATED });
  });

  it('assigns no more builds than the agent advertised, and acknowledges results after recording them', async () => {
    coordinator = await startCoordinator(tempDir());
    const drvs = await instantiateAll(
      'builtins.listToAttrs (map (i: { name = "d${toString i}"; value = mk "d${toString i}" {}; }) [1 2 3 4 5])',
    );
    const a = raw(coordinator.localAgentToken('raw-agent'));
    a.hello({ maxJobs: 2 });
    await a.next('welcome');
    const request = await coordinator.manager.submit(
      Object.entries(drvs).map(([attr, drvPath]) => ({ attr, drvPath })),
      'test',
    );
    a.send({ $case: 'credit', value: { freeSlots: 2, draining: false } });
    const first = await a.next('assign');
    const second = await a.next('assign', (x) => x.leaseId !== first.leaseId);
    // A dispatch round commits all its leases before it sends any: once two arrived, the round is over, and the
    // database holds every lease it made.
    expect(building(coordinator)).toBe(2);
    expect(a.received.filter((m) => m.msg?.$case === 'assign')).toHaveLength(2);

    a.send({
      $case: 'jobEvent',
      value: { messageId: 1, leaseId: first.leaseId, event: { $case: 'accepted', value: {} } },
    });
    a.send({
      $case: 'jobEvent',
      value: {
        messageId: 2,
        leaseId: first.leaseId,
        event: {
          $case: 'finished',
          value: {
            outcome: Outcome.OUTCOME_FAILED,
            error: 'builder exited 1',
            outputs: [],
            finishedAtMs: Date.now(),
            pushes: [],
            outputsInCoordinatorStore: false,
            logBytes: 0,
          },
        },
      },
    });
    const ack = await a.next('ack', (x) => x.messageIds.includes(2));
    // Each event acknowledged once, in the order it arrived (events committed together share one Ack).
    const acked = a.received.flatMap((m) => (m.msg?.$case === 'ack' ? m.msg.value.messageIds : []));
    expect(acked).toEqual([1, 2]);
    // Committed before the acknowledgement: the state is visible the moment the agent learns of the ack.
    expect(coordinator.store.derivation(first.drvPath)?.state).toBe('failed');

    // A result sent again (after a reconnect) changes nothing and is acknowledged again.
    const eventsBefore = coordinator.store.db.prepare('SELECT COUNT(*) AS n FROM events').get() as { n: number };
    a.send({
      $case: 'jobEvent',
      value: {
        messageId: 2,
        leaseId: first.leaseId,
        event: {
          $case: 'finished',
          value: {
            outcome: Outcome.OUTCOME_SUCCEEDED,
            error: '',
            outputs: [],
            finishedAtMs: 0,
            logBytes: 0,
            pushes: [],
            outputsInCoordinatorStore: false,
          },
        },
      },
    });
    await a.next(
      'ack',
      (x) => x.messageIds.includes(2),
      a.received.indexOf(a.received.find((m) => m.msg?.value === ack)!) + 1,
    );
    expect(coordinator.store.derivation(first.drvPath)?.state).toBe('failed');
    expect(coordinator.store.db.prepare('SELECT COUNT(*) AS n FROM events').get()).toEqual(eventsBefore);

    // One slot freed: exactly one more assignment.
    a.send({
      $case: 'jobEvent',
      value: { messageId: 3, leaseId: second.leaseId, event: { $case: 'accepted', value: {} } },
    });
    a.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    await a.next('assign', (x) => x.leaseId !== first.leaseId && x.leaseId !== second.leaseId);
    expect(building(coordinator)).toBe(2);
    expect(a.received.filter((m) => m.msg?.$case === 'assign')).toHaveLength(3);
    expect(coordinator.manager.isSettled(request)).toBe(false);
  });

  it('acknowledges the job events one group commit recorded in one Ack, each once and in order', async () => {
    const { a, lease } = await leaseOneBuild();
    // Sent together, as an agent that reconnects sends what it kept: they arrive and are committed in few groups.
    const ids = Array.from({ length: 200 }, (_, i) => i + 1);
    for (const messageId of ids) {
      a.send({
        $case: 'jobEvent',
        value: { messageId, leaseId: lease.leaseId, event: { $case: 'accepted', value: {} } },
      });
    }
    await a.next('ack', (x) => x.messageIds.includes(200));
    const acks = a.received.flatMap((m) => (m.msg?.$case === 'ack' ? [m.msg.value.messageIds] : []));
    expect(acks.flat()).toEqual(ids);
    expect(acks.length).toBeLessThan(ids.length);
    expect(coordinator!.store.attempt(lease.leaseId)?.state).toBe('accepted');
  });

  it('commits a result and the lease that takes its slot together, in one transaction', async () => {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 60 });
    const drvs = await instantiateAll('{ d1 = mk "d1" {}; d2 = mk "d2" {}; }');
    const a = raw(coordinator.localAgentToken('raw-agent'));
    a.hello({ maxJobs: 1 });
    await a.next('welcome');
    await coordinator.manager.submit(
      Object.entries(drvs).map(([attr, drvPath]) => ({ attr, drvPath })),
      'test',
    );
    a.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    const first = await a.next('assign');

    // What each top-level transaction of the build store did, from here on.
    const store = coordinator.store;
    const transactions: string[][] = [];
    let current: string[] | undefined;
    const transaction = store.transaction.bind(store);
    store.transaction = <T>(fn: () => T): T => {
      if (current) return transaction(fn);
      current = [];
      transactions.push(current);
      try {
        return transaction(fn);
      } finally {
        current = undefined;
      }
    };
    for (const method of ['finishAttempt', 'insertAttempt'] as const) {
      const original = store[method].bind(store) as (...args: unknown[]) => void;
      store[method] = (...args: unknown[]) => {
        current?.push(method);
        original(...args);
      };
    }

    a.finished(1, first.leaseId, Outcome.OUTCOME_FAILED, 'exit 1');
    a.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    const next = await a.next('assign', (x) => x.leaseId !== first.leaseId);
    expect(next.drvPath).not.toBe(first.drvPath);
    // The dispatch round runs last in the reports' group commit: one commit where there were two.
    expect(transactions.filter((t) => t.length > 0)).toEqual([['finishAttempt', 'insertAttempt']]);
  });

  it('records no more dependents in one group commit than one slice, however many of its reports settled', async () => {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 60 });
    // Two roots with 600 dependents each, failing in the same group commit: 1,200 dependents to record.
    const file = writeNixFile(
      tempDir(),
      nonce(),
      `let a = mk "root-a" {}; b = mk "root-b" {}; in { inherit a b; } // builtins.listToAttrs (builtins.genList (i: {
         name = "x\${toString i}"; value = mk "x\${toString i}" { deps = [ (if i < 600 then a else b) ]; };
       }) 1200)`,
    );
    const all = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file])).trim().split('\n');
    expect(all).toHaveLength(1202);
    const a = raw(coordinator.localAgentToken('raw-agent'));
    a.hello({ maxJobs: 2 });
    await a.next('welcome');
    const request = await coordinator.manager.submit(
      all.map((drvPath, i) => ({ attr: `d${i}`, drvPath })),
      'test',
    );
    a.send({ $case: 'credit', value: { freeSlots: 2, draining: false } });
    const first = await a.next('assign');
    const second = await a.next('assign', (x) => x.leaseId !== first.leaseId);
    const failedDependents = () =>
      (
        coordinator!.store.db
          .prepare("SELECT COUNT(*) AS n FROM derivations WHERE state = 'dependency-failed'")
          .get() as {
          n: number;
        }
      ).n;
    const roots = new Set([first.drvPath, second.drvPath]);
    const atCommit: number[] = [];
    coordinator.manager.on('state', (drvPath: string, state: string) => {
      // Told right after the commit that recorded both failures, before the next slice's.
      if (roots.has(drvPath) && state === 'failed') atCommit.push(failedDependents());
    });
    for (const [i, lease] of [first, second].entries())
      a.finished(i + 1, lease.leaseId, Outcome.OUTCOME_FAILED, 'exit 1');
    const results = await coordinator.manager.waitFor(request);
    expect(results.filter((r) => r.state === 'dependency-failed')).toHaveLength(1200);
    expect(atCommit).toEqual([1000, 1000]);
  });

  it('hands out more leases than one dispatch round holds in rounds after it, taking turns between agents', async () => {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 60 });
    const file = writeNixFile(
      tempDir(),
      nonce(),
      'builtins.listToAttrs (map (i: { name = "d${toString i}"; value = mk "d${toString i}" {}; }) (builtins.genList (i: i) 150))',
    );
    const drvPaths = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file])).trim().split('\n');
    expect(drvPaths).toHaveLength(150);
    const fleet = [raw(coordinator.localAgentToken('left')), raw(coordinator.localAgentToken('right'))];
    for (const a of fleet) {
      a.hello({ maxJobs: 100 });
      await a.next('welcome');
    }
    await coordinator.manager.submit(
      drvPaths.map((drvPath, i) => ({ attr: `d${i}`, drvPath })),
      'test',
    );
    // 200 free slots and 150 buildable derivations: more than one round hands out, and no credit comes after.
    for (const a of fleet) a.send({ $case: 'credit', value: { freeSlots: 100, draining: false } });
    const assigns = (a: RawAgent) => a.received.filter((m) => m.msg?.$case === 'assign').length;
    // Taking turns, each gets half; an agent left waiting would fail this by the test's timeout.
    await Promise.all(fleet.map((a) => a.next('assign', () => assigns(a) === 75)));
    expect(building(coordinator)).toBe(150);
    expect(fleet.map(assigns)).toEqual([75, 75]);
  });

  it('stores log chunks by offset, skipping bytes it already has, and keeps a lease across a reconnect', async () => {
    const { a, lease } = await leaseOneBuild();
    const chunk = (offset: number, text: string): void =>
      a.send({ $case: 'logChunk', value: { leaseId: lease.leaseId, offset, data: Buffer.from(text) } });
    chunk(0, 'hello ');
    chunk(0, 'hello '); // a duplicate
    chunk(3, 'lo world'); // overlaps
    expect((await a.next('logAck', (x) => x.storedBytes === 11)).storedBytes).toBe(11);
    a.close();

    const again = raw(coordinator!.localAgentToken('raw-agent'));
    again.hello({
      runningLeases: [
        { leaseId: lease.leaseId, logBytes: 20 },
        { leaseId: 'unknown-lease', logBytes: 0 },
      ],
    });
    const welcome = await again.next('welcome');
    expect(welcome.leaseDecisions).toEqual([
      { leaseId: lease.leaseId, keep: true, logOffset: 11, reason: '' },
      { leaseId: 'unknown-lease', keep: false, logOffset: 0, reason: 'lease is no longer valid' },
    ]);
    again.send({ $case: 'logChunk', value: { leaseId: lease.leaseId, offset: 11, data: Buffer.from('!\n') } });
    await again.next('logAck', (x) => x.storedBytes === 13);
    const logPath = coordinator!.logs.pathFor(lease.drvPath, lease.attempt);
    expect(readFileSync(logPath, 'utf8')).toBe('hello world!\n');
  });

  it('retries a build whose agent reconnects without it', async () => {
    const { a, lease } = await leaseOneBuild();
    a.close();
    const again = raw(coordinator!.localAgentToken('raw-agent'));
    again.hello({ runningLeases: [] });
    await again.next('welcome');
    again.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    const retry = await again.next('assign');
    expect(retry.drvPath).toBe(lease.drvPath);
    expect(retry.attempt).toBe(2);
    expect(coordinator!.store.attempt(lease.leaseId)?.state).toBe('lost');
  });

  it('measures a build by the agent’s clock, from the Started it reported to its Finished', async () => {
    const { a, lease } = await leaseOneBuild();
    // Built in the store the coordinator uses, so that the result needs no upload.
    const out = (await runNixChecked('nix-store', ['--realise', lease.drvPath, ...NO_SUBSTITUTERS])).trim();
    // The agent's clock runs an hour behind the coordinator's; by it, the build took 7 s.
    const startedAt = Date.now() - 3_600_000;
    a.send({
      $case: 'jobEvent',
      value: { messageId: 1, leaseId: lease.leaseId, event: { $case: 'started', value: { startedAtMs: startedAt } } },
    });
    a.send({
      $case: 'jobEvent',
      value: {
        messageId: 2,
        leaseId: lease.leaseId,
        event: {
          $case: 'finished',
          value: {
            outcome: Outcome.OUTCOME_SUCCEEDED,
            error: '',
            outputs: [{ name: 'out', path: out, narSize: 1, closureSize: 1 }],
            finishedAtMs: startedAt + 7_000,
            logBytes: 0,
            pushes: [],
            outputsInCoordinatorStore: true,
          },
        },
      },
    });
    await a.next('ack', (x) => x.messageIds.includes(2));
    expect(coordinator!.store.derivation(lease.drvPath)?.state).toBe('succeeded');
    expect(coordinator!.store.attempt(lease.leaseId)).toMatchObject({ state: 'succeeded', started_at: startedAt });
    expect(coordinator!.store.db.prepare('SELECT mean_seconds FROM build_durations').all()).toEqual([
      { mean_seconds: 7 },
    ]);
  });
});
