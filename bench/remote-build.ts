/**
 * bench/remote-build: `ekaci build --coordinator` of a nixpkgs pull request's closure (test/support/closure-fixture.ts:
 * 30,001 derivations, 30,000 of them built already) against a coordinator and one agent on this machine, twice:
 *
 * - cold: the coordinator's cache has none of it (its first pull request): the whole `.drv` closure is uploaded;
 * - warm: the next pull request, where only `top` changed: what it costs once the coordinator knows the rest.
 *
 * Each client run is split where the client says what it did: instantiated and uploaded (`uploaded …`), submitted
 * (`submitted request …`, the coordinator having read the closure), settled (the process ends).
 *
 * Baselines, on the same closure in the same run:
 * - `nix-instantiate`: what any client pays before it can send anything;
 * - `nix-build`: the same pull request built on this machine alone (the 30,000 are valid here; Nix builds `top`):
 *   the warm run's ratio against it is the price of building through the coordinator;
 * - `nix copy --derivation --to` the coordinator's cache (what the client ran before, with `--nix-copy`): on the
 *   warm closure, where there is one derivation to send. Off by default: Nix asks for the 30,000 paths one at a time.
 *
 *   npm run build && npm run bench:remote-build [-- --mids 300 --leaves-per-mid 99 --nix-copy]
 *   npm run bench:remote-build -- --mids 30      (quick: 3,001 derivations)
 *
 * The client runs dist/ (bin/ekaci.js): build first; a warning says when a source file is newer. Results go to stdout
 * (a table, then one JSON line) and to .bench/remote-build.json. The exit status is 1 when a run failed or uploaded
 * other than expected, not when a figure is slow.
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { Agent } from '../agent/agent.js';
import { silentLogger } from '../common/logging.js';
import { NIX_EXPERIMENTAL, NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import { compileCoordinatorConfig } from '../coordinator/config.js';
import { Coordinator } from '../coordinator/coordinator.js';
import { type ClosureShape, writeClosure } from '../test/support/closure-fixture.js';
import { staleDist } from './bench-env.js';

const { values } = parseArgs({
  options: {
    mids: { type: 'string', default: '300' },
    'leaves-per-mid': { type: 'string', default: '99' },
    'nix-copy': { type: 'boolean', default: false },
  },
});
const fail = (message: string): never => {
  process.stderr.write(`bench/remote-build: ${message}\n`);
  process.exit(2);
};
const wholeNumber = (name: string, raw: string): number => {
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) fail(`--${name} must be a whole number ≥ 1, got "${raw}"`);
  return n;
};
const shape: ClosureShape = {
  mids: wholeNumber('mids', values.mids),
  leavesPerMid: wholeNumber('leaves-per-mid', values['leaves-per-mid']),
};
const derivations = shape.mids * (shape.leavesPerMid + 1) + 1;

const root = fileURLToPath(new URL('..', import.meta.url));
const distStale = staleDist(root, fail);
if (distStale) process.stderr.write(`warning: dist/ is older than ${distStale}; run npm run build first\n`);
const progress = (message: string): boolean => process.stderr.write(`bench/remote-build: ${message}\n`);
const seconds = (ms: number): number => Math.round(ms / 10) / 100;

/** One client run: when each of its phases ended (seconds from its start) and what it said it uploaded. */
interface ClientRun {
  uploadedS: number;
  submittedS: number;
  settledS: number;
  uploaded: string;
}

async function main(): Promise<number> {
  const work = mkdtempSync(join(tmpdir(), 'ekaci-bench-remote-'));
  const token = `ekaci_bench-remote-${randomBytes(16).toString('hex')}`;
  const coordinator = new Coordinator(
    compileCoordinatorConfig(
      {
        data_dir: join(work, 'data'),
        web: { port: 0, public: false },
        grpc: { port: 0 },
        api_tokens: [{ name: 'bench', token }],
      },
      'bench/remote-build',
    ),
    silentLogger(),
  );
  let agent: Agent | undefined;
  try {
    progress(`writing a closure of ${derivations.toLocaleString('en-US')} derivations…`);
    const tags = { cold: nonce(), warm: nonce(), local: nonce() };
    const files = {
      cold: await writeClosure(work, shape, tags.cold, 'cold.nix'),
      warm: await writeClosure(work, shape, tags.warm, 'warm.nix'),
      local: await writeClosure(work, shape, tags.local, 'local.nix'),
    };
    await coordinator.start();
    agent = new Agent({
      coordinator: coordinator.grpcTarget,
      token: coordinator.localAgentToken('bench'),
      agentId: 'bench',
      maxJobs: 2,
      store: 'local',
      spoolDir: join(work, 'spool'),
      logger: silentLogger(),
    });
    await agent.start();
    const url = `http://127.0.0.1:${coordinator.httpPort}`;

    progress('cold: the first pull request…');
    const cold = await client(files.cold, url, token);
    progress(`cold: ${cold.settledS} s`);

    progress('baseline: nix-instantiate…');
    let t = performance.now();
    const warmDrv = (await runNixChecked('nix-instantiate', [files.warm, '-A', 'top'])).trim();
    const instantiateS = seconds(performance.now() - t);

    let nixCopyS: number | null = null;
    if (values['nix-copy']) {
      progress('baseline: nix copy --derivation of the warm closure…');
      t = performance.now();
      await nixCopyDerivation(work, url, token, warmDrv);
      nixCopyS = seconds(performance.now() - t);
    }

    progress('warm: the next pull request…');
    const warmFile = values['nix-copy'] ? await writeClosure(work, shape, nonce(), 'warm2.nix') : files.warm;
    const warm = await client(warmFile, url, token);

    progress('baseline: nix-build of the same change on this machine…');
    t = performance.now();
    await runNixChecked('nix-build', ['--no-out-link', ...NO_SUBSTITUTERS, files.local, '-A', 'top']);
    const nixBuildS = seconds(performance.now() - t);

    const expected = {
      cold: new RegExp(`^uploaded ${derivations} derivations and 0 sources \\(0 paths found`),
      warm: new RegExp(`^uploaded 1 derivations and 0 sources \\(${shape.mids} paths found`),
    };
    const checks = { cold: expected.cold.test(cold.uploaded), warm: expected.warm.test(warm.uploaded) };
    const ratio = Math.round((warm.settledS / nixBuildS) * 100) / 100;

    console.log(
      `bench/remote-build: ekaci build --coordinator of ${derivations.toLocaleString('en-US')} derivations, ` +
        `${(derivations - 1).toLocaleString('en-US')} of them built already; one agent, 2 slots`,
    );
    const row = (name: string, r: ClientRun): string =>
      `${name.padEnd(34)}${String(r.uploadedS).padStart(8)}${String(r.submittedS).padStart(11)}` +
      `${String(r.settledS).padStart(10)}   ${r.uploaded}`;
    console.log(`${''.padEnd(34)}${'uploaded'.padStart(8)}${'submitted'.padStart(11)}${'settled'.padStart(10)}   (s)`);
    console.log(row('cold (the first pull request)', cold));
    console.log(row('warm (the next, `top` changed)', warm));
    console.log(`${'baseline: nix-instantiate'.padEnd(34)}${String(instantiateS).padStart(8)}`);
    console.log(`${'baseline: nix-build, this machine'.padEnd(34)}${''.padStart(19)}${String(nixBuildS).padStart(10)}`);
    if (nixCopyS !== null) {
      console.log(`${'baseline: nix copy --derivation'.padEnd(34)}${String(nixCopyS).padStart(8)}   (warm closure)`);
    }
    console.log(`warm ÷ nix-build: ${ratio}×; checks: cold upload ${ok(checks.cold)}, warm upload ${ok(checks.warm)}`);
    const summary = {
      bench: 'remote-build',
      date: new Date().toISOString(),
      commit: spawnSync('git', ['-C', root, 'rev-parse', 'HEAD'], { encoding: 'utf8' }).stdout.trim(),
      shape,
      derivations,
      cold,
      warm,
      baselines: { instantiateS, nixBuildS, nixCopyS },
      warmOverNixBuild: ratio,
      checks,
      distStale: distStale ?? null,
    };
    console.log(JSON.stringify(summary));
    mkdirSync(join(root, '.bench'), { recursive: true });
    writeFileSync(join(root, '.bench', 'remote-build.json'), `${JSON.stringify(summary)}\n`);
    return checks.cold && checks.warm ? 0 : 1;
  } finally {
    await agent?.stopNow();
    await coordinator.stopNow();
    rmSync(work, { recursive: true, force: true });
  }
}

const ok = (passed: boolean): string => (passed ? 'ok' : 'FAILED');

function nonce(): string {
  return randomBytes(6).toString('hex');
}

/** `bin/ekaci.js build FILE -A top --coordinator URL`, timed by what it prints; rejects when it fails. */
function client(file: string, url: string, token: string): Promise<ClientRun> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const at = (): number => seconds(performance.now() - started);
    const child = spawn(
      process.execPath,
      [join(root, 'bin', 'ekaci.js'), 'build', file, '-A', 'top', '--json', '--coordinator', url],
      { env: { ...process.env, EKACI_TOKEN: token }, stdio: ['ignore', 'ignore', 'pipe'] },
    );
    const run: ClientRun = { uploadedS: NaN, submittedS: NaN, settledS: NaN, uploaded: '' };
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      const uploaded = /^uploaded .*$/m.exec(stderr);
      if (uploaded && run.uploaded === '') {
        run.uploaded = uploaded[0];
        run.uploadedS = at();
      }
      if (Number.isNaN(run.submittedS) && /^submitted request/m.test(stderr)) run.submittedS = at();
    });
    child.on('error', reject);
    child.on('close', (code) => {
      run.settledS = at();
      if (code === 0) resolve(run);
      else reject(new Error(`ekaci build --coordinator exited with ${code}: ${stderr.slice(-3000)}`));
    });
  });
}

/** What the client ran before: `nix copy --derivation --to URL/cache`, the token in a netrc file. */
async function nixCopyDerivation(work: string, url: string, token: string, drv: string): Promise<void> {
  const netrc = join(work, 'netrc');
  writeFileSync(netrc, `machine 127.0.0.1 login ekaci password ${token}\n`, { mode: 0o600 });
  await runNixChecked('nix', [
    ...NIX_EXPERIMENTAL,
    ...['copy', '--derivation', '--to', `${url}/cache`, ...['--option', 'netrc-file', netrc], ...NO_SUBSTITUTERS],
    ...['--option', 'narinfo-cache-negative-ttl', '0', '--option', 'narinfo-cache-positive-ttl', '0', drv],
  ]);
}

process.exit(await main());
