import { describe, expect, it } from 'vitest';
import type { LeaseRecord, SlotRecord } from './fleet-agents.js';
import { slotWaits } from './fleet-stats.js';

describe('slotWaits', () => {
  // d2 needs d0; d1 needs nothing. Slot S frees at 5 with d1 buildable and no other slot waiting: its wait is the
  // coordinator's. Slot T frees at 5.5 and is given d1 at 6, so S then waits for d0's result (acknowledged at 12)
  // through a part of the DAG with nothing to build, and is given d2 at 15.
  const deps = [[], [], [0]];
  const leases: LeaseRecord[] = [
    ['d0', 0, 0, 10, 12, 1],
    ['d1', 1, 6, 7, 8, 1],
    ['d2', 0, 15, 16, 17, 1],
  ];
  const slots: SlotRecord[] = [
    [0, 5, 15],
    [1, 5.5, 6],
  ];
  const waits = slotWaits(deps, (p) => Number(p.slice(1)), leases, slots, 0, 20);

  it("counts a wait only while there was work for every waiting slot, not through the DAG's thin parts", () => {
    // S: 5 → 5.5 (d1 for one waiting slot) and 12 → 15 (d2 for one); not 5.5 → 12 (two waiting for d1, then none).
    expect(waits.coordinatorBound).toMatchObject({ n: 1, max: 3.5 });
  });

  it('leaves out a wait that began with more slots waiting than work, and keeps every wait whole in `all`', () => {
    expect(waits.all).toMatchObject({ n: 2, p50: 0.5, max: 10 });
  });
});
