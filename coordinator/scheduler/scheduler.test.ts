import { describe, expect, it } from 'vitest';
import { isTerminal, statesBefore } from './build-state.js';
import { type AgentCapabilities, type NodeSpec, Scheduler, agentMatchesLane, laneOf } from './scheduler.js';

const X86 = 'x86_64-linux';

function spec(drvPath: string, pendingInputs: string[] = [], extra: Partial<NodeSpec> = {}): NodeSpec {
  return { drvPath, system: X86, requiredFeatures: [], fixedOutput: false, pendingInputs, priority: 0, ...extra };
}

function agent(agentId: string, extra: Partial<AgentCapabilities> = {}): AgentCapabilities {
  return { agentId, systems: [X86], supportedFeatures: [], mandatoryFeatures: [], mayBuildUntrusted: false, ...extra };
}

const nobodyElse = (): boolean => false;

function drain(s: Scheduler, a: AgentCapabilities): string[] {
  const out: string[] = [];
  for (let d = s.take(a, nobodyElse); d; d = s.take(a, nobodyElse)) out.push(d);
  return out;
}

describe('Scheduler', () => {
  it('hands out a derivation only after all its inputs succeeded', () => {
    const s = new Scheduler();
    // diamond: top <- left, right <- base
    expect(
      s.add([spec('top', ['left', 'right']), spec('left', ['base']), spec('right', ['base']), spec('base')]),
    ).toEqual(['base']);
    const a = agent('a');
    expect(drain(s, a)).toEqual(['base']);
    expect(s.succeeded('base').sort()).toEqual(['left', 'right']);
    expect(drain(s, a).sort()).toEqual(['left', 'right']);
    expect(s.succeeded('left')).toEqual([]);
    expect(s.succeeded('right')).toEqual(['top']);
    expect(drain(s, a)).toEqual(['top']);
  });

  it('prefers the longer critical path, then the order of arrival', () => {
    const s = new Scheduler();
    s.add([spec('lonely'), spec('chain-root'), spec('chain-1', ['chain-root']), spec('chain-2', ['chain-1'])]);
    expect(drain(s, agent('a'))).toEqual(['chain-root', 'lonely']);
  });

  it('serves fixed-output derivations from their own lane first', () => {
    const s = new Scheduler();
    s.add([spec('compile'), spec('fetch', [], { fixedOutput: true })]);
    expect(laneOf(spec('fetch', [], { fixedOutput: true }))).not.toEqual(laneOf(spec('compile')));
    expect(drain(s, agent('a'))).toEqual(['fetch', 'compile']);
  });

  it('gives a derivation only to agents with its system and every required feature', () => {
    const s = new Scheduler();
    s.add([spec('kvm-test', [], { requiredFeatures: ['kvm'] }), spec('arm', [], { system: 'aarch64-linux' })]);
    expect(drain(s, agent('plain'))).toEqual([]);
    expect(drain(s, agent('kvm', { supportedFeatures: ['kvm', 'big-parallel'] }))).toEqual(['kvm-test']);
    expect(drain(s, agent('arm', { systems: ['aarch64-linux'] }))).toEqual(['arm']);
  });

  it('never gives an agent with mandatory features a derivation lacking them', () => {
    const benchmarker = agent('bench', { supportedFeatures: ['kvm'], mandatoryFeatures: ['benchmark'] });
    expect(agentMatchesLane(benchmarker, laneOf(spec('x')))).toBe(false);
    expect(agentMatchesLane(benchmarker, laneOf(spec('x', [], { requiredFeatures: ['benchmark'] })))).toBe(true);
    expect(agentMatchesLane(benchmarker, laneOf(spec('x', [], { requiredFeatures: ['benchmark', 'kvm'] })))).toBe(true);
  });

  it('runs builtin derivations on any system', () => {
    expect(
      agentMatchesLane(agent('a', { systems: ['aarch64-darwin'] }), laneOf(spec('f', [], { system: 'builtin' }))),
    ).toBe(true);
  });

  it('retries a lost build on another agent when one can take it, else on the same one', () => {
    const s = new Scheduler();
    s.add([spec('x')]);
    const a = agent('a');
    const b = agent('b');
    expect(s.take(a, nobodyElse)).toBe('x');
    s.retry('x', 'a');
    expect(s.take(a, () => true)).toBeUndefined();
    expect(s.take(b, () => true)).toBe('x');
    s.retry('x', 'b');
    expect(s.take(a, (_lane, excluded) => !excluded.has('c') && false)).toBe('x');
  });

  it('removes every transitive dependent of a failure and names them', () => {
    const s = new Scheduler();
    s.add([spec('root'), spec('mid', ['root']), spec('top', ['mid']), spec('other')]);
    expect(s.take(agent('a'), nobodyElse)).toBe('root');
    expect(s.failed('root').sort()).toEqual(['mid', 'top']);
    expect(s.has('top')).toBe(false);
    expect(drain(s, agent('a'))).toEqual(['other']);
  });

  it('reports lanes that wait, with the time they started waiting', () => {
    let now = 1_000;
    const s = new Scheduler(() => now);
    s.add([spec('a', [], { system: 'riscv64-linux' })]);
    now = 5_000;
    expect([...s.waitingLanes()]).toEqual([[laneOf(spec('a', [], { system: 'riscv64-linux' })), 1_000]]);
  });

  it('handles dependency chains far deeper than the call stack', () => {
    const s = new Scheduler();
    const depth = 50_000;
    const specs = Array.from({ length: depth }, (_, i) => spec(`d${i}`, i === 0 ? [] : [`d${i - 1}`]));
    expect(s.add(specs)).toEqual(['d0']);
    expect(s.size).toBe(depth);
  });
});

describe('build states', () => {
  it('allows the documented transitions and no others', () => {
    expect(statesBefore('buildable').sort()).toEqual(['building', 'queued']);
    expect(statesBefore('building')).toEqual(['buildable']);
    expect(statesBefore('queued').sort()).toEqual([
      'cancelled',
      'dependency-failed',
      'failed',
      'timed-out',
      'unbuildable',
    ]);
    expect(isTerminal('dependency-failed')).toBe(true);
    expect(isTerminal('building')).toBe(false);
  });
});

describe('Scheduler at scale', () => {
  // The work is counted in heap comparisons, not timed: removing n buildable derivations must cost O(n log n), not
  // a heap rebuild per removal (which made settling 50k derivations take a minute with the event loop blocked).
  const N = 50_000;
  const budget = (n: number): number => n * 4 * Math.ceil(Math.log2(n));

  function buildable(s: Scheduler): string[] {
    const specs = Array.from({ length: N }, (_, i) => spec(`d${i}`));
    expect(s.add(specs)).toHaveLength(N);
    return specs.map((x) => x.drvPath);
  }

  it('removes 50k buildable derivations (failed, cancelled, unbuildable) in n log n', () => {
    const s = new Scheduler();
    const all = buildable(s);
    const before = s.comparisons;
    // In an order unrelated to the heap's, the way results and cancellations arrive.
    for (let i = 0; i < N; i++) s.failed(all[(i * 7919) % N]!);
    expect(s.size).toBe(0);
    expect(s.comparisons - before).toBeLessThan(budget(N));
  });

  it('looks past an excluded head without sorting the lane', () => {
    const s = new Scheduler();
    buildable(s);
    expect(s.add([spec('hot', [], { priority: 1 })])).toEqual(['hot']);
    const a = agent('a');
    const head = s.take(a, nobodyElse)!;
    expect(head).toBe('hot');
    // a failed it: it is back at the head of the lane, but a gets others while b could take it.
    s.retry(head, 'a');
    const before = s.comparisons;
    const others = (): boolean => true;
    for (let i = 0; i < 1_000; i++) expect(s.take(a, others)).not.toBe(head);
    // Each take pops and pushes back at most the scan depth: O(log n) each, whatever the lane's length.
    expect(s.comparisons - before).toBeLessThan(1_000 * 4 * 32 * Math.ceil(Math.log2(N)));
    expect(s.take(agent('b'), others)).toBe(head);
  });
});
