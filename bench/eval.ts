/**
 * bench/eval: the built-in evaluator over N trivial attributes of which 5% throw or abort, against one
 * `nix-instantiate` of only the good attributes (which cannot survive a bad one). Fresh derivation names on every
 * run, so each writes its `.drv` files.
 *
 * The evaluator runs three ways per round, in alternating order, and the medians are printed:
 * - `sandboxed`: as the coordinator runs it — bubblewrap, restrict-eval, allow-listed environment, `.drv` files
 *   written directly into an evaluation store of its own (the Nix store is read-only inside the sandbox);
 * - `daemon`: no sandbox, but the `.drv` files go through the same nix-daemon — what every evaluation on a
 *   multi-user host (NixOS, macOS) does, sandbox or not;
 * - `direct`: no sandbox, the local store written directly — the evaluator before the sandbox, on a single-user
 *   store.
 * `daemon / direct` is the cost of a store the evaluation cannot write to directly, which Nix 2.8 pays per written
 * `.drv` (one daemon round trip, with a thread, each), and which the evaluation store avoids: `sandboxed / direct`
 * is what the sandbox costs with it.
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
import { EvalEnvironment, type NixLauncher } from '../coordinator/eval/eval-environment.js';
import { PrivateNixDaemon } from '../coordinator/eval/private-daemon.js';
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

const sandboxed = await EvalEnvironment.open(DEFAULT_EVALUATION_OPTIONS, silentLogger(), {
  evalStoreDir: join(dir, 'eval-store'),
});
const unsandboxed = await EvalEnvironment.open({ ...DEFAULT_EVALUATION_OPTIONS, sandbox: false }, silentLogger());
await sandboxed.prepare();
const daemon = await PrivateNixDaemon.start(silentLogger());
const directLauncher = unsandboxed.launcher({ roots: [dir], policy: NO_EXTRA_POLICY });
const launchers: Record<Variant, NixLauncher> = {
  sandboxed: sandboxed.launcher({ roots: [dir], policy: NO_EXTRA_POLICY }),
  daemon: {
    ...directLauncher,
    command: (program, args, extra) =>
      directLauncher.command(program, [...args, '--store', `unix://${daemon.socketPath}`], extra),
  },
  direct: directLauncher,
};
type Variant = 'sandboxed' | 'daemon' | 'direct';

async function builtIn(launcher: NixLauncher): Promise<{ ms: number; good: number; bad: number }> {
  const file = writeJobs('built-in', true);
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

const variants: Variant[] = ['sandboxed', 'daemon', 'direct'];
const times: Record<Variant | 'baseline', number[]> = { sandboxed: [], daemon: [], direct: [], baseline: [] };
let counts = { good: 0, bad: 0 };
for (let round = 0; round < rounds; round++) {
  const order = round % 2 === 0 ? variants : [...variants].reverse();
  for (const which of order) {
    const r = await builtIn(launchers[which]);
    times[which].push(r.ms);
    counts = { good: r.good, bad: r.bad };
  }
  times.baseline.push(baseline());
  const last = (k: keyof typeof times): string => `${times[k].at(-1)!.toFixed(0)} ms`;
  console.log(
    `round ${round + 1}: sandboxed ${last('sandboxed')}, daemon ${last('daemon')}, direct ${last('direct')}, nix-instantiate ${last('baseline')}`,
  );
}
sandboxed.close();
unsandboxed.close();
daemon.stop();

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const [s, d, u, b] = [median(times.sandboxed), median(times.daemon), median(times.direct), median(times.baseline)];
const pct = (x: number, y: number): string => `${((x / y - 1) * 100).toFixed(1)} %`;
console.log(`attributes: ${count} (${counts.good} evaluated, ${counts.bad} isolated failures), workers: ${workers}`);
console.log(`built-in evaluator, sandboxed:         ${s.toFixed(0)} ms (median of ${rounds})`);
console.log(`built-in evaluator, through the daemon: ${d.toFixed(0)} ms`);
console.log(`built-in evaluator, direct store:      ${u.toFixed(0)} ms`);
console.log(`nix-instantiate (good ones only):      ${b.toFixed(0)} ms`);
console.log(`sandbox itself (sandboxed / daemon):   ${pct(s, d)}`);
console.log(`read-only store (daemon / direct):     ${pct(d, u)}`);
console.log(`ratio sandboxed / nix-instantiate:     ${(s / b).toFixed(2)}×`);
console.log(`ratio direct / nix-instantiate:        ${(u / b).toFixed(2)}×`);
