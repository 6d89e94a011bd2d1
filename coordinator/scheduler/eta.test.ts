import { describe, expect, it } from 'vitest';
import { NIX_BASE32_ALPHABET } from '../../common/nix/store-path.js';
import { openDatabase } from '../db/database.js';
import { BuildDurations, DEFAULT_GUESS_SECONDS, buildSeconds, pnameOf, seedBuildDurations } from './build-durations.js';
import {
  type DurationSource,
  type PendingDerivation,
  type PendingWork,
  RunEtas,
  duration,
  estimateEta,
  etaText,
} from './eta.js';

const X86 = 'x86_64-linux';
const ARM = 'aarch64-linux';

let counter = 0;
/** A .drv store path named `name` with a fresh hash. */
function drv(name: string): string {
  let n = counter++;
  let hash = '';
  for (let i = 0; i < 32; i++) {
    hash += NIX_BASE32_ALPHABET[n % 32];
    n = Math.floor(n / 32);
  }
  return `/nix/store/${hash}-${name}.drv`;
}

/** Unfinished derivations in memory, counting how often each is asked for. */
class Graph implements PendingWork {
  readonly nodes = new Map<string, PendingDerivation>();
  readonly started = new Map<string, number>();
  readonly slotsBySystem = new Map<string, number>();
  lookups = 0;

  add(d: string, inputs: string[] = [], extra: Partial<PendingDerivation> = {}): string {
    this.nodes.set(d, { system: X86, fixedOutput: false, status: 'queued', inputs, ...extra });
    return d;
  }
  pending(drvPath: string): PendingDerivation | undefined {
    this.lookups++;
    return this.nodes.get(drvPath);
  }
  runningSince(): ReadonlyMap<string, number> {
    return this.started;
  }
  slots(system: string): number {
    return this.slotsBySystem.get(system) ?? 0;
  }
}

/** Estimates by pname, from a table the test writes. */
function fixed(seconds: Record<string, number>, guess = 5): DurationSource {
  return {
    estimate: (d) => {
      const s = seconds[pnameOf(d.drvPath)];
      return s === undefined ? { seconds: guess, basis: 'guess' } : { seconds: s, basis: 'same-system' };
    },
  };
}

describe('pnameOf', () => {
  it.each([
    ['hello-2.12.1', 'hello'],
    ['python3.11-requests-2.31', 'python3.11-requests'],
    ['perl5.38.2-URI-5.21', 'perl5.38.2-URI'],
    ['gcc-wrapper-13.2.0', 'gcc-wrapper'],
    ['source', 'source'],
    ['stdenv-linux', 'stdenv-linux'],
  ])('reads %s as the package %s, whatever its version', (name, pname) => {
    expect(pnameOf(drv(name))).toBe(pname);
  });
});

describe('BuildDurations', () => {
  it('estimates from the same package on the same system, else on any system, else guesses', () => {
    const db = openDatabase(':memory:');
    const d = new BuildDurations(db);
    expect(d.estimate({ drvPath: drv('hello-1.0'), system: X86, fixedOutput: false })).toEqual({
      seconds: DEFAULT_GUESS_SECONDS,
      basis: 'guess',
    });
    d.record({ drvPath: drv('hello-1.0'), system: X86, fixedOutput: false }, 10);
    d.record({ drvPath: drv('hello-1.1'), system: X86, fixedOutput: false }, 20);
    d.record({ drvPath: drv('hello-1.1'), system: ARM, fixedOutput: false }, 60);
    d.record({ drvPath: drv('curl-8.0'), system: ARM, fixedOutput: false }, 100);
    d.record({ drvPath: drv('zlib-1.3'), system: ARM, fixedOutput: false }, 4);
    // A new version of hello on x86: the mean of hello's x86 builds.
    expect(d.estimate({ drvPath: drv('hello-2.12.1'), system: X86, fixedOutput: false })).toEqual({
      seconds: 15,
      basis: 'same-system',
    });
    // curl was built only on aarch64: its mean over the systems it was built on.
    expect(d.estimate({ drvPath: drv('curl-8.5'), system: X86, fixedOutput: false })).toEqual({
      seconds: 100,
      basis: 'other-system',
    });
    // hello's mean over every system weighs each build alike: (10 + 20 + 60) / 3.
    expect(d.estimate({ drvPath: drv('hello-3'), system: 'riscv64-linux', fixedOutput: false }).seconds).toBe(30);
    // Never built: the median of every series' mean (4, 15, 60, 100 → the upper middle).
    expect(d.estimate({ drvPath: drv('never-1.0'), system: X86, fixedOutput: false })).toEqual({
      seconds: 60,
      basis: 'guess',
    });
    // A fetch of hello's tarball is not hello's build.
    expect(d.estimate({ drvPath: drv('hello-2.12.1.tar.gz'), system: X86, fixedOutput: true }).basis).toBe('guess');
    // Kept in the database: a restarted coordinator estimates the same.
    const again = new BuildDurations(db);
    expect(again.estimate({ drvPath: drv('hello-9'), system: X86, fixedOutput: false }).seconds).toBe(15);
    db.close();
  });

  it('follows a package whose builds got slower within a few builds, not its whole history', () => {
    const db = openDatabase(':memory:');
    const d = new BuildDurations(db);
    const hello = { system: X86, fixedOutput: false };
    for (let i = 0; i < 50; i++) d.record({ drvPath: drv(`hello-1.${i}`), ...hello }, 10);
    for (let i = 0; i < 16; i++) d.record({ drvPath: drv(`hello-2.${i}`), ...hello }, 100);
    // 16 builds after the change, the estimate is within a fifth of the new duration (a mean of all would be 31.8).
    expect(d.estimate({ drvPath: drv('hello-3'), ...hello }).seconds).toBeGreaterThan(80);
    db.close();
  });

  it('is seeded from the successful attempts recorded before the table existed', () => {
    const db = openDatabase(':memory:');
    const insertDrv = db.prepare(
      `INSERT INTO derivations (drv_path, system, required_features, is_fod, prefer_local, state, created_at,
         updated_at) VALUES (?, ?, '[]', ?, 0, 'succeeded', 0, 0)`,
    );
    const insertAttempt = db.prepare(
      `INSERT INTO attempts (lease_id, drv_path, attempt, agent_id, state, assigned_at, started_at, finished_at,
         expires_at, log_path) VALUES (?, ?, 1, 'a', ?, 0, ?, ?, 0, '')`,
    );
    const ok = drv('hello-1.0');
    const failed = drv('hello-1.1');
    insertDrv.run(ok, X86, 0);
    insertDrv.run(failed, X86, 0);
    insertAttempt.run('l1', ok, 'succeeded', 1_000, 13_000);
    insertAttempt.run('l2', failed, 'failed', 1_000, 500_000);
    db.exec('DELETE FROM build_durations');
    seedBuildDurations(db);
    expect(new BuildDurations(db).estimate({ drvPath: drv('hello-2'), system: X86, fixedOutput: false })).toEqual({
      seconds: 12,
      basis: 'same-system',
    });
    db.close();
  });

  it('measures a build by the agent’s clock when it reported start and finish, by ours otherwise', () => {
    expect(buildSeconds({ assignedAt: 0, startedAt: 5_000 }, 9_000, 99_000)).toBe(4);
    expect(buildSeconds({ assignedAt: 1_000, startedAt: null }, 0, 4_000)).toBe(3);
    // A finish the agent's clock puts before its start is measured by ours.
    expect(buildSeconds({ assignedAt: 1_000, startedAt: 5_000 }, 2_000, 8_000)).toBe(3);
  });
});

describe('estimateEta', () => {
  it('is the longest chain of estimates through what is unfinished, with its path from first build to root', () => {
    const g = new Graph();
    // app <- lib <- zlib (a chain of 10 + 20 + 30) and app <- doc (1): the chain decides.
    const zlib = g.add(drv('zlib-1.3'));
    const lib = g.add(drv('lib-2.0'), [zlib]);
    const doc = g.add(drv('doc-1'));
    const app = g.add(drv('app-1.0'), [lib, doc]);
    const eta = estimateEta([app], g, fixed({ zlib: 10, lib: 20, doc: 1, app: 30 }), 0)!;
    expect(eta.seconds).toBe(60);
    expect(eta.bound).toBe('critical-path');
    expect(eta.criticalPath).toEqual([zlib, lib, app]);
    expect(eta.basis).toEqual({ estimated: 4, guessed: 0 });
  });

  it('counts only what is left of a running build, and nothing of finished inputs', () => {
    const g = new Graph();
    const done = drv('done-1'); // finished: not in the graph
    const zlib = g.add(drv('zlib-1.3'), [done], { status: 'building' });
    const app = g.add(drv('app-1.0'), [zlib]);
    g.started.set(zlib, 1_000);
    // zlib takes 100 s and has run 40: 60 left, then app's 30.
    const eta = estimateEta([app], g, fixed({ zlib: 100, app: 30 }), 41_000)!;
    expect(eta.seconds).toBe(90);
    expect(eta.criticalPath).toEqual([zlib, app]);
    // Past its estimate, a running build counts as about to finish (never negative).
    expect(estimateEta([app], g, fixed({ zlib: 100, app: 30 }), 500_000)!.seconds).toBe(30);
  });

  it('takes the work over the connected slots when that is longer than the chain, and counts the guesses', () => {
    const g = new Graph();
    const leaves = Array.from({ length: 8 }, (_, i) => g.add(drv(`leaf${i}-1.0`)));
    const root = g.add(drv('root-1.0'), leaves);
    const durations = fixed({ root: 10 }, 20);
    // Infinitely many agents: one leaf, then the root.
    expect(estimateEta([root], g, durations, 0)!.seconds).toBe(30);
    // Two slots: 8 × 20 + 10 seconds of work over 2 slots.
    g.slotsBySystem.set(X86, 2);
    const eta = estimateEta([root], g, durations, 0)!;
    expect(eta).toMatchObject({ seconds: 85, bound: 'work', criticalPathSeconds: 30 });
    expect(eta.basis).toEqual({ estimated: 1, guessed: 8 });
    expect(etaText(eta)).toMatch(
      /^about 1 min left \(critical path: leaf\d-1\.0 → root-1\.0; .*8 of 9 builds never built before, guessed\)$/,
    );
  });

  it('is null when nothing the roots need is unfinished', () => {
    const g = new Graph();
    expect(estimateEta([drv('built-1.0')], g, fixed({}), 0)).toBeNull();
  });

  it('visits each derivation and edge a bounded number of times on a 30,000-derivation closure', () => {
    const g = new Graph();
    // 30 layers of 1,000 derivations; each depends on 3 of the layer below (nixpkgs-like fan-in onto a few).
    const layers: string[][] = [];
    let edges = 0;
    for (let l = 0; l < 30; l++) {
      const layer: string[] = [];
      for (let i = 0; i < 1_000; i++) {
        const below = layers[l - 1] ?? [];
        const inputs = below.length === 0 ? [] : [below[i]!, below[(i * 7) % 1_000]!, below[0]!];
        edges += inputs.length;
        layer.push(g.add(drv(`p${l}x${i}-1.0`), inputs));
      }
      layers.push(layer);
    }
    const roots = layers.at(-1)!;
    const eta = estimateEta(roots, g, fixed({}, 1), 0)!;
    expect(eta.seconds).toBe(30);
    expect(eta.criticalPathLength).toBe(30);
    expect(eta.criticalPath.length).toBe(10);
    expect(eta.basis.guessed).toBe(30_000);
    // Each derivation is asked for once: lookups are memoised, whatever the fan-in.
    expect(g.lookups).toBe(30_000);
    expect(edges).toBeGreaterThan(80_000);
  });

  it('walks a chain thousands deep without recursion', () => {
    const g = new Graph();
    let last = g.add(drv('c0-1'));
    for (let i = 1; i < 20_000; i++) last = g.add(drv(`c${i}-1`), [last]);
    expect(estimateEta([last], g, fixed({}, 1), 0)!.seconds).toBe(20_000);
  });
});

describe('RunEtas', () => {
  it('computes a run’s ETA again only after the refresh interval', () => {
    const g = new Graph();
    const a = g.add(drv('a-1'));
    let now = 0;
    const etas = new RunEtas(g, fixed({ a: 10 }), () => now);
    let asked = 0;
    const roots = () => {
      asked++;
      return [a];
    };
    expect(etas.of('run:1', roots)!.seconds).toBe(10);
    g.add(a, [], { status: 'building' });
    g.started.set(a, 0);
    now = 1_000;
    expect(etas.of('run:1', roots)!.seconds).toBe(10);
    expect(asked).toBe(1);
    now = 5_000;
    expect(etas.of('run:1', roots)!.seconds).toBe(5);
    expect(asked).toBe(2);
  });
});

describe('duration', () => {
  it.each([
    [42, '42 s'],
    [14 * 60 + 10, '14 min'],
    [2 * 3600 + 10 * 60, '2 h 10 min'],
    [3 * 3600, '3 h'],
  ])('reads %d seconds as %s', (seconds, text) => {
    expect(duration(seconds)).toBe(text);
  });
});
