import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Outcome, type JobEvent } from '../common/proto/ekaci/agent/v1/agent.js';
import { is, ScriptedCoordinator, type ScriptedStream } from './testing/scripted-coordinator.js';
import { testAssign } from './testing/assign.js';
import { killAgentTree } from './testing/processes.js';

const MAIN = fileURLToPath(new URL('./main.ts', import.meta.url));
const NIX = ['--option', 'substituters', '', '--extra-experimental-features', 'nix-command'];
const QUIET = { encoding: 'utf8', stdio: 'pipe' } as const;

let dir: string;
let agent: ChildProcess | null = null;
let coordinator: ScriptedCoordinator | null = null;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-basic-drv-'));
});

afterEach(async () => {
  await killAgentTree(agent);
  agent = null;
  await coordinator?.stop();
  coordinator = null;
  rmSync(dir, { recursive: true, force: true });
});

function validIn(pid: number, path: string): boolean {
  return spawnSync('nsenter', ['-t', String(pid), '-m', 'nix-store', '--check-validity', path]).status === 0;
}

/**
 * An agent on a single-user store of its own, empty at the start: a private mount namespace whose /nix is the test's
 * directory, as the embedded system's `--agents 2` agents and fresh builder hosts have.
 */
async function isolatedAgent(cache: string): Promise<{ s: ScriptedStream; pid: number }> {
  const nixDir = join(dir, 'nix');
  mkdirSync(nixDir);
  coordinator = await ScriptedCoordinator.start({ welcome: { cacheUrl: `file://${cache}` } });
  agent = spawn(
    'unshare',
    [
      ...['--mount', '--propagation', 'private', 'sh', '-c', 'mount --bind "$NIX_DIR" /nix && exec "$@"', 'sh'],
      ...[process.execPath, '--import', 'tsx', MAIN, '--coordinator', coordinator.address, '--store', 'local'],
      ...['--spool-dir', join(dir, 'spool')],
    ],
    {
      env: {
        ...process.env,
        NIX_DIR: nixDir,
        EKACI_AGENT_TOKEN: 'test-token',
        EKACI_LOG_LEVEL: 'warn',
        XDG_CACHE_HOME: join(dir, 'xdg-cache'),
        // The test's cache is unsigned; the machine's build users serve its own store, this one builds as root.
        NIX_CONFIG: `${process.env.NIX_CONFIG ?? ''}\nbuild-users-group =\nrequire-sigs = false`,
      },
      stdio: ['ignore', 'ignore', 'inherit'],
    },
  );
  const s = await coordinator.stream(0);
  await s.waitFor(is.credit);
  return { s, pid: agent.pid as number };
}

// A mount namespace of its own (`unshare -m`, `nsenter`) needs root.
const isRoot = process.getuid?.() === 0;

describe('an agent with a store of its own', () => {
  it.skipIf(!isRoot)(
    "builds a derivation whose inputs' outputs are in the cache without making the input .drv files valid",
    async () => {
      const cache = join(dir, 'cache');
      const name = `ekaci-basic-drv-${randomBytes(6).toString('hex')}`;
      const expr = join(dir, 'default.nix');
      writeFileSync(
        expr,
        `let dep = derivation { name = "${name}-dep"; system = builtins.currentSystem; builder = "/bin/sh";` +
          ` args = [ "-c" "echo from-dep > $out" ]; };\n` +
          `in derivation { name = "${name}-top"; system = builtins.currentSystem; builder = "/bin/sh";` +
          ` args = [ "-c" "read x < \${dep}; echo \\"top of $x\\" > $out" ]; }\n`,
      );
      // Made on the machine's store, as the coordinator does: the .drv closure and the input's output go to the cache.
      const drvPath = execFileSync('nix-instantiate', [...NIX, expr], QUIET).trim();
      const depDrv = execFileSync('nix-store', ['-q', '--references', drvPath], QUIET)
        .split('\n')
        .find((p) => p.endsWith(`${name}-dep.drv`)) as string;
      const depOut = execFileSync('nix-store', [...NIX.slice(0, 3), '--realise', depDrv], QUIET).trim();
      execFileSync('nix', [...NIX, 'copy', '--derivation', '--to', `file://${cache}`, drvPath], QUIET);
      execFileSync('nix', [...NIX, 'copy', '--to', `file://${cache}`, depOut], QUIET);

      const { s, pid } = await isolatedAgent(cache);
      s.send({
        $case: 'assign',
        value: testAssign('basic', drvPath, { inputOutputs: [{ drvPath: depDrv, name: 'out', path: depOut }] }),
      });
      const finished = (await s.waitFor(is.event('basic', 'finished'))).msg?.value as JobEvent;
      if (finished.event?.$case !== 'finished') throw new Error('not a finished event');
      expect(finished.event.value.error).toBe('');
      expect(finished.event.value.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
      const out = finished.event.value.outputs[0]?.path ?? '';
      expect(out).toMatch(new RegExp(`^/nix/store/[a-z0-9]{32}-${name}-top$`));
      expect(spawnSync('nsenter', ['-t', String(pid), '-m', 'cat', out], { encoding: 'utf8' }).stdout).toBe(
        'top of from-dep\n',
      );
      expect(validIn(pid, depOut)).toBe(true);
      expect(validIn(pid, depDrv)).toBe(false);
      expect(validIn(pid, drvPath)).toBe(false);
    },
  );

  it.skipIf(!isRoot)(
    'stops a derivation it built that way when it is silent longer than max-silent-time, keeping its log',
    async () => {
      const cache = join(dir, 'cache');
      const expr = join(dir, 'default.nix');
      writeFileSync(
        expr,
        `derivation { name = "ekaci-basic-drv-silent-${randomBytes(6).toString('hex')}";` +
          ` system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo going-quiet; /bin/sleep 60" ]; }\n`,
      );
      const drvPath = execFileSync('nix-instantiate', [...NIX, expr], QUIET).trim();
      execFileSync('nix', [...NIX, 'copy', '--derivation', '--to', `file://${cache}`, drvPath], QUIET);
      const { s, pid } = await isolatedAgent(cache);

      s.send({
        $case: 'assign',
        value: {
          leaseId: 'silent',
          drvPath,
          attempt: 1,
          maxSilentSeconds: 1,
          timeoutSeconds: 0,
          outputNames: ['out'],
          maxLogBytes: 0,
          inputOutputs: [],
          pushes: [],
          check: undefined,
        },
      });
      const finished = (await s.waitFor(is.event('silent', 'finished'))).msg?.value as JobEvent;
      if (finished.event?.$case !== 'finished') throw new Error('not a finished event');
      expect(finished.event.value.outcome).toBe(Outcome.OUTCOME_TIMED_OUT);
      expect(finished.event.value.error).toMatch(/timed out after 1 seconds/);
      await expect.poll(() => coordinator?.logs.get('silent')?.toString('utf8') ?? '').toMatch(/going-quiet/);
      expect(validIn(pid, drvPath)).toBe(false);
    },
    60_000,
  );
});
