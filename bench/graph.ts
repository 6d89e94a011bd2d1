/**
 * bench/graph: ingest of a generated 100,000-derivation closure — parsing the `.drv` files in-process, storing
 * nodes and edges in SQLite, and building the in-memory graph and queues — in seconds and peak RSS. The
 * baseline, measured in the same run, is reading the same files without parsing or storing anything.
 *
 *   npx tsx bench/graph.ts [--count 100000]
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { openDatabase } from '../coordinator/db/database.js';
import { DerivationGraph } from '../coordinator/graph/derivation-graph.js';
import { readClosure } from '../coordinator/graph/ingest.js';
import { BuildStore } from '../coordinator/scheduler/build-store.js';
import { Scheduler } from '../coordinator/scheduler/scheduler.js';
import { writeDag } from './dag.js';

const { values } = parseArgs({ options: { count: { type: 'string', default: '100000' } } });
const count = Number(values.count);
const dir = mkdtempSync(join(tmpdir(), 'ekaci-bench-graph-'));
const file = writeDag(dir, randomBytes(5).toString('hex'), count, 1000);
process.stderr.write(`instantiating ${count} derivations (not measured)…\n`);
const inst = spawnSync('nix-instantiate', ['--option', 'substituters', '', file], {
  encoding: 'utf8',
  maxBuffer: 1 << 30,
  stdio: ['ignore', 'pipe', 'ignore'],
});
if (inst.status !== 0) throw new Error('nix-instantiate failed');
const roots = inst.stdout.split('\n').filter(Boolean);
const rssBefore = process.memoryUsage().rss;

const t0 = performance.now();
let bytes = 0;
for (const r of roots) bytes += readFileSync(r).length;
const readOnly = (performance.now() - t0) / 1000;

const t1 = performance.now();
const nodes = await readClosure(roots, () => false);
const parsed = (performance.now() - t1) / 1000;
const store = new BuildStore(openDatabase(join(dir, 'db.sqlite')));
store.transaction(() => store.insertDerivations(nodes, Date.now()));
const stored = (performance.now() - t1) / 1000;
const graph = new DerivationGraph(store);
graph.add(nodes, () => true);
const scheduler = new Scheduler();
const inClosure = new Set(nodes.map((n) => n.drvPath));
scheduler.add(
  nodes.map((n) => ({
    drvPath: n.drvPath,
    system: n.system,
    requiredFeatures: n.requiredFeatures,
    fixedOutput: n.fixedOutput,
    pendingInputs: n.inputs.filter((i) => inClosure.has(i)),
    priority: 0,
  })),
);
const total = (performance.now() - t1) / 1000;
const peak = process.resourceUsage().maxRSS / 1024;
console.log(`derivations:            ${nodes.length} (${(bytes / 1e6).toFixed(1)} MB of .drv files)`);
console.log(`read files only:        ${readOnly.toFixed(2)} s (baseline)`);
console.log(`parse:                  ${parsed.toFixed(2)} s`);
console.log(`+ SQLite:               ${stored.toFixed(2)} s`);
console.log(
  `+ graph and queues:     ${total.toFixed(2)} s (target ≤ 10 s), ${(total / readOnly).toFixed(1)}× the baseline`,
);
console.log(
  `peak RSS:               ${peak.toFixed(0)} MiB (target ≤ 1 GiB; ${(rssBefore / 2 ** 20).toFixed(0)} MiB before ingest)`,
);
