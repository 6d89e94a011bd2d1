import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import Database from 'better-sqlite3';
import { migrate, openDatabase } from '../db/database.js';
import { MIGRATIONS } from '../db/migrations.js';
import { BuildStore } from './build-store.js';

const dir = mkdtempSync(join(tmpdir(), 'ekaci-build-store-'));
const db = openDatabase(join(dir, 'ekaci.sqlite'));
afterAll(() => {
  db.close();
  rmSync(dir, { recursive: true, force: true });
});

const drv = (name: string): string => `/nix/store/${name.padEnd(32, 'x').slice(0, 32)}-${name}.drv`;
const node = (name: string, inputs: string[], outputs: string[]) => ({
  drvPath: drv(name),
  system: 'x86_64-linux',
  requiredFeatures: [],
  fixedOutput: false,
  preferLocal: false,
  inputs: inputs.map(drv),
  outputs: Object.fromEntries(outputs.map((o) => [o, `/nix/store/${name.padEnd(32, 'o').slice(0, 32)}-${name}-${o}`])),
});

describe('BuildStore.inputOutputsOf', () => {
  it('gives every output of every input in one query, input by input and output by output, as an Assign lists them', () => {
    const store = new BuildStore(db);
    store.insertDerivations(
      [
        node('zlib', [], ['out', 'dev']),
        node('openssl', [], ['out', 'lib', 'bin']),
        node('curl', ['openssl', 'zlib'], ['out']),
        node('leaf', [], ['out']),
      ],
      1,
    );
    const perInput = store
      .inputsOf(drv('curl'))
      .sort()
      .flatMap((input) => store.outputsOf(input).map((o) => ({ drvPath: input, name: o.name, path: o.path })));
    expect(store.inputOutputsOf(drv('curl'))).toEqual(perInput);
    expect(perInput).toHaveLength(5);
    expect(store.inputOutputsOf(drv('leaf'))).toEqual([]);
  });
});

describe('BuildStore.recordOutput', () => {
  it('records sizes, and the path only of an output whose path was not known before its build', () => {
    const store = new BuildStore(db);
    const floating = { ...node('floating', [], []), outputs: { out: '' } };
    store.insertDerivations([node('fixed-path', [], ['out']), floating], 1);
    const known = store.outputsOf(drv('fixed-path'))[0]!.path;
    store.recordOutput(drv('fixed-path'), 'out', known, 10, 30);
    store.recordOutput(drv('floating'), 'out', '/nix/store/built-floating-out', 7, 7);
    expect(store.outputsOf(drv('fixed-path'))).toMatchObject([{ name: 'out', path: known, nar_size: 10 }]);
    expect(store.outputsOf(drv('floating'))).toMatchObject([
      { name: 'out', path: '/nix/store/built-floating-out', nar_size: 7, closure_size: 7 },
    ]);
  });
});

describe('BuildStore.logPathOf', () => {
  it("gives where an attempt's log was stored, and nothing for an attempt that was not made", () => {
    const store = new BuildStore(db);
    store.insertDerivations([node('logged', [], ['out'])], 1);
    const at = { drvPath: drv('logged'), agentId: 'a', now: 1, expiresAt: 2 };
    store.insertAttempt({ ...at, leaseId: 'lease-logged-1', attempt: 1, logPath: '/data/logs/old-layout/1.log' });
    store.insertAttempt({ ...at, leaseId: 'lease-logged-2', attempt: 2, logPath: '/data/logs/lo/logged.2.log' });
    expect(store.logPathOf(drv('logged'), 1)).toBe('/data/logs/old-layout/1.log');
    expect(store.logPathOf(drv('logged'), 2)).toBe('/data/logs/lo/logged.2.log');
    expect(store.logPathOf(drv('logged'), 3)).toBeUndefined();
  });
});

describe('BuildStore: the unfinished derivations', () => {
  it('are those queued, buildable or building, through every step of a build, a failure and a retry', () => {
    const store = new BuildStore(db);
    store.insertDerivations([node('life-a', [], ['out']), node('life-b', [], ['out'])], 1);
    const unfinished = (): string[] =>
      store
        .activeDerivations()
        .map((r) => r.drv_path)
        .filter((p) => p.includes('-life-'))
        .sort();
    const both = [drv('life-a'), drv('life-b')];

    expect(unfinished()).toEqual(both);
    expect(store.setState(drv('life-a'), 'buildable', 1, 2)).toBe(true);
    expect(store.setState(drv('life-a'), 'building', 1, 3)).toBe(true);
    expect(unfinished()).toEqual(both);
    expect(store.setState(drv('life-a'), 'failed', 1, 4)).toBe(true);
    expect(unfinished()).toEqual([drv('life-b')]);
    expect(store.setState(drv('life-a'), 'queued', 1, 5)).toBe(true);
    expect(unfinished()).toEqual(both);
    expect(store.setState(drv('life-b'), 'substituted', 0, 6)).toBe(true);
    expect(unfinished()).toEqual([drv('life-a')]);
    // Read through the index of unfinished derivations, not a scan of every derivation ever built.
    const plan = db.prepare('EXPLAIN QUERY PLAN SELECT * FROM derivations WHERE active = 1').all() as Array<{
      detail: string;
    }>;
    expect(plan.map((p) => p.detail).join('\n')).toContain('derivations_unfinished');
  });

  it('are found in a database made before they were marked (the migration marks them from their state)', () => {
    const file = join(dir, 'before-unfinished.sqlite');
    const old = new Database(file);
    migrate(old, MIGRATIONS.length - 1);
    const states = ['queued', 'buildable', 'building', 'succeeded', 'failed', 'cancelled'];
    const insert = old.prepare(
      `INSERT INTO derivations (drv_path, system, required_features, is_fod, prefer_local, state, created_at, updated_at)
       VALUES (?, 'x86_64-linux', '[]', 0, 0, ?, 0, 0)`,
    );
    for (const s of states) insert.run(drv(`old-${s}`), s);
    old.close();

    const migrated = openDatabase(file);
    const found = new BuildStore(migrated)
      .activeDerivations()
      .map((r) => r.state)
      .sort();
    migrated.close();

    expect(found).toEqual(['buildable', 'building', 'queued']);
  });
});
