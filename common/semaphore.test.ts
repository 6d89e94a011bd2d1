import { describe, expect, it } from 'vitest';
import { Semaphore } from './semaphore.js';

describe('Semaphore', () => {
  it('runs at most `limit` sections at once, the rest in call order, and survives a throwing section', async () => {
    const s = new Semaphore(2);
    let running = 0;
    let peak = 0;
    const order: number[] = [];
    const gates: Array<() => void> = [];
    const section = (i: number) =>
      s.run(async () => {
        running++;
        peak = Math.max(peak, running);
        order.push(i);
        await new Promise<void>((resolve) => gates.push(resolve));
        running--;
        if (i === 1) throw new Error('section 1 fails');
      });
    const all = [0, 1, 2, 3, 4].map((i) => section(i).catch((e: Error) => e.message));
    while (order.length < 5) {
      await new Promise((resolve) => setImmediate(resolve));
      gates.shift()?.();
    }
    gates.forEach((g) => g());
    expect(await Promise.all(all)).toEqual([undefined, 'section 1 fails', undefined, undefined, undefined]);
    expect(peak).toBe(2);
    expect(order).toEqual([0, 1, 2, 3, 4]);
  });
});
