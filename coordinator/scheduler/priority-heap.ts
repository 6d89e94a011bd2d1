/**
 * A binary min-heap ordered by `before(a, b)` (true when `a` should come out first) that knows where each item is,
 * so that removing any item costs O(log n) like a pop. An item is in the heap at most once.
 */
export class PriorityHeap<T> {
  private readonly items: T[] = [];
  private readonly index = new Map<T, number>();
  /** Comparisons made so far: what the heap's work is counted in (tests check it grows as n log n). */
  comparisons = 0;

  constructor(private readonly before: (a: T, b: T) => boolean) {}

  get size(): number {
    return this.items.length;
  }

  peek(): T | undefined {
    return this.items[0];
  }

  has(item: T): boolean {
    return this.index.has(item);
  }

  push(item: T): void {
    if (this.index.has(item)) return;
    this.items.push(item);
    this.index.set(item, this.items.length - 1);
    this.up(this.items.length - 1);
  }

  pop(): T | undefined {
    const top = this.items[0];
    if (top !== undefined) this.removeAt(0);
    return top;
  }

  /** Removes one item; false if it was not in the heap. */
  remove(item: T): boolean {
    const i = this.index.get(item);
    if (i === undefined) return false;
    this.removeAt(i);
    return true;
  }

  /** The items in no particular order; not to be changed, nor kept across a change of the heap. */
  toArray(): readonly T[] {
    return this.items;
  }

  private removeAt(i: number): void {
    const items = this.items;
    const gone = items[i]!;
    const last = items.pop()!;
    this.index.delete(gone);
    if (i === items.length) return;
    items[i] = last;
    this.index.set(last, i);
    this.down(this.up(i));
  }

  private up(i: number): number {
    const items = this.items;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.less(items[i]!, items[parent]!)) break;
      this.swap(i, parent);
      i = parent;
    }
    return i;
  }

  private down(i: number): void {
    const items = this.items;
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let best = i;
      if (l < items.length && this.less(items[l]!, items[best]!)) best = l;
      if (r < items.length && this.less(items[r]!, items[best]!)) best = r;
      if (best === i) return;
      this.swap(i, best);
      i = best;
    }
  }

  private less(a: T, b: T): boolean {
    this.comparisons++;
    return this.before(a, b);
  }

  private swap(a: number, b: number): void {
    const items = this.items;
    const x = items[a]!;
    const y = items[b]!;
    items[a] = y;
    items[b] = x;
    this.index.set(y, a);
    this.index.set(x, b);
  }
}
