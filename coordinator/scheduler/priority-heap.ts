/** A binary min-heap ordered by `before(a, b)` (true when `a` should come out first). */
export class PriorityHeap<T> {
  private readonly items: T[] = [];

  constructor(private readonly before: (a: T, b: T) => boolean) {}

  get size(): number {
    return this.items.length;
  }

  peek(): T | undefined {
    return this.items[0];
  }

  push(item: T): void {
    const items = this.items;
    items.push(item);
    let i = items.length - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.before(items[i]!, items[parent]!)) break;
      [items[i], items[parent]] = [items[parent]!, items[i]!];
      i = parent;
    }
  }

  pop(): T | undefined {
    const items = this.items;
    const top = items[0];
    const last = items.pop();
    if (items.length > 0 && last !== undefined) {
      items[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let best = i;
        if (l < items.length && this.before(items[l]!, items[best]!)) best = l;
        if (r < items.length && this.before(items[r]!, items[best]!)) best = r;
        if (best === i) break;
        [items[i], items[best]] = [items[best]!, items[i]!];
        i = best;
      }
    }
    return top;
  }

  /** Removes every item for which `drop` is true (O(n); used for cancellations, not on the hot path). */
  removeWhere(drop: (item: T) => boolean): T[] {
    const removed = this.items.filter(drop);
    if (removed.length === 0) return removed;
    const kept = this.items.filter((i) => !drop(i));
    this.items.length = 0;
    for (const i of kept) this.push(i);
    return removed;
  }

  toArray(): readonly T[] {
    return this.items;
  }
}
