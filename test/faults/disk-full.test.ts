import { closeSync, openSync, rmSync, writeSync } from 'node:fs';
import { relative } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import type { RequestStatus } from './support/coordinator-process.js';
import { countStates, Fleet } from './support/fleet.js';
import { canInjectFaults, until } from './support/processes.js';
import { auditBuilds, dagBody, instantiate } from './support/workload.js';

/**
 * The coordinator's data directory on a small filesystem of its own (a tmpfs in the coordinator's private mount
 * namespace), filled by another file in the middle of a build: the coordinator must stay up, say why it is not ready
 * (`/readyz`) and in its log, lose nothing it had recorded, and carry on by itself once space is freed.
 */

const LINES = 30;
// Room for the database, the logs and the cache of this build several times over; the filler takes the rest.
const DATA_DIR_BYTES = 64 * 1024 * 1024;
const FILL_CHUNK = Buffer.alloc(1024 * 1024, 0x2e);

let fleet: Fleet | undefined;

afterEach(() => {
  fleet?.cleanUp();
  fleet = undefined;
});

/** Writes `file` until the filesystem has not a byte left; returns the bytes written. */
function fill(file: string): number {
  const fd = openSync(file, 'w');
  let written = 0;
  try {
    // Large writes first, then small ones for what a large one could not take.
    for (const size of [FILL_CHUNK.length, 512]) {
      try {
        for (;;) written += writeSync(fd, FILL_CHUNK, 0, size);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
      }
    }
  } finally {
    closeSync(fd);
  }
  return written;
}

describe.runIf(canInjectFaults())('the coordinator’s data directory fills up mid-build', () => {
  // Bug (issue 11, work in progress): the coordinator now stays up, says why and takes work again when space
  // returns, but a build whose Finished met the full disk (SQLITE_FULL) never settles: the event is left
  // unacknowledged "so that it is resent", yet the agent resends unacknowledged events only after a reconnect, and
  // its stream never broke. Its lease, still renewed by heartbeats, stays open; the derivation stays `building` and
  // its dependents queued forever. (Before, ENOSPC/SQLITE_FULL thrown from AgentHub.dispatch or LogStore.append
  // ended the coordinator.) Remove `.fails` once such an event is handled again.
  it('stays up, says why on /readyz, and finishes every build once space is freed', { timeout: 600_000 }, async () => {
    fleet = new Fleet({ agents: ['fault-a', 'fault-b'], leaseTtlSeconds: 10, tmpfsBytes: DATA_DIR_BYTES });
    const f = fleet;
    await f.coordinator.start();
    await f.startAgent('fault-a');
    await f.startAgent('fault-b');
    await f.connected(['fault-a', 'fault-b']);
    const coordinator = f.coordinator.current;
    const { body, names } = dagBody(40, 8, LINES);
    const drvs = await instantiate(body.replaceAll('/bin/sleep 0.1', '/bin/sleep 0.3'), names);
    const id = await f.coordinator.submit([...drvs.values()]);

    // Mid-build: some derivations recorded, others running.
    let before: RequestStatus | undefined;
    await until('a fifth of the builds to succeed', async () => {
      before = await f.coordinator.request(id);
      return (countStates(before).succeeded ?? 0) >= 8;
    });
    const recorded = new Set(before!.builds.filter((b) => b.state === 'succeeded').map((b) => b.drvPath));
    const filler = f.coordinator.dataPath('filler');
    const linesBefore = coordinator.lines.length;
    const filled = fill(filler);

    let why: unknown;
    await until('/readyz to say the disk is full', async () => {
      if (!coordinator.running) {
        throw new Error(
          `the coordinator exited when its disk filled (${filled} bytes of filler):\n${coordinator.tail()}`,
        );
      }
      const ready = await f.coordinator.readyz().catch(() => undefined);
      why = ready?.body;
      return ready?.status === 503 && /space|full|ENOSPC/i.test(JSON.stringify(ready.body));
    });
    await coordinator.waitForLine(
      'a log line about the full disk',
      (l) => Number(l.level) >= 40 && /ENOSPC|no space|disk.*full|SQLITE_FULL/i.test(l.raw),
      linesBefore,
    );

    rmSync(filler);
    const status = await f.settle(id, undefined, 45_000);
    await until('/readyz to be ready again', async () => (await f.coordinator.readyz()).status === 200);
    expect(f.coordinator.incarnations, 'coordinator processes').toHaveLength(1);
    expect(countStates(status)).toEqual({ succeeded: names.length });
    // The tmpfs goes with the coordinator's namespace: the audit reads it while the coordinator still runs.
    const db = f.coordinator.openDatabase();
    try {
      const audit = auditBuilds(db, drvs, LINES, (p) => f.coordinator.dataPath(relative(f.coordinator.dataDir, p)));
      expect(audit.lost).toEqual([]);
      expect(audit.duplicated).toEqual([]);
      // What was recorded before the disk filled is intact (builds caught by the full disk are retried; whether
      // their logs survive is the kill tests' business).
      expect(audit.badLogs.filter((b) => recorded.has(b.drvPath))).toEqual([]);
      process.stdout.write(
        `disk-full figures: ${filled} bytes of filler; /readyz said ${JSON.stringify(why)}; attempts ${JSON.stringify(audit.attempts)}\n`,
      );
    } finally {
      db.close();
    }
    expect(await f.coordinator.stop()).toEqual({ code: 0, signal: null });
  });
});
