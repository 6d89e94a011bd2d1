/**
 * bench/eval: the built-in evaluator over N trivial attributes of which 5% throw or abort, against one
 * `nix-instantiate` of only the good attributes (which cannot survive a bad one). Fresh derivation names on both
 * sides, so each writes its `.drv` files. Prints both times and the ratio.
 *
 *   npx tsx bench/eval.ts [--count 2000 --workers 2]
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { evaluateBuiltIn } from '../coordinator/eval/evaluator.js';

const { values } = parseArgs({
  options: { count: { type: 'string', default: '2000' }, workers: { type: 'string', default: '2' } },
});
const count = Number(values.count);
const workers = Number(values.workers);
const dir = mkdtempSync(join(tmpdir(), 'ekaci-bench-eval-'));

// Every 20th attribute is bad: alternately a throw (caught by tryEval) and an abort (bisected).
function writeJobs(name: string, withBad: boolean): string {
  const tag = randomBytes(5).toString('hex');
  const lines: string[] = [];
  for (let i = 0; i < count; i++) {
    if (i % 20 === 10) {
      if (withBad) lines.push(`  a${i} = ${i % 40 === 10 ? 'throw' : 'abort'} "bad ${i}";`);
      continue;
    }
    lines.push(
      `  a${i} = derivation { name = "a${i}-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; };`,
    );
  }
  const file = join(dir, name);
  writeFileSync(file, `{\n${lines.join('\n')}\n}\n`);
  return file;
}

const builtInFile = writeJobs('built-in.nix', true);
const t0 = performance.now();
let good = 0;
let bad = 0;
for await (const r of evaluateBuiltIn({ file: builtInFile, attrPath: [], workers, gcRootsDir: join(dir, 'roots') })) {
  if (r.error !== undefined) bad++;
  else good++;
}
const builtInMs = performance.now() - t0;

const baselineFile = writeJobs('baseline.nix', false);
const t1 = performance.now();
const r = spawnSync('nix-instantiate', ['--option', 'substituters', '', baselineFile], { stdio: 'ignore' });
const baselineMs = performance.now() - t1;
if (r.status !== 0) throw new Error('nix-instantiate baseline failed');

console.log(`attributes: ${count} (${good} evaluated, ${bad} isolated failures), workers: ${workers}`);
console.log(`built-in evaluator:               ${builtInMs.toFixed(0)} ms`);
console.log(`nix-instantiate (good ones only): ${baselineMs.toFixed(0)} ms`);
console.log(`ratio: ${(builtInMs / baselineMs).toFixed(2)}×`);
