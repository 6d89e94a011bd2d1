import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { openDatabase } from '../db/database.js';
import { BuildStore } from '../scheduler/build-store.js';
import type { RunRoot, RunRow } from './run-store.js';
import { TimelineCache, runTimeline } from './run-timeline.js';

// More leaves than the walk asks about in one query: the closure is found across several.
const LEAVES = 4_500;
const RUN = { id: 1, created_at: 1_000 } as RunRow;
const drv = (name: string): string => `/nix/store/${'a'.repeat(32)}-${name}.drv`;
const ROOTS: RunRoot[] = [{ side: 'head', drvPath: drv('root'), attr: 'top', system: 'x86_64-linux' }];

describe('a run timeline', () => {
  let store: BuildStore;
  let attempt: (name: string, n: number, assignedAt: number, startedAt: number, finishedAt: number) => void;

  beforeEach(() => {
    const db = openDatabase(join(mkdtempSync(join(tmpdir(), 'ekaci-timeline-')), 'db.sqlite'));
    store = new BuildStore(db);
    const derivation = db.prepare(
      `INSERT INTO derivations (drv_path, system, required_features, is_fod, prefer_local, state, created_at, updated_at)
       VALUES (?, 'x86_64-linux', '[]', 0, 0, 'succeeded', 0, 0)`,
    );
    const input = db.prepare('INSERT INTO derivation_inputs (drv_path, input_drv) VALUES (?, ?)');
    const insertAttempt = db.prepare(
      `INSERT INTO attempts (lease_id, drv_path, attempt, agent_id, state, assigned_at, started_at, finished_at,
         expires_at, log_path) VALUES (?, ?, ?, 'builder', 'succeeded', ?, ?, ?, 0, '')`,
    );
    attempt = (name, n, assignedAt, startedAt, finishedAt) =>
      insertAttempt.run(`${name}-${n}`, drv(name), n, assignedAt, startedAt, finishedAt);
    // root ← c2 ← c1 ← c0 ← every leaf; the leaves finish one after another, the chain after the last of them.
    db.transaction(() => {
      for (const name of ['root', 'c2', 'c1', 'c0']) derivation.run(drv(name));
      input.run(drv('root'), drv('c2'));
      input.run(drv('c2'), drv('c1'));
      input.run(drv('c1'), drv('c0'));
      for (let i = 0; i < LEAVES; i++) {
        derivation.run(drv(`leaf-${i}`));
        input.run(drv('c0'), drv(`leaf-${i}`));
        attempt(`leaf-${i}`, 1, 1_000, 1_001, 1_002 + i);
      }
      const end = 1_002 + LEAVES;
      attempt('c0', 1, end, end, end + 5); // failed for the machine's sake, say: built again
      attempt('c0', 2, end + 6, end + 6, end + 10);
      attempt('c1', 1, end + 10, end + 10, end + 20);
      attempt('c2', 1, end + 20, end + 20, end + 30);
      attempt('root', 1, end + 30, end + 30, end + 40);
      // Before the run was created: another run's build of it, not this one's.
      attempt('root', 0, 10, 11, 12);
    })();
  });

  it('walks the whole closure, keeps the attempts made for the run, and finds the chain that took longest', async () => {
    const timeline = await runTimeline(store, RUN, ROOTS);
    expect(timeline.closure).toBe(LEAVES + 4);
    expect(timeline.truncated).toBe(false);
    expect(timeline.builds).toHaveLength(LEAVES + 5);
    expect(timeline.builds.find((b) => b.attempt === 0)).toBeUndefined();
    expect(timeline.builds.filter((b) => b.attr === 'top')).toHaveLength(1);
    expect(timeline.criticalPath).toEqual([drv(`leaf-${LEAVES - 1}`), drv('c0'), drv('c1'), drv('c2'), drv('root')]);
    const c0 = timeline.builds.filter((b) => b.drvPath === drv('c0'));
    expect(c0.map((b) => [b.attempt, b.critical])).toEqual([
      [1, false],
      [2, true],
    ]);
    // In the order they were assigned.
    expect(timeline.builds.map((b) => b.assignedAt)).toEqual(timeline.builds.map((b) => b.assignedAt).sort());
  });

  it('is reused for ten times what it took to compute, and shared by requests that come while it is computed', async () => {
    let now = 0;
    const cache = new TimelineCache(store, () => now);
    const roots = () => ROOTS;
    const first = cache.timeline(RUN, roots);
    expect(cache.timeline(RUN, roots)).toBe(first);
    now = 50; // it took 50 ms
    expect((await first).builds).toHaveLength(LEAVES + 5);
    attempt('root', 2, 9_000, 9_000, 9_010);
    now = 400;
    expect((await cache.timeline(RUN, roots)).builds).toHaveLength(LEAVES + 5);
    now = 600;
    expect((await cache.timeline(RUN, roots)).builds).toHaveLength(LEAVES + 6);
  });
});
