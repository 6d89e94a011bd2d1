/**
 * The attribute paths an evaluation has still to ask for, grouped by their first component (`python3Packages`,
 * `haskellPackages`, a top-level package), so that each worker keeps to a group of its own. Packages of one set share
 * most of their dependencies, and every worker is a Nix process of its own that evaluates whatever dependency it meets
 * again: two workers taking turns at the same set evaluated its shared closure twice (measured on a nixpkgs-shaped
 * set: 40 % more evaluator time with two workers than with one). A worker whose group runs out takes the first
 * group nobody works on, and only when there is none a share of the first one another worker is on, so that no
 * worker idles while work is queued.
 *
 * Paths are taken in the order they were queued within a group, groups in the order they first appeared.
 */
export class PathQueue {
  private readonly groups = new Map<string, string[][]>();
  /** How many workers are on each group now. */
  private readonly workersOn = new Map<string, number>();
  private count = 0;

  get size(): number {
    return this.count;
  }

  push(paths: readonly string[][]): void {
    for (const p of paths) {
      const key = p[0] ?? '';
      let group = this.groups.get(key);
      if (group === undefined) this.groups.set(key, (group = []));
      group.push(p);
    }
    this.count += paths.length;
  }

  /**
   * Up to `max` paths for a worker last on group `current` (undefined at first): from that group while it lasts, then
   * from the first group nobody works on (a nixpkgs has thousands of one-package groups at its top level: a chunk takes
   * several), and only when every group has a worker, from the first one anyway. Answers the group the worker is on
   * now; nothing when the queue is empty. Costs no more than the number of workers per group looked at.
   */
  take(current: string | undefined, max: number): { group: string; paths: string[][] } | undefined {
    if (this.count === 0) return undefined;
    const paths: string[][] = [];
    let on = current;
    let key = current !== undefined && this.groups.has(current) ? current : this.nextGroup();
    while (key !== undefined && paths.length < max) {
      if (key !== on) {
        if (on !== undefined) this.leave(on);
        this.workersOn.set(key, (this.workersOn.get(key) ?? 0) + 1);
        on = key;
      }
      const group = this.groups.get(key)!;
      paths.push(...group.splice(0, max - paths.length));
      if (group.length === 0) this.groups.delete(key);
      key = paths.length < max ? this.nextGroup() : undefined;
    }
    this.count -= paths.length;
    return { group: on!, paths };
  }

  /** A worker that stops taking paths leaves its group. */
  leave(group: string): void {
    const n = (this.workersOn.get(group) ?? 0) - 1;
    if (n > 0) this.workersOn.set(group, n);
    else this.workersOn.delete(group);
  }

  /** The first group (in the order groups appeared) without a worker, else the first group; undefined when none. */
  private nextGroup(): string | undefined {
    let first: string | undefined;
    for (const key of this.groups.keys()) {
      if (!this.workersOn.has(key)) return key;
      first ??= key;
    }
    return first;
  }
}
