import { describe, expect, it } from 'vitest';
import { timeOrderedId } from './time-ordered-id.js';

describe('timeOrderedId', () => {
  it('makes version-7 UUIDs that sort by the time they were made and never repeat', () => {
    const times = [0, 1, 999, 1_700_000_000_000, 1_700_000_000_001, 2 ** 48 - 1];
    const ids = times.flatMap((t) => [timeOrderedId(t), timeOrderedId(t)]);
    for (const id of ids) expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    for (let i = 2; i < ids.length; i += 2) expect(ids[i - 1]! < ids[i]!).toBe(true);
    expect(new Set(ids).size).toBe(ids.length);
    expect(timeOrderedId(1_700_000_000_000).slice(0, 13)).toBe('018bcfe5-6800');
  });

  it('draws fresh random bits for every id, also past the pool it draws them from', () => {
    const ids = Array.from({ length: 1_000 }, () => timeOrderedId(1_700_000_000_000));
    expect(new Set(ids.map((id) => id.slice(14))).size).toBe(ids.length);
  });
});
