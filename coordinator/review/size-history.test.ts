import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type Db, openDatabase } from '../db/database.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { RunRoot } from '../github/run-store.js';
import { BuildStore } from '../scheduler/build-store.js';
import { SizeHistory, type SizePoint, branchPoints } from './size-history.js';

const dirs: string[] = [];
const dbs: Db[] = [];
afterEach(() => {
  for (const db of dbs.splice(0)) db.close();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function open(keepPoints = 300): { db: Db; sizes: SizeHistory } {
  const dir = mkdtempSync(join(tmpdir(), 'ekaci-sizes-'));
  dirs.push(dir);
  const db = openDatabase(join(dir, 'ekaci.sqlite'));
  dbs.push(db);
  return { db, sizes: new SizeHistory(db, { keepPoints }) };
}

const drv = (name: string): string => `/nix/store/${name.padEnd(32, 'a').slice(0, 32)}-${name}.drv`;

function point(o: Partial<SizePoint> & { commit: string; narSize: number }): SizePoint {
  return {
    repo: 'acme/pkgs',
    branch: 'main',
    job: 'pkgs',
    attr: 'hello',
    output: 'out',
    system: 'x86_64-linux',
    drvPath: drv(`hello${o.narSize}`),
    closureSize: o.narSize * 2,
    ...o,
  };
}

describe('SizeHistory', () => {
  it('records a point once, however often the same build is recorded', async () => {
    const { sizes } = open();
    const p = point({ commit: 'c1', narSize: 100 });
    expect(await sizes.record([p], 1000)).toBe(1);
    expect(await sizes.record([p], 2000)).toBe(0);
    expect(await sizes.record([p, { ...p, output: 'dev', closureSize: 7 }], 3000)).toBe(1);
    // An older commit's build recorded again after a newer one changed the derivation: still once.
    const newer = point({ commit: 'c2', narSize: 200 });
    expect(await sizes.record([newer], 4000)).toBe(1);
    expect(await sizes.record([p], 5000)).toBe(0);
    expect(sizes.history({ repo: 'acme/pkgs', attr: 'hello' })).toEqual([
      { ...p, recordedAt: 1000 },
      { ...p, output: 'dev', closureSize: 7, recordedAt: 3000 },
      { ...newer, recordedAt: 4000 },
    ]);
  });

  it('adds a point only where the derivation changed, and again after a change back', async () => {
    const { sizes } = open();
    await sizes.record([point({ commit: 'c1', narSize: 100 })], 1);
    await sizes.record([point({ commit: 'c2', narSize: 100 })], 2);
    await sizes.record([point({ commit: 'c3', narSize: 150 })], 3);
    await sizes.record([point({ commit: 'c4', narSize: 100 })], 4);
    const history = sizes.history({ repo: 'acme/pkgs', attr: 'hello' });
    expect(history.map((h) => [h.commit, h.narSize])).toEqual([
      ['c1', 100],
      ['c3', 150],
      ['c4', 100],
    ]);
  });

  it('keeps the newest points of each series and leaves other series alone', async () => {
    const { db, sizes } = open(3);
    for (let i = 1; i <= 5; i++) {
      await sizes.record(
        [point({ commit: `c${i}`, narSize: i }), point({ commit: `c${i}`, narSize: i, output: 'dev' })],
        i,
      );
    }
    await sizes.record([point({ commit: 'r1', narSize: 1, branch: 'release' })], 6);
    const main = sizes.history({ repo: 'acme/pkgs', attr: 'hello', branch: 'main', output: 'out' });
    expect(main.map((h) => h.commit)).toEqual(['c3', 'c4', 'c5']);
    expect(sizes.history({ repo: 'acme/pkgs', attr: 'hello', output: 'dev' }).map((h) => h.commit)).toEqual([
      'c3',
      'c4',
      'c5',
    ]);
    expect(sizes.history({ repo: 'acme/pkgs', attr: 'hello', branch: 'release' })).toHaveLength(1);
    expect((db.prepare('SELECT COUNT(*) AS n FROM size_history').get() as { n: number }).n).toBe(7);
  });

  it('records a nixpkgs-sized push in slices, pruning as it goes', async () => {
    const { sizes } = open(2);
    const many = (commit: string, version: number): SizePoint[] =>
      Array.from({ length: 5_000 }, (_, i) =>
        point({ commit, attr: `p${i}`, narSize: version, drvPath: drv(`p${i}v${version}`) }),
      );
    for (let v = 1; v <= 3; v++) expect(await sizes.record(many(`c${v}`, v), v)).toBe(5_000);
    const p42 = sizes.history({ repo: 'acme/pkgs', attr: 'p42' });
    expect(p42.map((h) => h.commit)).toEqual(['c2', 'c3']);
  });

  it('filters by branch, job and output, and gives the newest `limit` points oldest first', async () => {
    const { sizes } = open();
    await sizes.record([point({ commit: 'm1', narSize: 1 })], 1);
    await sizes.record([point({ commit: 'r1', narSize: 2, branch: 'release' })], 2);
    await sizes.record([point({ commit: 'm2', narSize: 3 }), point({ commit: 'm2', narSize: 3, output: 'man' })], 3);
    await sizes.record([point({ commit: 'm3', narSize: 4, job: 'other' })], 4);
    await sizes.record([point({ commit: 'x1', narSize: 5, repo: 'acme/else' })], 5);
    await sizes.record([point({ commit: 'y1', narSize: 6, attr: 'world' })], 6);
    const q = { repo: 'acme/pkgs', attr: 'hello' };
    const commits = (extra: object): string[] =>
      sizes.history({ ...q, ...extra }).map((h) => `${h.commit}:${h.output}`);
    expect(commits({})).toEqual(['m1:out', 'r1:out', 'm2:out', 'm2:man', 'm3:out']);
    expect(commits({ branch: 'release' })).toEqual(['r1:out']);
    expect(commits({ job: 'pkgs', branch: 'main' })).toEqual(['m1:out', 'm2:out', 'm2:man']);
    expect(commits({ output: 'man' })).toEqual(['m2:man']);
    expect(commits({ limit: 2 })).toEqual(['m2:man', 'm3:out']);
    expect(commits({ branch: 'nope' })).toEqual([]);
  });

  it("gives every output of an attribute's newest build on a branch, and nothing for a branch without one", async () => {
    const { sizes } = open();
    await sizes.record([point({ commit: 'm1', narSize: 1 }), point({ commit: 'm1', narSize: 1, output: 'dev' })], 1);
    await sizes.record([point({ commit: 'm2', narSize: 8 }), point({ commit: 'm2', narSize: 9, output: 'dev' })], 2);
    await sizes.record([point({ commit: 'r1', narSize: 50, branch: 'release' })], 3);
    await sizes.record([point({ commit: 'o1', narSize: 70, job: 'other' })], 4);
    expect(sizes.newestOnBranch('acme/pkgs', 'main', 'pkgs', 'hello')).toEqual({
      commit: 'm2',
      recordedAt: 2,
      sizes: { out: { narSize: 8, closureSize: 16 }, dev: { narSize: 9, closureSize: 18 } },
    });
    expect(sizes.newestOnBranch('acme/pkgs', 'staging', 'pkgs', 'hello')).toBeUndefined();
    expect(sizes.newestOnBranch('acme/pkgs', 'main', 'pkgs', 'world')).toBeUndefined();
  });
});

describe('branchPoints', () => {
  function builds(db: Db): BuildStore {
    const store = new BuildStore(db);
    const now = Date.now();
    const add = (name: string, outputs: string[]): void =>
      store.insertDerivations(
        [
          {
            drvPath: drv(name),
            system: 'x86_64-linux',
            requiredFeatures: [],
            fixedOutput: false,
            preferLocal: false,
            inputs: [],
            outputs: Object.fromEntries(outputs.map((o) => [o, `/nix/store/${name}-${o}`])),
          },
        ],
        now,
      );
    add('head-ok', ['out', 'dev']);
    add('base-ok', ['out']);
    add('base-unknown-size', ['out']);
    add('base-failed', ['out']);
    store.setState(drv('head-ok'), 'substituted', 0, now);
    store.recordOutput(drv('head-ok'), 'out', '/nix/store/head-ok-out', 10, 30);
    store.recordOutput(drv('head-ok'), 'dev', '/nix/store/head-ok-dev', 5, 40);
    store.setState(drv('base-ok'), 'substituted', 0, now);
    store.recordOutput(drv('base-ok'), 'out', '/nix/store/base-ok-out', 7, 7);
    store.setState(drv('base-unknown-size'), 'substituted', 0, now);
    for (const s of ['buildable', 'building', 'failed'] as const) store.setState(drv('base-failed'), s, 1, now);
    return store;
  }

  const evaluation = (commit: string, attrs: Record<string, string>): CommitEvaluation => ({
    commit,
    jobs: [
      {
        name: 'pkgs',
        allowEvalFailures: false,
        maxIncreasePercent: undefined,
        seconds: 0,
        attrs: Object.entries(attrs).map(([attr, name]) => ({ attr, drvPath: drv(name), system: 'x86_64-linux' })),
      },
    ],
  });
  const head = evaluation('h', { a: 'head-ok' });
  const base = evaluation('b', { a: 'base-ok', b: 'base-unknown-size', c: 'base-failed', d: 'head-ok' });
  const roots: RunRoot[] = [
    { side: 'head', drvPath: drv('head-ok'), attr: 'pkgs.a', system: 'x86_64-linux' },
    { side: 'base', drvPath: drv('base-ok'), attr: 'pkgs.a', system: 'x86_64-linux' },
    { side: 'base', drvPath: drv('base-unknown-size'), attr: 'pkgs.b', system: 'x86_64-linux' },
    { side: 'base', drvPath: drv('base-failed'), attr: 'pkgs.c', system: 'x86_64-linux' },
  ];
  const run = { repo: 'acme/pkgs', branch: 'main', head_sha: 'h', base_sha: 'b' };

  it("takes a push's head: each output of each root that succeeded", async () => {
    const { db } = open();
    const points = await branchPoints(
      { ...run, kind: 'push', base_sha: null },
      roots,
      { head, base: undefined },
      builds(db),
    );
    expect(points.map((p) => [p.branch, p.commit, p.job, p.attr, p.output, p.narSize, p.closureSize])).toEqual([
      ['main', 'h', 'pkgs', 'a', 'dev', 5, 40],
      ['main', 'h', 'pkgs', 'a', 'out', 10, 30],
    ]);
  });

  it("takes a pull request's base roots that succeeded with known sizes, never its head", async () => {
    const { db } = open();
    const points = await branchPoints({ ...run, kind: 'pull_request' }, roots, { head, base }, builds(db));
    expect(points.map((p) => [p.commit, p.attr, p.output, p.narSize])).toEqual([['b', 'a', 'out', 7]]);
  });

  it('reads the builds of a push of thousands of roots in slices, every succeeded one once', async () => {
    const { db } = open();
    const store = new BuildStore(db);
    const n = 4_500; // more than two slices
    const name = (i: number): string => `p${String(i).padStart(5, '0')}`;
    store.insertDerivations(
      Array.from({ length: n }, (_, i) => ({
        drvPath: drv(name(i)),
        system: 'x86_64-linux',
        requiredFeatures: [],
        fixedOutput: false,
        preferLocal: false,
        inputs: [],
        outputs: { out: `/nix/store/${name(i)}-out` },
      })),
      1,
    );
    for (let i = 0; i < n; i++) {
      // Every third failed; the rest were substituted with their sizes.
      if (i % 3 === 0)
        for (const s of ['buildable', 'building', 'failed'] as const) store.setState(drv(name(i)), s, 1, 1);
      else {
        store.setState(drv(name(i)), 'substituted', 0, 1);
        store.recordOutput(drv(name(i)), 'out', `/nix/store/${name(i)}-out`, i, 2 * i);
      }
    }
    const attrs = Object.fromEntries(Array.from({ length: n }, (_, i) => [name(i), name(i)]));
    const head = evaluation('h', attrs);
    const roots = Array.from({ length: n }, (_, i): RunRoot => ({
      side: 'head',
      drvPath: drv(name(i)),
      attr: `pkgs.${name(i)}`,
      system: 'x86_64-linux',
    }));
    const points = await branchPoints(
      { ...run, kind: 'push', base_sha: null },
      roots,
      { head, base: undefined },
      store,
    );
    const expected = Array.from({ length: n }, (_, i) => i).filter((i) => i % 3 !== 0);
    expect(points.map((p) => [p.attr, p.narSize, p.closureSize])).toEqual(expected.map((i) => [name(i), i, 2 * i]));
  });

  it('takes nothing from a run without a branch', async () => {
    const { db } = open();
    expect(await branchPoints({ ...run, kind: 'push', branch: null }, roots, { head, base }, builds(db))).toEqual([]);
  });
});
