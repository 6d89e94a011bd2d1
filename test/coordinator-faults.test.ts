import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import { type Assign, Outcome } from '../common/proto/ekaci/agent/v1/agent.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { RawAgent, startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

/**
 * Faults and limits on the coordinator's side of the build path, driven message by message over real gRPC: a
 * handler whose database write fails, a cancel while the agent is away, a log over its limit, log bytes that arrive
 * after their result, two requests racing for the same derivations.
 */

let coordinator: Coordinator | undefined;
const agents: RawAgent[] = [];

afterEach(async () => {
  for (const a of agents.splice(0)) a.close();
  await coordinator?.stopNow();
  coordinator = undefined;
});

function raw(): RawAgent {
  const a = new RawAgent(coordinator!.grpcTarget, coordinator!.localAgentToken('raw-agent'));
  agents.push(a);
  return a;
}

async function instantiate(body: string): Promise<string> {
  const file = writeNixFile(tempDir(), nonce(), `{ only = ${body}; }`);
  return (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', 'only'])).trim();
}

/** A coordinator on `dir`, one derivation submitted, and a raw agent that holds its lease. */
async function leased(dir: string, overrides: Record<string, unknown> = {}): Promise<{ a: RawAgent; lease: Assign }> {
  coordinator = await startCoordinator(dir, { lease_ttl_seconds: 30, ...overrides });
  const drvPath = await instantiate('mk "only" {}');
  const a = raw();
  a.hello();
  await a.next('welcome');
  await coordinator.manager.submit([{ attr: 'only', drvPath }], 'test');
  a.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
  return { a, lease: await a.next('assign') };
}

const state = (drvPath: string): string | undefined => coordinator!.store.derivation(drvPath)?.state;

describe('the coordinator under faults', () => {
  it('leaves a result whose write failed unacknowledged, ends the stream, and records it when it comes again', async () => {
    const { a, lease } = await leased(tempDir());
    // The database refuses the write the way a full disk or a corrupt page would: an error from SQLite mid-handler.
    coordinator!.store.db.exec(
      `CREATE TRIGGER refuse BEFORE UPDATE OF state ON attempts WHEN NEW.state = 'failed'
       BEGIN SELECT RAISE(ABORT, 'injected: disk I/O error'); END`,
    );
    a.finished(7, lease.leaseId, Outcome.OUTCOME_FAILED, 'builder exited 1');
    // The stream ends, so that the agent reconnects and sends what was not acknowledged again at once.
    expect(await a.ended()).toMatchObject({ details: expect.stringMatching(/EKACI_ERR_UNAVAILABLE/) as unknown });
    expect(await coordinator!.health.count('job event finished', 'error')).toBe(1);
    expect(a.received.some((m) => m.msg?.$case === 'ack' && m.msg.value.messageIds.includes(7))).toBe(false);
    expect(state(lease.drvPath)).toBe('building');
    expect(coordinator!.manager.openLease(lease.leaseId)?.drvPath).toBe(lease.drvPath);

    // The coordinator goes on: the agent reconnects and keeps its lease.
    const again = raw();
    again.hello({ runningLeases: [{ leaseId: lease.leaseId, logBytes: 0 }] });
    expect((await again.next('welcome')).leaseDecisions[0]?.keep).toBe(true);
    coordinator!.store.db.exec('DROP TRIGGER refuse');
    again.finished(7, lease.leaseId, Outcome.OUTCOME_FAILED, 'builder exited 1');
    await again.next('ack', (x) => x.messageIds.includes(7));
    expect(state(lease.drvPath)).toBe('failed');
    expect(coordinator!.store.attempt(lease.leaseId)?.state).toBe('failed');
  });

  it('commits results that arrive together as one group, where one whose write fails spoils none of the others', async () => {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 30 });
    const a = raw();
    a.hello();
    await a.next('welcome');
    const file = writeNixFile(
      tempDir(),
      nonce(),
      'rec { left = mk "left" {}; right = mk "right" {}; top = mk "top" { deps = [ left ]; }; }',
    );
    const args = [...NO_SUBSTITUTERS, file, '-A', 'left', '-A', 'right', '-A', 'top'];
    const [left, right, top] = (await runNixChecked('nix-instantiate', args)).trim().split('\n') as [
      string,
      string,
      string,
    ];
    await coordinator.manager.submit(
      [left, right, top].map((drvPath, i) => ({ attr: `a${i}`, drvPath })),
      'test',
    );
    a.send({ $case: 'credit', value: { freeSlots: 2, draining: false } });
    const assigned = [await a.next('assign')];
    assigned.push(await a.next('assign', (x) => x.leaseId !== assigned[0]!.leaseId));
    const bad = assigned.find((x) => x.drvPath === left)!;
    const good = assigned.find((x) => x.drvPath === right)!;
    coordinator.store.db.exec(
      // After the attempt's row and the derivation's failure were written: what that result wrote before the
      // failure must go with it, and its state change must not be told.
      `CREATE TRIGGER refuse BEFORE UPDATE OF state ON derivations
       WHEN NEW.drv_path = '${top}' AND NEW.state = 'dependency-failed'
       BEGIN SELECT RAISE(ABORT, 'injected: disk I/O error'); END`,
    );
    const result = {
      outcome: Outcome.OUTCOME_FAILED,
      error: 'builder exited 1',
      outputs: [],
      finishedAtMs: 0,
      pushes: [],
      outputsInCoordinatorStore: false,
      logBytes: 0,
    };
    const told: string[] = [];
    coordinator.manager.on('state', (drvPath: string, to: string) => told.push(`${drvPath} ${to}`));
    // Both reach the manager before the event loop turns, so they are written in the same transaction.
    const settled = await Promise.allSettled([
      coordinator.manager.finished('raw-agent', bad.leaseId, result),
      coordinator.manager.finished('raw-agent', good.leaseId, result),
    ]);
    expect(settled.map((s) => s.status)).toEqual(['rejected', 'fulfilled']);
    expect(state(good.drvPath)).toBe('failed');
    expect(coordinator.store.attempt(good.leaseId)?.state).toBe('failed');
    // The refused one is as if it never came: still building, its lease open, to be recorded when it comes again.
    expect(state(bad.drvPath)).toBe('building');
    expect(coordinator.store.attempt(bad.leaseId)?.state).toBe('assigned');
    expect(coordinator.manager.openLease(bad.leaseId)?.drvPath).toBe(bad.drvPath);
    // Only what was committed is told, once.
    expect(told).toEqual([`${good.drvPath} failed`]);
    coordinator.store.db.exec('DROP TRIGGER refuse');
    await coordinator.manager.finished('raw-agent', bad.leaseId, result);
    expect(state(bad.drvPath)).toBe('failed');
    expect(told).toEqual([`${good.drvPath} failed`, `${bad.drvPath} failed`, `${top} dependency-failed`]);
  });

  it('keeps a cancel across a coordinator restart and tells the agent when it comes back', async () => {
    const dir = tempDir();
    const { a, lease } = await leased(dir);
    a.close();
    coordinator!.manager.cancel([lease.drvPath], 'superseded by a newer push');
    // Recorded before anything is sent: the agent is not even connected.
    expect(coordinator!.store.attempt(lease.leaseId)?.cancel_reason).toBe('superseded by a newer push');
    await coordinator!.stopNow();

    coordinator = await startCoordinator(dir, { lease_ttl_seconds: 30 });
    const again = raw();
    again.hello({ runningLeases: [{ leaseId: lease.leaseId, logBytes: 0 }] });
    const welcome = await again.next('welcome');
    expect(welcome.leaseDecisions).toEqual([
      { leaseId: lease.leaseId, keep: false, logOffset: 0, reason: 'superseded by a newer push' },
    ]);
    expect(state(lease.drvPath)).toBe('cancelled');
    expect(coordinator.store.attempt(lease.leaseId)?.state).toBe('cancelled');
  });

  it('never requeues a cancelled lease that expires', async () => {
    const { a, lease } = await leased(tempDir(), { lease_ttl_seconds: 1 });
    a.close();
    coordinator!.manager.cancel([lease.drvPath], 'the pull request was closed');
    await expect.poll(() => state(lease.drvPath), { timeout: 20_000 }).toBe('cancelled');
    expect(coordinator!.store.attemptsOf(lease.drvPath).map((x) => x.state)).toEqual(['cancelled']);
  });

  it('stops a build whose log outgrows build_max_log_bytes, stores only that much, and fails it', async () => {
    const { a, lease } = await leased(tempDir(), { build_max_log_bytes: 100 });
    expect(lease.maxLogBytes).toBe(100);
    const line = Buffer.from(`${'x'.repeat(59)}\n`);
    a.send({ $case: 'logChunk', value: { leaseId: lease.leaseId, offset: 0, data: line } });
    a.send({ $case: 'logChunk', value: { leaseId: lease.leaseId, offset: 60, data: line } });
    const cancel = await a.next('cancel');
    expect(cancel.leaseId).toBe(lease.leaseId);
    expect(cancel.reason).toMatch(/build_max_log_bytes \(100/);
    // The dropped bytes are acknowledged, so that the agent does not send them again and again.
    await a.next('logAck', (x) => x.storedBytes === 120);
    a.finished(1, lease.leaseId, Outcome.OUTCOME_CANCELLED, 'cancelled');
    await a.next('ack', (x) => x.messageIds.includes(1));
    expect(coordinator!.store.derivation(lease.drvPath)?.state).toBe('failed');
    expect(coordinator!.store.derivation(lease.drvPath)?.error).toMatch(/exceeded build_max_log_bytes/);
    expect(coordinator!.store.attempt(lease.leaseId)).toMatchObject({ log_bytes: 100, log_truncated: 1 });
    expect(readFileSync(coordinator!.logs.pathFor(lease.drvPath, lease.attempt)).length).toBe(100);
  });

  it('stores log bytes that arrive after their result, and leaves no log file open', async () => {
    const { a, lease } = await leased(tempDir());
    a.send({ $case: 'logChunk', value: { leaseId: lease.leaseId, offset: 0, data: Buffer.from('first half, ') } });
    await a.next('logAck', (x) => x.storedBytes === 12);
    a.finished(1, lease.leaseId, Outcome.OUTCOME_FAILED, 'builder exited 1');
    await a.next('ack', (x) => x.messageIds.includes(1));
    expect(coordinator!.logs.openCount).toBe(0);
    // After a reconnect an agent sends what it still has in any order: the rest of the log comes after the result.
    a.send({ $case: 'logChunk', value: { leaseId: lease.leaseId, offset: 12, data: Buffer.from('second half\n') } });
    await a.next('logAck', (x) => x.storedBytes === 24);
    expect(readFileSync(coordinator!.logs.pathFor(lease.drvPath, lease.attempt), 'utf8')).toBe(
      'first half, second half\n',
    );
    expect(coordinator!.store.attempt(lease.leaseId)?.log_bytes).toBe(24);
    expect(coordinator!.logs.openCount).toBe(0);
  });

  it('lets two requests for the same derivations race without resetting what the first one queued', async () => {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 30 });
    const drvPath = await instantiate('mk "raced" { deps = [ (mk "raced-input" {}) ]; }');
    // Both read the closure before either records it.
    await Promise.all([
      coordinator.manager.submit([{ attr: 'only', drvPath }], 'first'),
      coordinator.manager.submit([{ attr: 'only', drvPath }], 'second'),
    ]);
    const input = coordinator.store.inputsOf(drvPath)[0]!;
    expect(state(input)).toBe('buildable');
    expect(state(drvPath)).toBe('queued');
    const events = coordinator.store.db
      .prepare('SELECT drv_path, state FROM events WHERE drv_path IN (?, ?) ORDER BY id')
      .all(input, drvPath);
    expect(events).toEqual([{ drv_path: input, state: 'buildable' }]);
    expect(await coordinator.health.count('transition', 'illegal-transition')).toBe(0);

    // And it builds: the input's lease goes to an agent.
    const a = raw();
    a.hello();
    await a.next('welcome');
    a.send({ $case: 'credit', value: { freeSlots: 2, draining: false } });
    expect((await a.next('assign')).drvPath).toBe(input);
  });

  it('refuses an illegal state transition, changing nothing', async () => {
    coordinator = await startCoordinator(tempDir());
    const drvPath = await instantiate('mk "lonely" {}');
    await coordinator.manager.submit([{ attr: 'only', drvPath }], 'test');
    expect(coordinator.store.setState(drvPath, 'succeeded', 1, Date.now())).toBe(false);
    expect(state(drvPath)).toBe('buildable');
    expect(coordinator.store.setState(drvPath, 'building', 1, Date.now())).toBe(true);
  });
});
