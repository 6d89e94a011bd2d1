/**
 * bench/sizes: recording a branch's output sizes after a run at nixpkgs' size — a push to the default branch that
 * built 100,000 attributes (120,000 outputs), then its next commit with 5 % of them changed — into a real SQLite
 * file, as `ReviewService.recordSizes` does at the end of a run: which roots succeeded, their outputs, and the points
 * whose derivation is new to their series. The baseline, in the same process, is the floor of that work: the same
 * points inserted with one prepared statement in one transaction into a fresh database, nothing read. Reported: each
 * step's time and ratio to the baseline, and the longest the event loop was held (webhooks and agents wait that long).
 *
 *   npx tsx bench/sizes.ts [--attrs 100000] [--changed 5000]
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { openDatabase } from '../coordinator/db/database.js';
import type { CommitEvaluation } from '../coordinator/eval/repo-evaluation.js';
import type { RunRoot } from '../coordinator/github/run-store.js';
import { SizeHistory, branchPoints } from '../coordinator/review/size-history.js';
import { BuildStore } from '../coordinator/scheduler/build-store.js';

const { values } = parseArgs({
  options: { attrs: { type: 'string', default: '100000' }, changed: { type: 'string', default: '5000' } },
});
const attrs = Number(values.attrs);
const changed = Number(values.changed);
const SYSTEM = 'x86_64-linux';
const dir = mkdtempSync(join(tmpdir(), 'ekaci-bench-sizes-'));

const hash = (s: string): string =>
  createHash('sha256')
    .update(s)
    .digest('hex')
    .replace(/[eotu]/g, 'a')
    .slice(0, 32);
const drvOf = (attr: string, version: number): string => `/nix/store/${hash(`${attr}@${version}`)}-${attr}.drv`;
const outputsOf = (i: number): string[] => (i % 5 === 0 ? ['out', 'dev'] : ['out']);

/** A commit's evaluation of the generated set: attribute `i` at `versions[i]`. */
function evaluation(commit: string, versions: readonly number[]): CommitEvaluation {
  return {
    commit,
    jobs: [
      {
        name: 'pkgs',
        attrs: versions.map((v, i) => ({ attr: `pkg${i}`, drvPath: drvOf(`pkg${i}`, v), system: SYSTEM })),
      },
    ],
  } as unknown as CommitEvaluation;
}

const db = openDatabase(join(dir, 'ekaci.sqlite'));
const store = new BuildStore(db);
const sizes = new SizeHistory(db, { keepPoints: 300 });

/** Records every derivation of `e` as built, with its outputs' sizes (not measured: the builds' own work). */
function built(e: CommitEvaluation): void {
  const now = Date.now();
  store.transaction(() => {
    const list = e.jobs[0]!.attrs.map((a, i) => ({
      drvPath: a.drvPath!,
      system: SYSTEM,
      requiredFeatures: [],
      fixedOutput: false,
      preferLocal: false,
      inputs: [],
      outputs: Object.fromEntries(outputsOf(i).map((o) => [o, a.drvPath!.replace(/\.drv$/, `-${o}`)])),
    }));
    store.insertDerivations(list, now);
    const setState = db.prepare("UPDATE derivations SET state = 'succeeded' WHERE drv_path = ?");
    for (const [i, d] of list.entries()) {
      setState.run(d.drvPath);
      for (const [o, path] of Object.entries(d.outputs)) store.recordOutput(d.drvPath, o, path, 1000 + i, 50_000 + i);
    }
  });
}

const rootsOf = (e: CommitEvaluation): RunRoot[] =>
  e.jobs[0]!.attrs.map((a) => ({ side: 'head', drvPath: a.drvPath!, attr: `pkgs.${a.attr}`, system: SYSTEM }));

/** One run's recording: the points of its built roots, then the record. Seconds, the points, the loop's longest. */
async function record(
  sha: string,
  e: CommitEvaluation,
): Promise<{ points: number; added: number; pointsS: number; s: number; maxLagMs: number }> {
  const run = { repo: 'acme/nixpkgs', kind: 'push' as const, branch: 'main', head_sha: sha, base_sha: null };
  const lag = monitorEventLoopDelay({ resolution: 5 });
  lag.enable();
  const t0 = performance.now();
  const points = await branchPoints(run, rootsOf(e), { head: e, base: undefined }, store);
  const t1 = performance.now();
  const added = await sizes.record(points);
  const t2 = performance.now();
  lag.disable();
  const maxLagMs = lag.max / 1e6;
  return { points: points.length, added, pointsS: (t1 - t0) / 1000, s: (t2 - t0) / 1000, maxLagMs };
}

process.stderr.write(`recording the builds of ${attrs} attributes (not measured)…\n`);
const first = evaluation(
  'c1'.padEnd(40, '0'),
  Array.from({ length: attrs }, () => 1),
);
built(first);
const firstRun = await record('c1'.padEnd(40, '0'), first);

const versions = Array.from({ length: attrs }, (_, i) => (i % Math.max(1, Math.floor(attrs / changed)) === 0 ? 2 : 1));
const second = evaluation('c2'.padEnd(40, '0'), versions);
built({ ...second, jobs: [{ ...second.jobs[0]!, attrs: second.jobs[0]!.attrs.filter((_, i) => versions[i] === 2) }] });
const secondRun = await record('c2'.padEnd(40, '0'), second);

// The baseline: the first run's points, inserted plainly into a fresh database.
const points = await branchPoints(
  { repo: 'acme/nixpkgs', kind: 'push', branch: 'main', head_sha: 'c1', base_sha: null },
  rootsOf(first),
  { head: first, base: undefined },
  store,
);
const floorDb = openDatabase(join(dir, 'floor.sqlite'));
const insert = floorDb.prepare(
  `INSERT INTO size_history (repo, branch, job, attr, output, system, commit_sha, drv_path, nar_size, closure_size,
     recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
);
const b0 = performance.now();
floorDb.transaction(() => {
  for (const p of points)
    insert.run(p.repo, p.branch, p.job, p.attr, p.output, p.system, p.commit, p.drvPath, p.narSize, p.closureSize, 1);
})();
const baseline = (performance.now() - b0) / 1000;
floorDb.close();
db.close();
rmSync(dir, { recursive: true, force: true });

const line = (name: string, r: typeof firstRun): string =>
  `${name.padEnd(34)} ${r.s.toFixed(2)} s (${(r.s / baseline).toFixed(1)}× the baseline; points ${r.pointsS.toFixed(2)} s), ` +
  `${r.points} points, ${r.added} added, event loop held ${r.maxLagMs.toFixed(0)} ms at most`;
console.log(
  `attributes:                        ${attrs} (${points.length} outputs), ${changed} changed in the next commit`,
);
console.log(`baseline (plain inserts):          ${baseline.toFixed(2)} s`);
console.log(line('first commit of the branch:', firstRun));
console.log(line('next commit:', secondRun));
