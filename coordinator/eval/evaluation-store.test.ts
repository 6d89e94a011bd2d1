import Database from 'better-sqlite3';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { type Db, openDatabase } from '../db/database.js';
import { MIGRATIONS } from '../db/migrations.js';
import type { EvalResult } from './eval-result.js';
import { EvaluationStore } from './evaluation-store.js';
import type { CommitEvaluation } from './repo-evaluation.js';

const dirs: string[] = [];
const dbs: Db[] = [];
afterEach(() => {
  for (const db of dbs.splice(0)) db.close();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function file(): string {
  const dir = mkdtempSync(join(tmpdir(), 'ekaci-evaluations-'));
  dirs.push(dir);
  return join(dir, 'ekaci.sqlite');
}

function open(path = file()): { db: Db; store: EvaluationStore } {
  const db = openDatabase(path);
  dbs.push(db);
  return { db, store: new EvaluationStore(db) };
}

/** A package set of `n` attributes at version 0, but for the first `changed`, at `version`. */
function packageSet(commit: string, n: number, changed = 0, version = 2): CommitEvaluation {
  const attrs: EvalResult[] = Array.from({ length: n }, (_, i) => {
    const at = i < changed ? version : 0;
    const hash = `${i}-${at}`.padEnd(32, 'a').slice(0, 32);
    return {
      attr: `pkgs.p${i}`,
      drvPath: `/nix/store/${hash}-p${i}.drv`,
      system: 'x86_64-linux',
      outputs: { out: `/nix/store/${hash}-p${i}` },
      meta: { pname: `p${i}`, version: String(at), license: 'mit', platforms: ['x86_64-linux', 'aarch64-linux'] },
    };
  });
  return {
    commit,
    configDigest: 'config-1',
    jobs: [{ name: 'pkgs', allowEvalFailures: true, maxIncreasePercent: 10, seconds: 1.5, attrs }],
  };
}

const count = (db: Db, table: string): number =>
  (db.prepare(`SELECT COUNT(*) AS n FROM ${table}`).get() as { n: number }).n;

describe('EvaluationStore', () => {
  it('gives back what it stored: every attribute in order, errors, meta errors and skips included', async () => {
    const { store } = open();
    const evaluation: CommitEvaluation = {
      commit: 'a'.repeat(40),
      configDigest: 'digest',
      jobs: [
        {
          name: 'pkgs',
          allowEvalFailures: false,
          maxIncreasePercent: undefined,
          seconds: 2,
          attrs: [
            { attr: 'zlib', drvPath: '/nix/store/z.drv', system: 'x86_64-linux', outputs: { out: '/nix/store/z' } },
            { attr: 'broken', error: 'error: assertion failed' },
            { attr: 'odd', drvPath: '/nix/store/o.drv', metaErrors: { maintainers: 'error: boom' } },
            {
              attr: 'elsewhere',
              drvPath: '/nix/store/e.drv',
              system: 'aarch64-darwin',
              skipped: 'unsupported-platform',
            },
          ],
        },
        { name: 'tests', allowEvalFailures: true, maxIncreasePercent: 5, seconds: 0.5, attrs: [] },
      ],
    };
    await store.save('acme/pkgs', evaluation);
    expect(store.load('acme/pkgs', evaluation.commit)).toEqual(evaluation);
    expect(store.load('acme/other', evaluation.commit)).toBeUndefined();
    expect(store.has('acme/pkgs', evaluation)).toBe(true);
    expect(store.resolveCommit('acme/pkgs', 'aaaaaaa')).toBe(evaluation.commit);
  });

  it('stores a commit that changes a few attributes in a few bytes per attribute: names and values are shared', async () => {
    const { db, store } = open();
    await store.save('acme/pkgs', packageSet('1'.repeat(40), 2_000));
    const values = count(db, 'eval_values');
    const pages =
      (db.pragma('page_count', { simple: true }) as number) * (db.pragma('page_size', { simple: true }) as number);
    await store.save('acme/pkgs', packageSet('2'.repeat(40), 2_000, 100));
    expect(count(db, 'eval_attr_names')).toBe(2_000);
    expect(count(db, 'eval_lists')).toBe(1); // one platforms list, on every package
    expect(count(db, 'eval_values') - values).toBe(100);
    const grown =
      (db.pragma('page_count', { simple: true }) as number) * (db.pragma('page_size', { simple: true }) as number);
    // The first commit took its values' worth (≈ 300 bytes each); the second, rows of a few integers and 100 values.
    expect(grown - pages).toBeLessThan((pages / 2_000) * 200);
    expect(store.load('acme/pkgs', '2'.repeat(40))).toEqual(packageSet('2'.repeat(40), 2_000, 100));
  });

  it('shows an evaluation only once all of it is stored', async () => {
    const { store } = open();
    const big = packageSet('3'.repeat(40), 12_000);
    const saving = store.save('acme/pkgs', big);
    // The first slice is written, the rest waits for the event loop: a reader sees nothing yet.
    expect(store.load('acme/pkgs', big.commit)).toBeUndefined();
    expect(store.resolveCommit('acme/pkgs', '3333333')).toBeUndefined();
    await saving;
    expect(store.load('acme/pkgs', big.commit)?.jobs[0]?.attrs).toHaveLength(12_000);
  });

  it('keeps the latest commits and those asked for, and deletes the rest with what only they used', async () => {
    const { db, store } = open();
    for (let i = 1; i <= 5; i++) await store.save('acme/pkgs', packageSet(String(i).repeat(40), 100, i * 10, i));
    await store.save('acme/other', packageSet('9'.repeat(40), 10));
    expect(count(db, 'eval_values')).toBe(100 + 10 + 20 + 30 + 40 + 50);
    expect(store.retain('acme/pkgs', 2, new Set(['1'.repeat(40)])).sort()).toEqual(['2'.repeat(40), '3'.repeat(40)]);
    expect(store.isEvaluated('2'.repeat(40))).toBe(false);
    expect(store.isEvaluated('9'.repeat(40))).toBe(true);
    const left = ['1', '2', '3', '4', '5'].filter((i) => store.load('acme/pkgs', i.repeat(40)) !== undefined);
    expect(left).toEqual(['1', '4', '5']);
    expect(store.load('acme/other', '9'.repeat(40))).toBeDefined();
    // Kept: version 0 of every package (commit 1 and acme/other), and what commits 1, 4 and 5 changed.
    expect(count(db, 'eval_values')).toBe(100 + 10 + 40 + 50);
    expect(store.load('acme/pkgs', '4'.repeat(40))).toEqual(packageSet('4'.repeat(40), 100, 40, 4));
  });

  it('deletes a platforms list with the last value that used it', async () => {
    const { db, store } = open();
    const withPlatforms = (commit: string, platforms: string[]): CommitEvaluation => ({
      commit,
      jobs: [
        {
          name: 'pkgs',
          allowEvalFailures: false,
          maxIncreasePercent: undefined,
          seconds: 0,
          attrs: [{ attr: 'p', drvPath: `/nix/store/${commit.slice(0, 32)}-p.drv`, meta: { platforms } }],
        },
      ],
    });
    await store.save('acme/pkgs', withPlatforms('a'.repeat(40), ['x86_64-linux']));
    await store.save('acme/pkgs', withPlatforms('b'.repeat(40), ['aarch64-darwin', 'x86_64-darwin']));
    expect(count(db, 'eval_lists')).toBe(2);
    store.retain('acme/pkgs', 1, new Set());
    expect(count(db, 'eval_lists')).toBe(1);
    expect(store.load('acme/pkgs', 'b'.repeat(40))).toEqual(
      withPlatforms('b'.repeat(40), ['aarch64-darwin', 'x86_64-darwin']),
    );
  });

  it('moves evaluations stored as one document per commit into rows when the database is upgraded', () => {
    const path = file();
    const old = new Database(path);
    const before = MIGRATIONS.findIndex((m) => typeof m !== 'string');
    old.exec('CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)');
    MIGRATIONS.slice(0, before).forEach((sql, i) => {
      old.exec(sql as string);
      old.prepare('INSERT INTO schema_migrations VALUES (?, 0)').run(i + 1);
    });
    const evaluation = packageSet('7'.repeat(40), 50, 5);
    const job = evaluation.jobs[0]!;
    old
      .prepare(
        `INSERT INTO commit_evaluations (repo, commit_sha, job, allow_eval_failures, max_increase_percent, attrs_json,
           seconds, created_at) VALUES (?, ?, ?, 1, 10, ?, 1.5, 0)`,
      )
      .run('acme/pkgs', evaluation.commit, job.name, JSON.stringify(job.attrs));
    old.prepare("INSERT INTO commit_configs VALUES ('acme/pkgs', ?, 'config-1')").run(evaluation.commit);
    old.close();

    const { db, store } = open(path);
    expect(store.load('acme/pkgs', evaluation.commit)).toEqual(evaluation);
    expect(db.prepare("SELECT name FROM sqlite_master WHERE name = 'commit_evaluations'").get()).toBeUndefined();
  });
});
