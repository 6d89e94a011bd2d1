/**
 * bench/eval: the built-in evaluator over N trivial attributes of which 5% throw or abort, against one
 * `nix-instantiate` of only the good attributes (which cannot survive a bad one). Fresh derivation names on every
 * run, so each writes its `.drv` files.
 *
 * The evaluator runs twice per round, as the coordinator runs it (sandboxed: bubblewrap, restrict-eval, `.drv`s
 * written through a nix-daemon) and with `[evaluation] sandbox = false`, so the sandbox's cost is measured in the
 * same process as the baseline. Rounds alternate the order; the medians are printed.
 *
 *   npx tsx bench/eval.ts [--count 2000 --workers 2 --rounds 3]
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { silentLogger } from '../common/logging.js';
import { EvalEnvironment } from '../coordinator/eval/eval-environment.js';
import { DEFAULT_EVALUATION_OPTIONS, NO_EXTRA_POLICY } from '../coordinator/eval/eval-options.js';
import { evaluateBuiltIn } from '../coordinator/eval/evaluator.js';

const { values } = parseArgs({
  options: {
    count: { type: 'string', default: '2000' },
    workers: { type: 'string', default: '2' },
    rounds: { type: 'string', default: '3' },
  },
});
const count = Number(values.count);
const workers = Number(values.workers);
const rounds = Number(values.rounds);
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
  const file = join(dir, `${name}-${tag}.nix`);
  writeFileSync(file, `{\n${lines.join('\n')}\n}\n`);
  return file;
}

const sandboxed = await EvalEnvironment.open(DEFAULT_EVALUATION_OPTIONS, silentLogger());
const unsandboxed = await EvalEnvironment.open({ ...DEFAULT_EVALUATION_OPTIONS, sandbox: false }, silentLogger());
await sandboxed.prepare();

async function builtIn(env: EvalEnvironment): Promise<{ ms: number; good: number; bad: number }> {
  const file = writeJobs('built-in', true);
  const launcher = env.launcher({ roots: [dir], policy: NO_EXTRA_POLICY });
  const t0 = performance.now();
  let good = 0;
  let bad = 0;
  for await (const r of evaluateBuiltIn({ file, attrPath: [], workers, gcRootsDir: join(dir, 'roots'), launcher })) {
    if (r.error !== undefined) bad++;
    else good++;
  }
  return { ms: performance.now() - t0, good, bad };
}

function baseline(): number {
  const file = writeJobs('baseline', false);
  const t1 = performance.now();
  const r = spawnSync('nix-instantiate', ['--option', 'substituters', '', file], { stdio: 'ignore' });
  if (r.status !== 0) throw new Error('nix-instantiate baseline failed');
  return performance.now() - t1;
}

const times = { sandboxed: [] as number[], unsandboxed: [] as number[], baseline: [] as number[] };
let counts = { good: 0, bad: 0 };
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? (['sandboxed', 'unsandboxed'] as const) : (['unsandboxed', 'sandboxed'] as const);
  for (const which of order) {
    const r = await builtIn(which === 'sandboxed' ? sandboxed : unsandboxed);
    times[which].push(r.ms);
    counts = { good: r.good, bad: r.bad };
  }
  times.baseline.push(baseline());
  console.log(
    `round ${round + 1}: sandboxed ${times.sandboxed.at(-1)!.toFixed(0)} ms, unsandboxed ${times.unsandboxed.at(-1)!.toFixed(0)} ms, nix-instantiate ${times.baseline.at(-1)!.toFixed(0)} ms`,
  );
}
sandboxed.close();
unsandboxed.close();

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const [s, u, b] = [median(times.sandboxed), median(times.unsandboxed), median(times.baseline)];
console.log(`attributes: ${count} (${counts.good} evaluated, ${counts.bad} isolated failures), workers: ${workers}`);
console.log(`built-in evaluator, sandboxed:    ${s.toFixed(0)} ms (median of ${rounds})`);
console.log(`built-in evaluator, no sandbox:   ${u.toFixed(0)} ms`);
console.log(`nix-instantiate (good ones only): ${b.toFixed(0)} ms`);
console.log(`ratio sandboxed/nix-instantiate:  ${(s / b).toFixed(2)}×`);
console.log(`ratio unsandboxed/nix-instantiate: ${(u / b).toFixed(2)}×`);
console.log(`sandbox overhead:                 ${((s / u - 1) * 100).toFixed(1)} %`);
