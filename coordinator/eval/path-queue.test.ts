import { describe, expect, it } from 'vitest';
import { PathQueue } from './path-queue.js';

const paths = (group: string, n: number): string[][] => Array.from({ length: n }, (_, i) => [group, `p${i}`]);

describe('the queue of attribute paths', () => {
  it('keeps each worker to a set of its own while there are sets nobody works on', () => {
    const q = new PathQueue();
    q.push([...paths('python', 6), ...paths('haskell', 6)]);
    const a = q.take(undefined, 2)!;
    const b = q.take(undefined, 2)!;
    expect([a.group, b.group]).toEqual(['python', 'haskell']);
    for (let i = 0; i < 2; i++) {
      expect(q.take(a.group, 2)!.paths.every((p) => p[0] === 'python')).toBe(true);
      expect(q.take(b.group, 2)!.paths.every((p) => p[0] === 'haskell')).toBe(true);
    }
    expect(q.size).toBe(0);
    expect(q.take(a.group, 2)).toBeUndefined();
  });

  it("shares a set that has a worker rather than leave a worker idle, and takes a set's new paths first", () => {
    const q = new PathQueue();
    q.push(paths('big', 10));
    const a = q.take(undefined, 3)!;
    const b = q.take(undefined, 3)!;
    expect([a.group, b.group]).toEqual(['big', 'big']);
    expect(b.paths.map((p) => p[1])).toEqual(['p3', 'p4', 'p5']);
    // Children of a set the worker recursed into join its group, and it goes on with them.
    q.push([['small', 'x']]);
    q.push([['big', 'p3', 'child']]);
    expect(q.take(b.group, 5)!.paths).toEqual([
      ['big', 'p6'],
      ['big', 'p7'],
      ['big', 'p8'],
      ['big', 'p9'],
      ['big', 'p3', 'child'],
    ]);
    // Its group done, a worker moves to the first set without one.
    expect(q.take(b.group, 5)).toEqual({ group: 'small', paths: [['small', 'x']] });
  });

  it('fills a chunk from many one-package groups (the top level of a package set)', () => {
    const q = new PathQueue();
    q.push(Array.from({ length: 100 }, (_, i) => [`pkg${i}`]));
    const first = q.take(undefined, 64)!;
    expect(first.paths).toHaveLength(64);
    expect(first.paths[63]).toEqual(['pkg63']);
    expect(q.take(undefined, 64)!.paths).toHaveLength(36);
    expect(q.size).toBe(0);
  });

  it('looks at no more groups per chunk than there are workers on them (linear in a 20,000-group top level)', () => {
    const q = new PathQueue();
    q.push(Array.from({ length: 20_000 }, (_, i) => [`pkg${i}`]));
    const groups = (q as unknown as { groups: Map<string, unknown> }).groups;
    let looked = 0;
    const keys = groups.keys.bind(groups);
    groups.keys = () => {
      const it = keys();
      return {
        [Symbol.iterator]() {
          return this;
        },
        next: () => {
          looked++;
          return it.next();
        },
      };
    };
    let worker: string | undefined;
    while (q.size > 0) worker = q.take(worker, 64)!.group;
    expect(looked).toBeLessThan(20_000 * 3);
  });
});
