import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type Db, openDatabase } from '../db/database.js';
import type { EvalResult } from '../eval/eval-result.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import { DiffStore, type StoredJobDiff } from './diff-store.js';
import { diffEvaluations } from './rebuild-diff.js';

let dir: string;
let db: Db | undefined;
afterEach(() => {
  db?.close();
  rmSync(dir, { recursive: true, force: true });
});

const drv = (name: string): string => `/nix/store/${name.padEnd(32, '0').slice(0, 32)}-${name}.drv`;
const evaluation = (commit: string, attrs: EvalResult[]): CommitEvaluation => ({
  commit,
  jobs: [{ name: 'pkgs', allowEvalFailures: false, maxIncreasePercent: undefined, seconds: 0, attrs }],
});

describe('DiffStore', () => {
  it('stores only what the change touches, and gives back the whole diff', () => {
    dir = mkdtempSync(join(tmpdir(), 'ekaci-diffs-'));
    db = openDatabase(join(dir, 'ekaci.sqlite'));
    const same = Array.from({ length: 500 }, (_, i): EvalResult => ({
      attr: `same${i}`,
      drvPath: drv(`s${i}`),
      system: 'x86_64-linux',
    }));
    const base = evaluation('b'.repeat(40), [
      ...same,
      { attr: 'bumped', drvPath: drv('bumped-1'), system: 'x86_64-linux' },
      { attr: 'gone', drvPath: drv('gone'), system: 'x86_64-linux' },
      { attr: 'broken', error: 'error: boom' },
    ]);
    const head = evaluation('h'.repeat(40), [
      { attr: 'fresh', drvPath: drv('fresh'), system: 'aarch64-linux' },
      ...same,
      { attr: 'bumped', drvPath: drv('bumped-2'), system: 'x86_64-linux' },
      { attr: 'broken', error: 'error: boom' },
    ]);
    const graph = { inputsOf: () => [], systemOf: () => 'x86_64-linux' };
    const diff: StoredJobDiff = { name: 'pkgs', ...diffEvaluations(base.jobs[0]!.attrs, head.jobs[0]!.attrs, graph) };
    const store = new DiffStore(db);
    store.save('acme/pkgs', base.commit, head.commit, [diff]);

    const row = db.prepare('SELECT diff_json FROM rebuild_diffs').get() as { diff_json: string };
    const stored = (JSON.parse(row.diff_json) as StoredJobDiff).attrs.map((a) => a.attr).sort();
    expect(stored).toEqual(['broken', 'bumped', 'fresh', 'gone']);
    expect(store.has('acme/pkgs', base.commit, head.commit)).toBe(true);
    expect(store.load('acme/pkgs', base, head)).toEqual([diff]);
    expect(store.load('acme/pkgs', head, base)).toBeUndefined();
  });
});
