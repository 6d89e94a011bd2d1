import { randomBytes, randomInt } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { AgentNetwork, AgentProcess } from './support/agent-process.js';
import type { AttemptStatus } from './support/coordinator-process.js';
import { connectedTo, Fleet } from './support/fleet.js';
import { alive, canPartition, parentOf, sleep, until } from './support/processes.js';
import { auditBuilds, auditLog, builderLines, gatedScript, instantiate, MARK } from './support/workload.js';

/**
 * A network partition of one agent host: the agent runs in a network namespace of its own, joined to the machine
 * by a veth pair, and the test takes its end of the link down mid-build, then up again. Packets stop; nobody closes
 * a connection. Longer than the lease TTL, the lease must move to the other agent and the partitioned agent, back
 * on the network, must learn that and stop its build. Shorter than the TTL, the lease must survive with every log
 * byte.
 *
 * The stale build ignores SIGTERM (`trap "" TERM`, inherited by what it runs). Left alone, Nix's daemon would kill it
 * with SIGKILL as soon as the agent's SIGTERM reaches the daemon, so the test also freezes that daemon (SIGSTOP, a
 * hung nix-daemon): then only the agent's own escalation — SIGKILL to the daemon's and the builders' process groups
 * once the cancel grace is over — can end the build.
 */

const LINES = 30;

let fleet: Fleet | undefined;

afterEach(() => {
  fleet?.cleanUp();
  fleet = undefined;
});

/** A /30 of 10.231.0.0/16 nobody else here uses, and an interface name of the suite's. */
function network(): AgentNetwork {
  const base = randomInt(64) * 4;
  const net = `10.231.${randomInt(256)}`;
  return {
    hostInterface: `ekf${randomBytes(4).toString('hex')}`,
    hostAddress: `${net}.${base + 1}`,
    agentAddress: `${net}.${base + 2}`,
  };
}

function touch(dir: string, file: string): void {
  writeFileSync(join(dir, file), '');
}

interface PartitionSetup {
  fleet: Fleet;
  /** The agent in the namespace whose link goes down. */
  partitioned: AgentProcess;
  /** The other agent, its only slot held by `blocker` until the test releases it. */
  other: AgentProcess;
  gate: string;
  drvs: Map<string, string>;
  /** The build request of the subject. */
  request: number;
}

/**
 * Two agents with one slot each: `fault-a` on the machine's network holds a blocker (a derivation only it can
 * build) so that `subject` goes to `fault-b`, the agent in its own network namespace.
 */
async function partitionSetup(
  leaseTtlSeconds: number,
  subject: { name: string; ignoreTerm?: boolean; finishGate?: boolean },
): Promise<PartitionSetup> {
  const net = network();
  const f = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds, address: net.hostAddress });
  fleet = f;
  // The coordinator listens on the machine's end of the veth pair, which exists once the agent's namespace does.
  const partitioned = await f.startAgent('fault-b', { maxJobs: 1, network: net });
  await f.coordinator.start();
  const other = await f.startAgent('fault-a', { maxJobs: 1, features: ['fault-a-only'] });
  await f.connected(['fault-a', 'fault-b']);

  const gate = f.gate();
  const script = (name: string, opts: { ignoreTerm?: boolean; finishGate?: boolean } = {}): string =>
    `script = ''\n${gatedScript(name, LINES, gate, opts)}\n'';`;
  const body = `{
    blocker = mk "blocker" { requiredSystemFeatures = [ "fault-a-only" ]; ${script('blocker')} };
    ${subject.name} = mk "${subject.name}" { ${script(subject.name, subject)} };
  }`;
  const drvs = await instantiate(body, ['blocker', subject.name]);
  await f.coordinator.submit([drvs.get('blocker')!]);
  await until('the blocker to start on fault-a', () => existsSync(join(gate, 'started-blocker')));
  const request = await f.coordinator.submit([drvs.get(subject.name)!]);
  await until(`${subject.name} to start`, () => existsSync(join(gate, `started-${subject.name}`)));
  return { fleet: f, partitioned, other, gate, drvs, request };
}

async function attemptsOf(f: Fleet, drvPath: string): Promise<AttemptStatus[]> {
  return (await f.coordinator.derivation(drvPath)).attempts;
}

/** Waits until the coordinator's log of an attempt holds the builder's first `n` lines. */
async function logHas(f: Fleet, drvPath: string, attempt: number, name: string, n: number): Promise<void> {
  const line = builderLines(name, LINES)[n - 1]!;
  await until(`${n} log lines of ${name} at the coordinator`, () => f.coordinator.log(drvPath, attempt).includes(line));
}

/** Stops the coordinator and checks the one build: one result, its whole log. */
async function stopAndAudit(f: Fleet, name: string, drv: string): Promise<void> {
  await f.coordinator.stop();
  const db = f.coordinator.openDatabase();
  try {
    const audit = auditBuilds(db, new Map([[name, drv]]), LINES);
    expect(audit.duplicated).toEqual([]);
    expect(audit.badLogs).toEqual([]);
  } finally {
    db.close();
  }
}

describe.runIf(canPartition())('an agent cut off from the coordinator by a network partition', () => {
  it('moves the lease to the other agent when the partition outlasts the lease TTL; the agent, back, kills its stale build', async () => {
    const {
      fleet: f,
      partitioned,
      gate,
      drvs,
      request,
    } = await partitionSetup(4, { name: 'stubborn', ignoreTerm: true });
    const drv = drvs.get('stubborn')!;
    const [first] = await attemptsOf(f, drv);
    expect(first?.agent_id).toBe('fault-b');
    await logHas(f, drv, 1, 'stubborn', LINES / 2);
    const builderPid = Number(readFileSync(join(gate, 'pids-stubborn'), 'utf8').split('\n')[0]);
    const daemonPid = parentOf(builderPid);
    const coordinatorLines = f.coordinator.current.lines.length;

    partitioned.setLink(false);
    const cut = Date.now();
    await until('the coordinator to give the lease up', async () => (await attemptsOf(f, drv))[0]?.state === 'lost');
    touch(gate, 'release-blocker');
    await until('the build to move to fault-a', async () => {
      const second = (await attemptsOf(f, drv))[1];
      return second?.agent_id === 'fault-a' && second.state === 'started';
    });
    process.kill(daemonPid, 'SIGSTOP');
    partitioned.setLink(true);
    const partitionSeconds = (Date.now() - cut) / 1000;

    // Back on the network, the agent learns that the lease is gone and stops the build, which ignores SIGTERM.
    await connectedTo(f.coordinator.current, 'fault-b', coordinatorLines);
    const dropped = await partitioned.watched.waitForLine(
      'fault-b to drop the stale lease',
      (l) => l.msg === 'dropping lease' && l.leaseId === first!.lease_id,
    );
    expect(String(dropped.reason)).toMatch(/lease is no longer valid|did not renew/);
    const droppedAt = Date.now();
    await until('the stale builder, which ignores SIGTERM, to be killed', () => !alive(builderPid));
    const graceSeconds = (Date.now() - droppedAt) / 1000;
    expect(alive(daemonPid), 'the frozen nix-daemon was killed too').toBe(false);
    const stopped = await partitioned.watched.waitForLine(
      'fault-b to end the stale build',
      (l) => l.msg === 'build finished' && l.leaseId === first!.lease_id,
    );
    expect(stopped.outcome).toBe('OUTCOME_CANCELLED');

    touch(gate, 'release-stubborn');
    const status = await f.settle(request);
    expect(status.builds.map((b) => b.state)).toEqual(['succeeded']);
    const attempts = await attemptsOf(f, drv);
    expect(attempts.map((a) => [a.agent_id, a.state])).toEqual([
      ['fault-b', 'lost'],
      ['fault-a', 'succeeded'],
    ]);
    expect(partitioned.watched.running, 'the partitioned agent kept running').toBe(true);
    await stopAndAudit(f, 'stubborn', drv);
    process.stdout.write(
      `partition figures: longer than the TTL (4 s): ${partitionSeconds.toFixed(1)} s, survived; the stale build ` +
        `(dropped: ${String(dropped.reason)}) ended ${graceSeconds.toFixed(1)} s after the drop (grace 10 s)\n`,
    );
  });

  it('keeps the lease through a partition shorter than the lease TTL, building once with every log byte', async () => {
    // Heartbeats every 2.5 s; the link stays down for 2 s: TCP retransmits and the stream carries on.
    const {
      fleet: f,
      partitioned,
      gate,
      drvs,
      request,
    } = await partitionSetup(10, { name: 'steady', finishGate: true });
    const drv = drvs.get('steady')!;
    expect((await attemptsOf(f, drv))[0]?.agent_id).toBe('fault-b');
    await logHas(f, drv, 1, 'steady', LINES / 2);

    partitioned.setLink(false);
    const cut = Date.now();
    // The rest of the log is written while the agent cannot send it: it waits in the agent's spool.
    touch(gate, 'release-steady');
    await until('the builder to print the rest of its log', () => existsSync(join(gate, 'printed-steady')));
    await sleep(Math.max(0, 2_000 - (Date.now() - cut)));
    partitioned.setLink(true);
    const partitionSeconds = (Date.now() - cut) / 1000;

    await logHas(f, drv, 1, 'steady', LINES);
    touch(gate, 'finish-steady');
    touch(gate, 'release-blocker');
    const status = await f.settle(request);
    expect(status.builds.map((b) => b.state)).toEqual(['succeeded']);
    const attempts = await attemptsOf(f, drv);
    expect(attempts.map((a) => [a.agent_id, a.state])).toEqual([['fault-b', 'succeeded']]);
    const log = auditLog(f.coordinator.log(drv, 1), builderLines('steady', LINES));
    expect(log).toEqual({ missingBytes: 0, duplicatedLines: 0, disorderedLines: 0 });
    expect(
      f.coordinator
        .log(drv, 1)
        .split('\n')
        .filter((l) => l.startsWith(MARK)),
    ).toHaveLength(LINES);
    await stopAndAudit(f, 'steady', drv);
    process.stdout.write(
      `partition figures: shorter than the TTL (10 s): ${partitionSeconds.toFixed(1)} s, survived\n`,
    );
  });
});
