/**
 * bench/cache-push: pushing a closure to an S3 binary cache through presigned URLs, against `nix copy` to a local
 * `file://` cache of the same paths, in the same run, with the same compression and a signing key on both sides.
 *
 * The closure: `--small` small paths (≈1 KiB each) in groups of 50, one group path per 50 referring to them, one
 * output of `--big-mib` MiB of random bytes, and a top path referring to the groups and the big one. It is built
 * once in the machine's store (deterministic, so a second run reuses it; the big path is left there, ≈1 GiB — not
 * part of .ci/run).
 *
 * Measured per round, each on an empty destination:
 * - `nix copy --to file://DIR?compression=C&secret-key=…` of the closure: wall time and peak RSS (`/usr/bin/time`);
 * - eka-ci: the agent's `pushToS3` (bench/cache-push-agent.ts, a process of its own with its own nix-daemon
 *   connection) against the coordinator's push routes and the S3 stand-in (bench/cache-push-coordinator.ts, another
 *   process: s3rver behind a SigV4-checking front, on the same disk): wall time from the agent's first question to
 *   the last narinfo, and the agent process's peak RSS — the 1 GiB NAR is streamed, never held.
 * The target is eka-ci ≤ 1.2× the `nix copy` time. `--small 0` measures the big output alone (the streaming path). Both read the NARs from the page cache: the big path is read
 * once before the first round. Afterwards the bucket is checked: every path of the closure has a narinfo there.
 *
 *   npm run bench:cache-push [-- --small 2000 --big-mib 1024 --compression zstd|xz|none --rounds 1]
 *   npm run bench:cache-push -- --small 200 --big-mib 64          (quick, for development)
 *
 * Results go to stdout (a table, then one JSON line) and to .bench/cache-push.json. The exit status is 1 when a check
 * failed (a push failed, the bucket misses a path), not when the target was missed.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, runNix, runNixChecked } from '../common/nix/cli.js';
import { generateSigningKey } from '../coordinator/cache/signing-key.js';
import type { AgentCommand, AgentReport } from './cache-push-agent.js';
import type { CoordinatorCommand, CoordinatorReport } from './cache-push-coordinator.js';
import type { S3Command, S3Report } from './cache-push-s3.js';
import { Child } from './logs-child.js';

const TARGET_RATIO = 1.2;
/** Small paths per group path: a closure shaped like a package set (wide, shallow), not 2,000 references at once. */
const GROUP = 50;
// Generous: the first run builds the closure (2,000 derivations, ≈1–2 min on 2 cores); a push takes seconds.
const STEP_TIMEOUT_MS = 30 * 60_000;

const { values } = parseArgs({
  options: {
    small: { type: 'string', default: '2000' },
    'big-mib': { type: 'string', default: '1024' },
    compression: { type: 'string', default: 'zstd' },
    rounds: { type: 'string', default: '1' },
  },
});
const fail = (message: string): never => {
  process.stderr.write(`bench/cache-push: ${message}\n`);
  process.exit(2);
};
const wholeNumber = (name: string, raw: string, min: number): number => {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min) fail(`--${name} must be a whole number ≥ ${min}, got "${raw}"`);
  return n;
};
const small = wholeNumber('small', values.small, 0);
const bigMiB = wholeNumber('big-mib', values['big-mib'], 1);
const rounds = wholeNumber('rounds', values.rounds, 1);
const compression =
  values.compression === 'zstd' || values.compression === 'xz' || values.compression === 'none'
    ? values.compression
    : fail('--compression is zstd, xz or none');

const root = fileURLToPath(new URL('..', import.meta.url));
const benchDir = join(root, '.bench');
const MiB = 1024 * 1024;

interface Round {
  nixCopy: { s: number; maxRssMiB: number; bytes: number };
  ekaci: { s: number; maxRssMiB: number; cpuS: number; bytes: number; pushed: number; skipped: number };
  ratio: number;
}

async function main(): Promise<number> {
  mkdirSync(benchDir, { recursive: true });
  const work = mkdtempSync(join(tmpdir(), 'ekaci-bench-push-'));
  const coordinator = new Child<CoordinatorCommand, CoordinatorReport>(
    'coordinator',
    join(root, 'bench/cache-push-coordinator.ts'),
  );
  const agent = new Child<AgentCommand, AgentReport>('agent', join(root, 'bench/cache-push-agent.ts'));
  const s3 = new Child<S3Command, S3Report>('s3', join(root, 'bench/cache-push-s3.ts'));
  const deadline = (): number => Date.now() + STEP_TIMEOUT_MS;
  let failed = false;
  try {
    const top = await buildClosure();
    const closureSize = (await runNixChecked('nix-store', ['-q', '-R', top])).trim().split('\n').length;
    note(`closure: ${closureSize} paths; reading the ${bigMiB} MiB NAR once so both sides start from the page cache`);
    await warmBigPath(top);

    s3.send({ type: 'start' });
    const service = await s3.next('started', deadline());
    coordinator.send({ type: 'start', cacheDir: join(work, 'built-in'), top, compression, s3: service });
    const started = await coordinator.next('started', deadline());
    note(`coordinator ready (built-in cache filled in ${(started.fillMs / 1000).toFixed(1)} s)`);

    const key = generateSigningKey('ekaci-bench-nix-copy-1');
    const keyFile = join(work, 'nix-copy.secret');
    writeFileSync(keyFile, key.secretKey, { mode: 0o600 });

    const results: Round[] = [];
    for (let round = 1; round <= rounds; round++) {
      const dir = join(work, `file-cache-${round}`);
      const copy = await timedNixCopy(top, `file://${dir}?compression=${compression}&secret-key=${keyFile}`);
      const copyBytes = duBytes(dir);
      rmSync(dir, { recursive: true, force: true });
      note(`round ${round}: nix copy ${copy.s.toFixed(2)} s`);

      coordinator.send({ type: 'lease', prefix: `round-${round}` });
      const lease = await coordinator.next('leased', deadline());
      agent.send({
        type: 'push',
        coordinatorUrl: started.url,
        token: started.token,
        leaseId: lease.leaseId,
        cacheId: lease.cacheId,
        outputs: [top],
        compression,
        spoolDir: work,
      });
      const pushed = await agent.next('pushed', deadline());
      note(`round ${round}: eka-ci ${(pushed.ms / 1000).toFixed(2)} s`);
      const inBucket = await narinfosInBucket(`${service.bucketUrl}/round-${round}`, top);
      if (inBucket !== closureSize || pushed.result.pushed !== closureSize) {
        failed = true;
        note(`CHECK FAILED: ${pushed.result.pushed} pushed, ${inBucket} of ${closureSize} paths in the bucket`);
      }
      results.push({
        nixCopy: { ...copy, bytes: copyBytes },
        ekaci: {
          s: pushed.ms / 1000,
          maxRssMiB: pushed.maxRssMiB,
          cpuS: pushed.cpuMs / 1000,
          bytes: pushed.result.bytes,
          pushed: pushed.result.pushed,
          skipped: pushed.result.skipped,
        },
        ratio: pushed.ms / 1000 / copy.s,
      });
    }
    coordinator.send({ type: 'stop' });
    const coordinatorStats = await coordinator.next('stopped', deadline());
    agent.send({ type: 'stop' });
    await agent.next('stopped', deadline());
    s3.send({ type: 'stop' });
    const s3Stats = await s3.next('stopped', deadline());

    const best = (f: (r: Round) => number): number => Math.min(...results.map(f));
    const summary = {
      small,
      groups: Math.ceil(small / GROUP),
      bigMiB,
      closureSize,
      compression,
      rounds: results,
      nixCopyS: best((r) => r.nixCopy.s),
      ekaciS: best((r) => r.ekaci.s),
      ratio: best((r) => r.ekaci.s) / best((r) => r.nixCopy.s),
      agentPeakRssMiB: Math.max(...results.map((r) => r.ekaci.maxRssMiB)),
      coordinatorProcess: coordinatorStats,
      s3Process: s3Stats,
      target: TARGET_RATIO,
    };
    printTable(summary.ratio, results, {
      agent: results.reduce((sum, r) => sum + r.ekaci.cpuS, 0),
      coordinator: coordinatorStats.cpuMs / 1000,
      s3: s3Stats.cpuMs / 1000,
    });
    writeFileSync(join(benchDir, 'cache-push.json'), `${JSON.stringify(summary, null, 2)}\n`);
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    return failed ? 1 : 0;
  } finally {
    await Promise.all([coordinator.stop(), agent.stop(), s3.stop()]);
    rmSync(work, { recursive: true, force: true });
  }
}

/** Builds the closure (once: the expression is deterministic) and returns the top path. */
async function buildClosure(): Promise<string> {
  const file = join(benchDir, `cache-push-${small}-${bigMiB}.nix`);
  const filler = 'x'.repeat(1000);
  writeFileSync(
    file,
    `let
  mk = name: script: refs: derivation {
    name = "ekaci-bench-push-\${name}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    inherit refs;
  };
  n = ${small};
  small = builtins.genList (i: mk "small-\${toString i}" "echo small \${toString i} ${filler} > $out" []) n;
  groups = builtins.genList (g:
    let size = if n - g * ${GROUP} < ${GROUP} then n - g * ${GROUP} else ${GROUP};
    in mk "group-\${toString g}" "echo $refs > $out" (builtins.genList (j: builtins.elemAt small (g * ${GROUP} + j)) size)
  ) ((n + ${GROUP - 1}) / ${GROUP});
  big = mk "big-${bigMiB}mib" "/usr/bin/head -c ${bigMiB * MiB} /dev/urandom > $out" [];
in mk "top-${small}-${bigMiB}" "echo $refs > $out" (groups ++ [ big ])
`,
  );
  note(`building the closure (${file}); the first run takes a while`);
  const out = await runNixChecked('nix-build', ['--no-out-link', '-j', '2', ...NO_SUBSTITUTERS, file]);
  return out.trim().split('\n').at(-1)!;
}

/** Reads the big output once, so that neither side pays for the first read from disk. */
async function warmBigPath(top: string): Promise<void> {
  const refs = (await runNixChecked('nix-store', ['-q', '--references', top])).trim().split('\n');
  const big = refs.find((r) => r.endsWith(`-ekaci-bench-push-big-${bigMiB}mib`));
  if (big) await runNixChecked('sh', ['-c', 'cat "$0" > /dev/null', big]);
}

/** `nix copy --to` with its wall time and peak RSS, as `/usr/bin/time` measures them. */
function timedNixCopy(top: string, to: string): Promise<{ s: number; maxRssMiB: number }> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(
      '/usr/bin/time',
      ['-f', 'EKACI_TIME %M', 'nix', ...NIX_EXPERIMENTAL, 'copy', ...NO_SUBSTITUTERS, '--to', to, top],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => {
      const s = (performance.now() - started) / 1000;
      const rss = /EKACI_TIME (\d+)/.exec(stderr);
      if (code !== 0 || !rss) reject(new Error(`nix copy failed (${code}): ${stderr.slice(-2000)}`));
      else resolve({ s, maxRssMiB: Number(rss[1]) / 1024 });
    });
  });
}

/** How many paths of `top`'s closure have a narinfo in the bucket (Nix reads them over HTTP). */
async function narinfosInBucket(url: string, top: string): Promise<number> {
  const r = await runNix('nix', [
    ...NIX_EXPERIMENTAL,
    'path-info',
    '--store',
    url,
    '-r',
    top,
    ...['--option', 'narinfo-cache-negative-ttl', '0', '--option', 'narinfo-cache-positive-ttl', '0'],
  ]);
  return r.code === 0 ? r.stdout.trim().split('\n').length : 0;
}

function duBytes(dir: string): number {
  let total = 0;
  for (const e of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += statSync(join(e.parentPath, e.name)).size;
  }
  return total;
}

function printTable(ratio: number, results: Round[], cpu: { agent: number; coordinator: number; s3: number }): void {
  const lines = [
    '',
    `bench/cache-push: ${small} small paths in ${Math.ceil(small / GROUP)} groups + one ${bigMiB} MiB output, ` +
      `compression ${compression}, signed on both sides`,
    '',
    'round  nix copy file://           eka-ci → S3 (presigned)                 ratio',
    '       wall s  peak RSS  bytes    wall s  agent peak RSS  agent CPU s  bytes',
  ];
  results.forEach((r, i) =>
    lines.push(
      `${String(i + 1).padStart(5)}  ${r.nixCopy.s.toFixed(2).padStart(6)}  ${r.nixCopy.maxRssMiB.toFixed(0).padStart(5)} MiB` +
        `  ${mib(r.nixCopy.bytes)}  ${r.ekaci.s.toFixed(2).padStart(6)}  ${r.ekaci.maxRssMiB.toFixed(0).padStart(10)} MiB` +
        `  ${r.ekaci.cpuS.toFixed(2).padStart(11)}  ${mib(r.ekaci.bytes)}  ${r.ratio.toFixed(2)}×`,
    ),
  );
  lines.push(
    '',
    `best eka-ci / best nix copy: ${ratio.toFixed(2)}× (target ≤ ${TARGET_RATIO}×)`,
    `CPU over the whole run: agent ${cpu.agent.toFixed(1)} s, coordinator ${cpu.coordinator.toFixed(1)} s ` +
      `(incl. filling its built-in cache), S3 stand-in ${cpu.s3.toFixed(1)} s (incl. the check's reads)`,
    '',
  );
  process.stdout.write(lines.join('\n'));
}

function mib(bytes: number): string {
  return `${(bytes / MiB).toFixed(0).padStart(5)} MiB`;
}

function note(message: string): void {
  process.stderr.write(`bench/cache-push: ${message}\n`);
}

main().then(
  (code) => process.exit(code),
  (err: unknown) => {
    process.stderr.write(
      `bench/cache-push failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`,
    );
    process.exit(1);
  },
);
