import { describe, expect, it } from 'vitest';
import { Backoff } from './backoff.js';

describe('Backoff', () => {
  it('doubles its ceiling up to the cap, each delay jittered between half the base and the ceiling', () => {
    const top = new Backoff(100, 1_000, () => 1);
    expect(Array.from({ length: 6 }, () => top.next())).toEqual([100, 200, 400, 800, 1_000, 1_000]);
    const bottom = new Backoff(100, 1_000, () => 0);
    expect(Array.from({ length: 3 }, () => bottom.next())).toEqual([50, 50, 50]);
    top.reset();
    expect(top.next()).toBe(100);
  });

  it('keeps its delays under a limit while the limit holds, and grows on from where it was once it is lifted', () => {
    let limit: number | undefined = 300;
    const top = new Backoff(
      100,
      10_000,
      () => 1,
      () => limit,
    );
    const bottom = new Backoff(
      1_000,
      10_000,
      () => 0,
      () => limit,
    );
    expect(Array.from({ length: 4 }, () => top.next())).toEqual([100, 200, 300, 300]);
    // A limit below the base still leaves room for jitter: [limit/2, limit].
    expect(bottom.next()).toBe(150);
    limit = undefined;
    expect(top.next()).toBe(1_600);
  });
});
