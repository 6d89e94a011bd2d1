import { LRUCache } from 'lru-cache';
import type { BuildStore, NewDerivation } from '../scheduler/build-store.js';
import type { ClosureSource } from './rebuild-diff.js';

export interface GraphNode {
  drvPath: string;
  system: string;
  inputs: readonly string[];
}

// A node is a few hundred bytes; 200k of them is well under 100 MiB, more than nixpkgs' x86_64-linux closure.
export const DEFAULT_GRAPH_LRU_CAPACITY = 200_000;

/**
 * The derivation graph in memory, bounded: the least recently used nodes are evicted beyond `capacity` and
 * loaded again, with their edges, from SQLite when asked for. Nodes with pending work are pinned and never
 * evicted — the scheduler and the diff of a running review must not pay a database round trip per edge.
 */
export class DerivationGraph implements ClosureSource {
  private readonly lru: LRUCache<string, GraphNode>;
  private readonly pinned = new Map<string, GraphNode>();
  /** Reloads from the database, for metrics and tests. */
  reloads = 0;

  constructor(
    private readonly store: BuildStore,
    capacity = DEFAULT_GRAPH_LRU_CAPACITY,
  ) {
    this.lru = new LRUCache({ max: capacity });
  }

  get size(): number {
    return this.lru.size + this.pinned.size;
  }

  /** Adds freshly parsed derivations (already stored); `pending` ones are pinned until `unpin`. */
  add(nodes: readonly NewDerivation[], pending: (drvPath: string) => boolean = () => false): void {
    for (const n of nodes) {
      const node = { drvPath: n.drvPath, system: n.system, inputs: n.inputs };
      if (pending(n.drvPath)) this.pinned.set(n.drvPath, node);
      else this.lru.set(n.drvPath, node);
    }
  }

  /** Work on the derivation is done: it may be evicted like any other node. */
  unpin(drvPath: string): void {
    const node = this.pinned.get(drvPath);
    if (!node) return;
    this.pinned.delete(drvPath);
    this.lru.set(drvPath, node);
  }

  isPinned(drvPath: string): boolean {
    return this.pinned.has(drvPath);
  }

  has(drvPath: string): boolean {
    return this.pinned.has(drvPath) || this.lru.has(drvPath);
  }

  /** The node, from memory or reloaded from SQLite; undefined for a derivation the coordinator never saw. */
  get(drvPath: string): GraphNode | undefined {
    const hit = this.pinned.get(drvPath) ?? this.lru.get(drvPath);
    if (hit) return hit;
    const row = this.store.derivation(drvPath);
    if (!row) return undefined;
    this.reloads++;
    const node = { drvPath, system: row.system, inputs: this.store.inputsOf(drvPath) };
    this.lru.set(drvPath, node);
    return node;
  }

  inputsOf(drvPath: string): readonly string[] {
    return this.get(drvPath)?.inputs ?? [];
  }

  systemOf(drvPath: string): string {
    return this.get(drvPath)?.system ?? 'unknown';
  }
}
