import { randomInt } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { AgentProcess } from './support/agent-process.js';
import { countStates, Fleet } from './support/fleet.js';
import { canInjectFaults, sleep, until } from './support/processes.js';
import { auditBuilds, type BuildAudit, dagBody, flatBody, gatedScript, instantiate } from './support/workload.js';
import { seededRandom } from '../../common/prng.js';

/**
 * `kill -9` of an external coordinator at random points of a DAG build, restarted each time on the same data
 * directory, with two agent hosts (separate processes, each with its own /nix) that must ride it out. The full
 * size (5 kills during 500 derivations) runs with EKACI_SLOW_FAULTS=1 (`npm run test:faults`); `npm test` runs a
 * small one.
 */

const LINES = 30;
// How long a drain gets before the second SIGTERM ("stop now"), and how long "stop now" gets: the agent's own
// limits are 2 s to close its stream, 3 s for builds to die and 10 s for a nix-daemon to exit. Waits, never asserts.
const DRAIN_PATIENCE_MS = 10_000;
const STOP_NOW_PATIENCE_MS = 20_000;
// Once a builder has exited the agent uploads at once: a coordinator that stays down this long meets the upload.
const UPLOAD_WINDOW_MS = 1_000;

let fleet: Fleet | undefined;

afterEach(() => {
  fleet?.cleanUp();
  fleet = undefined;
});

interface KillRun {
  seed: number;
  killsSurvived: number;
  audit: BuildAudit;
  agentsRestarted: string[];
  coordinatorExit: { code: number | null; signal: NodeJS.Signals | null };
  seconds: number;
}

/** Builds `count` derivations while killing the coordinator `kills` times at random points; audits the result. */
async function buildThroughKills(f: Fleet, count: number, width: number, kills: number): Promise<KillRun> {
  const seed = Number(process.env.EKACI_FAULT_SEED ?? randomInt(2 ** 31));
  const random = seededRandom(seed);
  const started = Date.now();
  await f.coordinator.start();
  const agents = [await f.startAgent('fault-a'), await f.startAgent('fault-b')];
  const pids = agents.map((a) => a.pid);
  await f.connected(['fault-a', 'fault-b']);

  const { body, names } = dagBody(count, width, LINES);
  const drvs = await instantiate(body, names);
  const id = await f.coordinator.submit([...drvs.values()]);

  // One kill in each of `kills` equal slices of the build, at a random point of its slice, and a random moment
  // after the point is reached (so that it lands in a build's log, its upload or its result alike).
  const points = Array.from({ length: kills }, (_, k) =>
    Math.floor(count * ((k + 0.15 + 0.7 * random()) / (kills + 1))),
  );
  let killsSurvived = 0;
  await f.settle(id, async (status) => {
    const done = countStates(status).succeeded ?? 0;
    if (killsSurvived >= kills || done < points[killsSurvived]!) return;
    await sleep(Math.floor(random() * 800));
    await f.coordinator.kill9();
    await f.coordinator.start();
    killsSurvived++;
  });

  const coordinatorExit = await f.coordinator.stop();
  const db = f.coordinator.openDatabase();
  try {
    const audit = auditBuilds(db, drvs, LINES);
    const agentsRestarted = agents.filter((a, i) => !a.watched.running || a.pid !== pids[i]).map((a) => a.name);
    return { seed, killsSurvived, audit, agentsRestarted, coordinatorExit, seconds: (Date.now() - started) / 1000 };
  } finally {
    db.close();
  }
}

function report(run: KillRun, count: number): void {
  const duplicated = run.audit.duplicated.reduce((n, d) => n + Math.max(d.succeededAttempts, d.succeededEvents) - 1, 0);
  process.stdout.write(
    [
      `fault figures (coordinator kill -9, ${count} derivations, seed ${run.seed}, EKACI_FAULT_SEED replays it):`,
      `  kills survived:      ${run.killsSurvived}`,
      `  builds lost:         ${run.audit.lost.length}`,
      `  results duplicated:  ${duplicated}`,
      `  log bytes lost:      ${run.audit.logBytesLost} (${run.audit.badLogs.length} succeeded attempts with a bad log)`,
      `  attempts by state:   ${JSON.stringify(run.audit.attempts)}`,
      `  agents restarted:    ${run.agentsRestarted.length}`,
      ...run.audit.retried.map((r) => `  attempt ${r.attempt} of ${r.drvPath} on ${r.agent}: ${r.state}: ${r.error}`),
      `  wall time:           ${run.seconds.toFixed(1)} s`,
      '',
    ].join('\n'),
  );
}

function expectClean(run: KillRun, kills: number): void {
  expect(run.killsSurvived).toBe(kills);
  expect(run.audit.lost, 'derivations that did not succeed').toEqual([]);
  expect(run.audit.duplicated, 'derivations that succeeded more than once').toEqual([]);
  expect(run.agentsRestarted, 'agent processes that ended during the run').toEqual([]);
  expect(run.audit.badLogs, 'succeeded attempts whose log misses, repeats or reorders builder lines').toEqual([]);
  expect(run.coordinatorExit).toEqual({ code: 0, signal: null });
}

/** SIGTERM; a second one if the drain has not ended it. Returns how many it took, 3 = it outlived both. */
async function signalsToStop(agent: AgentProcess): Promise<number> {
  agent.track();
  agent.watched.signal('SIGTERM');
  if (await agent.watched.exitWithin(DRAIN_PATIENCE_MS)) return 1;
  agent.watched.signal('SIGTERM');
  if (await agent.watched.exitWithin(STOP_NOW_PATIENCE_MS)) return 2;
  return 3;
}

function touch(dir: string, file: string): void {
  writeFileSync(join(dir, file), '');
}

describe.runIf(canInjectFaults())('coordinator killed with kill -9 during a build', () => {
  // Each kill meets builds in flight, uploads and results; the agents must claim their leases back within the TTL
  // the restarted coordinator gives them (they reconnect at least once per heartbeat interval while holding some),
  // or a build done on one is built again, on an agent that finds its output there and logs nothing.
  it('builds every derivation once with its whole log through three kills, and the agents ride them out', async () => {
    fleet = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds: 10 });
    const run = await buildThroughKills(fleet, 60, 12, 3);
    report(run, 60);
    expectClean(run, 3);
  });

  it('lets agents stop on the first SIGTERM once their work is done and the coordinator stopped', async () => {
    fleet = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds: 10 });
    const run = await buildThroughKills(fleet, 12, 6, 1);
    expect(run.audit.lost).toEqual([]);
    const stops = await Promise.all(fleet.agents.map((a) => signalsToStop(a)));
    expect(stops, 'SIGTERMs each agent needed to exit (3: it outlived two)').toEqual([1, 1]);
  });

  // Bug (issue 11, "the build path under faults"): an upload that meets a coordinator restart ends the attempt as an
  // infrastructure error (agent/jobs/build.ts: "upload to … failed: fetch failed"; CacheUploader does not retry).
  // The retry then finds the output already valid in the agent's store, runs no builder, and succeeds with an empty
  // log: the builder's 30 lines are only in the failed attempt's log. Remove `.fails` once uploads survive restarts.
  it('keeps the log and the one result of a build whose upload meets a coordinator restart', async () => {
    fleet = new Fleet({ agents: ['fault-a'], leaseTtlSeconds: 30 });
    await fleet.coordinator.start();
    await fleet.startAgent('fault-a');
    await fleet.connected(['fault-a']);
    const gate = fleet.gate();
    const drvs = await instantiate(
      flatBody(['late'], (n) => gatedScript(n, LINES, gate)),
      ['late'],
    );
    const id = await fleet.coordinator.submit([...drvs.values()]);
    await until('the builder to start', () => existsSync(join(gate, 'started-late')));

    await fleet.coordinator.kill9();
    touch(gate, 'release-late');
    await until('the builder to print its last line', () => existsSync(join(gate, 'printed-late')));
    await sleep(UPLOAD_WINDOW_MS);
    await fleet.coordinator.start();
    await fleet.settle(id);
    await fleet.coordinator.stop();

    const db = fleet.coordinator.openDatabase();
    try {
      const audit = auditBuilds(db, drvs, LINES);
      expect(audit.lost).toEqual([]);
      expect(audit.duplicated).toEqual([]);
      expect(audit.badLogs, `succeeded with a bad log; attempts: ${JSON.stringify(audit.retried)}`).toEqual([]);
    } finally {
      db.close();
    }
  });

  // Issue 11 saw this agent outlive two SIGTERMs: it stopped on the second, yet its process lived on because
  // StorePool.release() forgot a nix-daemon connection left `busy` by a failed upload without killing it, and that
  // `nix-daemon --stdio` child kept Node's event loop alive.
  it('lets agents stop on SIGTERM when the coordinator is gone for good with builds in flight', async () => {
    fleet = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds: 30 });
    await fleet.coordinator.start();
    await fleet.startAgent('fault-a');
    await fleet.startAgent('fault-b');
    await fleet.connected(['fault-a', 'fault-b']);
    const gate = fleet.gate();
    const names = ['left', 'right', 'middle'];
    const drvs = await instantiate(
      flatBody(names, (n) => gatedScript(n, LINES, gate)),
      names,
    );
    await fleet.coordinator.submit([...drvs.values()]);
    await until('the builders to start', () => names.every((n) => existsSync(join(gate, `started-${n}`))));

    await fleet.coordinator.kill9();
    for (const n of names) touch(gate, `release-${n}`);
    await until('the builders to end', () => names.every((n) => existsSync(join(gate, `printed-${n}`))));
    await sleep(UPLOAD_WINDOW_MS);
    const stops = await Promise.all(fleet.agents.map((a) => signalsToStop(a)));

    expect(
      stops.map((n) => n <= 2),
      `SIGTERMs each agent needed to exit: ${stops.join(', ')} (3: outlived two)`,
    ).toEqual([true, true]);
  });
});

describe.runIf(canInjectFaults() && process.env.EKACI_SLOW_FAULTS === '1')('coordinator kill -9 at fleet size', () => {
  it('builds 500 derivations once each, with every log byte, through five kills', { timeout: 1_800_000 }, async () => {
    fleet = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds: 10 });
    const run = await buildThroughKills(fleet, 500, 25, 5);
    report(run, 500);
    const stops = await Promise.all(fleet.agents.map((a) => signalsToStop(a)));
    process.stdout.write(`  SIGTERMs to stop each agent afterwards: ${stops.join(', ')} (3: ignored two)\n`);
    expectClean(run, 5);
    expect(stops).toEqual([1, 1]);
  });
});
