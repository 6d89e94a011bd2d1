import { IllegalStateError } from '../../common/errors.js';
import { PriorityHeap } from './priority-heap.js';

/**
 * The in-memory build graph of unfinished derivations and the queues they wait in. It decides, and nothing
 * else: persistence and messaging belong to the BuildManager that drives it.
 *
 * A node waits in `queued` until all its inputs succeeded, then enters one lane — fixed-output derivations
 * (downloads) have their own lanes so they never wait behind long compilations, every other derivation waits in
 * the lane of its system and required features. Untrusted derivations (only code from people without write access
 * asked for them) have lanes of their own that only agents allowed to build untrusted code serve. Inside a lane:
 * higher request priority first, then the longer critical path (more derivations waiting behind it), then first
 * come.
 */

export interface NodeSpec {
  drvPath: string;
  system: string;
  requiredFeatures: readonly string[];
  fixedOutput: boolean;
  /** Input derivations that have not succeeded yet (each must be a node of this scheduler). */
  pendingInputs: readonly string[];
  priority: number;
  /** Only untrusted code wants it: it goes to agents that build in Nix's sandbox (see `mayBuildUntrusted`). */
  untrusted?: boolean;
}

export interface AgentCapabilities {
  agentId: string;
  systems: readonly string[];
  supportedFeatures: readonly string[];
  mandatoryFeatures: readonly string[];
  /** The agent builds in Nix's sandbox, or the server allows untrusted code on unsandboxed agents. */
  mayBuildUntrusted: boolean;
  /** The agent runs repository checks in a sandbox of its own (`Hello.runs_checks`). */
  runsChecks?: boolean;
}

type NodeStatus = 'queued' | 'buildable' | 'building';

interface Node {
  spec: NodeSpec;
  lane: string;
  status: NodeStatus;
  waitingOn: number;
  readonly dependents: string[];
  criticalPath: number;
  seq: number;
  readySince: number;
  /** Agents that lost an attempt of it; made at the first (rare), not for each of 100k nodes. */
  excludedAgents?: Set<string>;
}

const NO_AGENTS: ReadonlySet<string> = new Set();

// How far down a lane the scheduler looks for work that an agent is not excluded from before giving up on the
// lane; exclusions are rare (only after an infrastructure failure), so a short scan suffices.
const EXCLUSION_SCAN_DEPTH = 32;

// Derivations with system "builtin" (builtin:fetchurl) run on any agent.
const ANY_SYSTEM = 'builtin';

// The lane suffix of untrusted derivations.
const UNTRUSTED = 'untrusted';

export function laneOf(spec: Pick<NodeSpec, 'system' | 'requiredFeatures' | 'fixedOutput' | 'untrusted'>): string {
  const features = [...spec.requiredFeatures].sort().join(',');
  return `${spec.fixedOutput ? 'fod' : 'build'}|${spec.system}|${features}|${spec.untrusted ? UNTRUSTED : ''}`;
}

/** Whether a lane holds untrusted derivations. */
export function isUntrustedLane(lane: string): boolean {
  return lane.split('|')[3] === UNTRUSTED;
}

/**
 * Whether an agent may build derivations of a lane: its system, every required feature, every mandatory one, and,
 * for an untrusted lane, a sandbox.
 */
export function agentMatchesLane(agent: AgentCapabilities, lane: string): boolean {
  const [, system = '', features = '', trust = ''] = lane.split('|');
  const required = features === '' ? [] : features.split(',');
  if (trust === UNTRUSTED && !agent.mayBuildUntrusted) return false;
  if (system !== ANY_SYSTEM && !agent.systems.includes(system)) return false;
  const has = (f: string): boolean => agent.supportedFeatures.includes(f) || agent.mandatoryFeatures.includes(f);
  return required.every(has) && agent.mandatoryFeatures.every((f) => required.includes(f));
}

export class Scheduler {
  private readonly nodes = new Map<string, Node>();
  private readonly lanes = new Map<string, PriorityHeap<Node>>();
  private seq = 0;
  private untrusted = 0;

  constructor(private readonly now: () => number = Date.now) {}

  get size(): number {
    return this.nodes.size;
  }

  /** How many scheduled derivations are untrusted. */
  get untrustedCount(): number {
    return this.untrusted;
  }

  has(drvPath: string): boolean {
    return this.nodes.has(drvPath);
  }

  /** Comparisons made by the lanes' heaps so far: the scheduler's work, counted (for tests). */
  get comparisons(): number {
    let n = 0;
    for (const heap of this.lanes.values()) n += heap.comparisons;
    return n;
  }

  status(drvPath: string): NodeStatus | undefined {
    return this.nodes.get(drvPath)?.status;
  }

  /** A scheduled derivation's spec and status, read only (for estimates such as a run's ETA). */
  view(drvPath: string): { spec: Readonly<NodeSpec>; status: NodeStatus } | undefined {
    const node = this.nodes.get(drvPath);
    return node && { spec: node.spec, status: node.status };
  }

  /**
   * Adds unfinished derivations. Specs may come in any order within one call, but every pending input must be
   * in this call or already known. Returns the derivations that became buildable.
   */
  add(specs: readonly NodeSpec[]): string[] {
    const added: Node[] = [];
    for (const spec of specs) {
      if (this.nodes.has(spec.drvPath)) continue;
      const node: Node = {
        spec,
        lane: laneOf(spec),
        status: 'queued',
        waitingOn: spec.pendingInputs.length,
        dependents: [],
        criticalPath: 1,
        seq: 0,
        readySince: 0,
      };
      this.nodes.set(spec.drvPath, node);
      if (spec.untrusted) this.untrusted++;
      added.push(node);
    }
    for (const node of added) {
      // The inputs are kept as their nodes' own strings: read from the database, each edge had a copy of its own,
      // a third of a big graph's memory.
      const inputs = node.spec.pendingInputs.map((input) => {
        const inputNode = this.nodes.get(input);
        if (!inputNode) throw new IllegalStateError(`${node.spec.drvPath}: pending input ${input} is not scheduled`);
        inputNode.dependents.push(node.spec.drvPath);
        return inputNode.spec.drvPath;
      });
      node.spec = { ...node.spec, pendingInputs: inputs };
    }
    this.updateCriticalPaths(added);
    const ready: string[] = [];
    for (const node of added) {
      if (node.waitingOn === 0) {
        this.enqueue(node);
        ready.push(node.spec.drvPath);
      }
    }
    return ready;
  }

  /** Lanes that hold buildable work, with the time their oldest item became buildable. */
  waitingLanes(): Map<string, number> {
    const out = new Map<string, number>();
    for (const [lane, heap] of this.lanes) {
      if (heap.size === 0) continue;
      out.set(
        lane,
        heap.toArray().reduce((min, n) => Math.min(min, n.readySince), Infinity),
      );
    }
    return out;
  }

  /** Each lane that holds buildable work: how many, and since when its oldest has been waiting. */
  lanesWaiting(): Array<{ lane: string; buildable: number; since: number }> {
    return [...this.waitingLanes()].map(([lane, since]) => ({ lane, buildable: this.lanes.get(lane)!.size, since }));
  }

  buildableIn(lane: string): string[] {
    return (this.lanes.get(lane)?.toArray() ?? []).map((n) => n.spec.drvPath);
  }

  /**
   * Takes the best buildable derivation for this agent, or undefined. `othersCanTake(drv)` says whether another
   * connected agent could take a derivation of that lane this agent is excluded from; if none could, the exclusion yields.
   */
  take(
    agent: AgentCapabilities,
    othersCanTake: (lane: string, excluded: ReadonlySet<string>) => boolean,
  ): string | undefined {
    let best: { heap: PriorityHeap<Node>; node: Node } | undefined;
    for (const [lane, heap] of this.lanes) {
      const head = heap.peek();
      if (!head || !agentMatchesLane(agent, lane)) continue;
      const candidate = this.firstAllowed(heap, agent, othersCanTake);
      if (candidate && (!best || laneFirst(candidate, best.node))) best = { heap, node: candidate };
    }
    if (!best) return undefined;
    const chosen = best.node;
    best.heap.remove(chosen);
    chosen.status = 'building';
    return chosen.spec.drvPath;
  }

  /**
   * A build succeeded: returns the dependents that have no input left to wait for, made buildable — or, with `hold`,
   * left queued until the caller `release`s each (a derivation with tens of thousands of dependents frees them in
   * slices).
   */
  succeeded(drvPath: string, hold = false): string[] {
    const node = this.require(drvPath);
    this.remove(node);
    const ready: string[] = [];
    for (const d of node.dependents) {
      const dep = this.nodes.get(d);
      if (!dep) continue;
      dep.waitingOn -= 1;
      if (dep.waitingOn === 0) {
        if (!hold) this.enqueue(dep);
        ready.push(d);
      }
    }
    return ready;
  }

  /** Whether a derivation waits for nothing but its `release` (see `succeeded`). */
  isHeld(drvPath: string): boolean {
    const node = this.nodes.get(drvPath);
    return node !== undefined && node.status === 'queued' && node.waitingOn === 0;
  }

  /** Makes a held derivation buildable; false if it is not held (gone, cancelled, or buildable already). */
  release(drvPath: string): boolean {
    if (!this.isHeld(drvPath)) return false;
    this.enqueue(this.nodes.get(drvPath)!);
    return true;
  }

  /** A derivation ended without outputs: removes it and every transitive dependent, which are returned. */
  failed(drvPath: string): string[] {
    const node = this.require(drvPath);
    this.remove(node);
    const dependents: string[] = [];
    const stack = [...node.dependents];
    while (stack.length > 0) {
      const d = this.nodes.get(stack.pop()!);
      if (!d) continue;
      this.remove(d);
      dependents.push(d.spec.drvPath);
      stack.push(...d.dependents);
    }
    return dependents;
  }

  /** An attempt was lost to an infrastructure failure: the derivation is buildable again, avoiding `agentId`. */
  retry(drvPath: string, agentId: string): void {
    const node = this.require(drvPath);
    if (node.status !== 'building') throw new IllegalStateError(`${drvPath} is ${node.status}, not building`);
    (node.excludedAgents ??= new Set()).add(agentId);
    this.enqueue(node);
  }

  /**
   * A trusted request wants a derivation that so far only untrusted code wanted: it may now build anywhere. One
   * buildable already moves to its trusted lane.
   */
  trust(drvPath: string): void {
    const node = this.nodes.get(drvPath);
    if (!node?.spec.untrusted) return;
    const wasBuildable = node.status === 'buildable';
    if (wasBuildable) this.lanes.get(node.lane)?.remove(node);
    node.spec = { ...node.spec, untrusted: false };
    this.untrusted--;
    node.lane = laneOf(node.spec);
    if (wasBuildable) this.enqueue(node);
  }

  /** Marks a derivation as building without going through `take` (a lease kept across a coordinator restart). */
  markBuilding(drvPath: string): void {
    const node = this.require(drvPath);
    if (node.status === 'buildable') this.lanes.get(node.lane)?.remove(node);
    node.status = 'building';
  }

  private firstAllowed(
    heap: PriorityHeap<Node>,
    agent: AgentCapabilities,
    othersCanTake: (lane: string, excluded: ReadonlySet<string>) => boolean,
  ): Node | undefined {
    const head = heap.peek();
    if (head && !head.excludedAgents?.has(agent.agentId)) return head;
    // Beyond the head the heap is only partly ordered: the next items in priority order are popped (O(log n) each,
    // never more than the scan depth) and pushed back.
    const scanned: Node[] = [];
    let found: Node | undefined;
    while (scanned.length < EXCLUSION_SCAN_DEPTH) {
      const node = heap.pop();
      if (!node) break;
      scanned.push(node);
      const excluded = node.excludedAgents ?? NO_AGENTS;
      if (!excluded.has(agent.agentId) || !othersCanTake(node.lane, excluded)) {
        found = node;
        break;
      }
    }
    for (const node of scanned) heap.push(node);
    return found;
  }

  private enqueue(node: Node): void {
    node.status = 'buildable';
    node.seq = this.seq++;
    node.readySince = this.now();
    let heap = this.lanes.get(node.lane);
    if (!heap) {
      heap = new PriorityHeap(laneFirst);
      this.lanes.set(node.lane, heap);
    }
    heap.push(node);
  }

  private remove(node: Node): void {
    if (node.status === 'buildable') this.lanes.get(node.lane)?.remove(node);
    if (node.spec.untrusted) this.untrusted--;
    this.nodes.delete(node.spec.drvPath);
  }

  private require(drvPath: string): Node {
    const node = this.nodes.get(drvPath);
    if (!node) throw new IllegalStateError(`${drvPath} is not scheduled`);
    return node;
  }

  /** Critical path of a node = 1 + the longest critical path among its dependents, computed over new nodes. */
  private updateCriticalPaths(added: Node[]): void {
    const memo = new Map<Node, number>();
    const isNew = new Set(added);
    const visit = (root: Node): void => {
      // Iterative post-order: dependency chains can be thousands deep.
      const stack: Array<{ node: Node; expanded: boolean }> = [{ node: root, expanded: false }];
      while (stack.length > 0) {
        const top = stack[stack.length - 1]!;
        if (memo.has(top.node)) {
          stack.pop();
          continue;
        }
        const deps = top.node.dependents.map((d) => this.nodes.get(d)).filter((d): d is Node => d !== undefined);
        if (!top.expanded) {
          top.expanded = true;
          for (const d of deps) if (!memo.has(d) && isNew.has(d)) stack.push({ node: d, expanded: false });
          continue;
        }
        stack.pop();
        const cp = 1 + deps.reduce((max, d) => Math.max(max, memo.get(d) ?? d.criticalPath), 0);
        memo.set(top.node, cp);
        top.node.criticalPath = cp;
      }
    };
    for (const node of added) visit(node);
  }
}

function laneFirst(a: Node, b: Node): boolean {
  if (a.spec.fixedOutput !== b.spec.fixedOutput) return a.spec.fixedOutput;
  if (a.spec.priority !== b.spec.priority) return a.spec.priority > b.spec.priority;
  if (a.criticalPath !== b.criticalPath) return a.criticalPath > b.criticalPath;
  return a.seq < b.seq;
}
