import { join } from 'node:path';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { describe, expect, it } from 'vitest';
import { openDatabase } from '../db/database.js';
import { BuildStore, type NewDerivation } from '../scheduler/build-store.js';
import { DerivationGraph } from './derivation-graph.js';
import { closure, diffEvaluations } from './rebuild-diff.js';

function drv(name: string, inputs: string[] = [], system = 'x86_64-linux'): NewDerivation {
  return {
    drvPath: `/nix/store/${name.padEnd(32, '0').slice(0, 32)}-${name}.drv`,
    system,
    requiredFeatures: [],
    fixedOutput: false,
    preferLocal: false,
    inputs,
    outputs: { out: `/nix/store/${name.padEnd(32, '1').slice(0, 32)}-${name}` },
  };
}

function storeWith(nodes: NewDerivation[]): BuildStore {
  const store = new BuildStore(openDatabase(join(mkdtempSync(join(tmpdir(), 'ekaci-graph-')), 'db.sqlite')));
  store.transaction(() => store.insertDerivations(nodes, Date.now()));
  return store;
}

describe('DerivationGraph', () => {
  it('evicts the least recently used nodes beyond its capacity and reloads them with their edges', () => {
    const chain = Array.from({ length: 10 }, (_, i) => drv(`n${i}`, i === 0 ? [] : [drv(`n${i - 1}`).drvPath]));
    const graph = new DerivationGraph(storeWith(chain), 4);
    graph.add(chain);
    expect(graph.size).toBe(4);
    expect(graph.has(chain[0]!.drvPath)).toBe(false);
    // Walking the whole chain reloads what was evicted, edges included.
    expect(closure([chain[9]!.drvPath], graph).size).toBe(10);
    expect(graph.reloads).toBeGreaterThanOrEqual(6);
    expect(graph.inputsOf(chain[5]!.drvPath)).toEqual([chain[4]!.drvPath]);
    expect(graph.systemOf(chain[0]!.drvPath)).toBe('x86_64-linux');
    expect(graph.get('/nix/store/00000000000000000000000000000000-unknown.drv')).toBeUndefined();
  });

  it('never evicts a node with pending work', () => {
    const nodes = Array.from({ length: 20 }, (_, i) => drv(`p${i}`));
    const graph = new DerivationGraph(storeWith(nodes), 3);
    graph.add(nodes, (p) => p === nodes[0]!.drvPath);
    expect(graph.isPinned(nodes[0]!.drvPath)).toBe(true);
    expect(graph.has(nodes[0]!.drvPath)).toBe(true);
    graph.unpin(nodes[0]!.drvPath);
    graph.add(nodes.slice(1).map((n) => ({ ...n })));
    expect(graph.has(nodes[0]!.drvPath)).toBe(false);
  });
});

describe('diffEvaluations', () => {
  it('finds attributes changed only through a dependency and counts the rebuild per system', () => {
    const lib = drv('lib');
    const lib2 = drv('lib2');
    const app = drv('app', [lib.drvPath]);
    const app2 = drv('app2', [lib2.drvPath]);
    const arm = drv('arm', [], 'aarch64-linux');
    const graph = new DerivationGraph(storeWith([lib, lib2, app, app2, arm]));
    const d = diffEvaluations(
      [
        { attr: 'lib', drvPath: lib.drvPath, system: lib.system },
        { attr: 'app', drvPath: app.drvPath, system: app.system },
        { attr: 'old', error: 'gone' },
      ],
      [
        { attr: 'lib', drvPath: lib2.drvPath, system: lib2.system },
        { attr: 'app', drvPath: app2.drvPath, system: app2.system },
        { attr: 'arm', drvPath: arm.drvPath, system: arm.system },
      ],
      graph,
    );
    expect(d.attrs.map((a) => [a.attr, a.change, a.blastRadius])).toEqual([
      ['app', 'changed', 0],
      ['arm', 'added', 0],
      ['lib', 'changed', 1],
      ['old', 'removed', 0],
    ]);
    expect(d.attrs.find((a) => a.attr === 'old')?.evalError).toEqual({ base: 'gone' });
    expect(d.rebuildCountBySystem).toEqual({ 'x86_64-linux': 2, 'aarch64-linux': 1 });
  });
});
