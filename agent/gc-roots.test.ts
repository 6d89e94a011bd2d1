import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Outcome, type JobEvent } from '../common/proto/ekaci/agent/v1/agent.js';
import { alive, daemonsOf, killAgentTree } from './testing/processes.js';
import { is, ScriptedCoordinator } from './testing/scripted-coordinator.js';

const MAIN = fileURLToPath(new URL('./main.ts', import.meta.url));
// Written into the test's own /nix, and checked inside the agent's namespace before anything collects garbage there:
// the machine's store is shared and must never be collected.
const MARKER = '.ekaci-test-store';

let dir: string;
let agent: ChildProcess | null = null;
let coordinator: ScriptedCoordinator | null = null;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-gc-roots-'));
});

afterEach(async () => {
  await killAgentTree(agent);
  agent = null;
  await coordinator?.stop();
  coordinator = null;
  rmSync(dir, { recursive: true, force: true });
});

/** Runs a command in the mount namespace of process `pid` (the agent's, whose /nix is the test's own store). */
function inNamespace(pid: number, command: string[]): { status: number | null; stdout: string } {
  const r = spawnSync('nsenter', ['-t', String(pid), '-m', ...command], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout };
}

/** Collects garbage in the agent's store, after making sure that it is the test's store and not the machine's. */
function collectGarbage(pid: number): void {
  if (inNamespace(pid, ['test', '-e', `/nix/${MARKER}`]).status !== 0) {
    throw new Error(`process ${pid} does not see the test's /nix: refusing to collect garbage`);
  }
  execFileSync('nsenter', ['-t', String(pid), '-m', 'nix-store', '--gc'], { stdio: 'ignore' });
}

// A mount namespace of its own (`unshare -m`, `nsenter`) needs root.
const isRoot = process.getuid?.() === 0;

describe('per-lease GC roots', () => {
  it.skipIf(!isRoot)(
    "keep a build's outputs from the garbage collector until the coordinator acknowledged the result",
    async () => {
      const nixDir = join(dir, 'nix');
      mkdirSync(nixDir);
      writeFileSync(join(nixDir, MARKER), '');
      // The same expression gives the same .drv path in the machine's store (where the test learns it) and in the
      // agent's own, where the agent builds it.
      const expr = join(dir, 'default.nix');
      const name = `ekaci-gc-root-test-${randomBytes(6).toString('hex')}`;
      writeFileSync(
        expr,
        `derivation { name = "${name}"; system = builtins.currentSystem; builder = "/bin/sh";` +
          ` args = [ "-c" "echo kept > $out" ]; }\n`,
      );
      const drvPath = execFileSync('nix-instantiate', ['--option', 'substituters', '', expr], {
        encoding: 'utf8',
      }).trim();

      coordinator = await ScriptedCoordinator.start({
        autoAckEvents: false,
        welcome: { cacheUrl: `file://${join(dir, 'cache')}` },
      });
      const c = coordinator;
      // A single-user store of the agent's own: a private mount namespace whose /nix is the test's directory.
      const script =
        'mount --bind "$NIX_DIR" /nix && nix-instantiate --option substituters \'\' "$EXPR" >/dev/null && exec "$@"';
      agent = spawn(
        'unshare',
        [
          ...['--mount', '--propagation', 'private', 'sh', '-c', script, 'sh'],
          ...[process.execPath, '--import', 'tsx', MAIN, '--coordinator', c.address, '--store', 'local'],
          ...['--spool-dir', join(dir, 'spool')],
        ],
        {
          env: {
            ...process.env,
            NIX_DIR: nixDir,
            EXPR: expr,
            EKACI_AGENT_TOKEN: 'test-token',
            EKACI_LOG_LEVEL: 'warn',
            XDG_CACHE_HOME: join(dir, 'xdg-cache'),
            // The machine's build users serve its own store; this one builds as root.
            NIX_CONFIG: `${process.env.NIX_CONFIG ?? ''}\nbuild-users-group =`,
          },
          stdio: ['ignore', 'ignore', 'inherit'],
        },
      );
      const pid = agent.pid as number;
      const s = await c.stream(0);
      await s.waitFor(is.credit);
      s.send({
        $case: 'assign',
        value: {
          leaseId: 'rooted',
          drvPath,
          attempt: 1,
          inputOutputs: [],
          pushes: [],
          maxSilentSeconds: 0,
          timeoutSeconds: 0,
          outputNames: ['out'],
          maxLogBytes: 0,
          check: undefined,
        },
      });
      const finished = (await s.waitFor(is.event('rooted', 'finished'))).msg?.value as JobEvent;
      if (finished.event?.$case !== 'finished') throw new Error('not a finished event');
      expect(finished.event.value.outcome).toBe(Outcome.OUTCOME_SUCCEEDED);
      const out = finished.event.value.outputs[0]?.path ?? '';
      expect(out).toMatch(new RegExp(`^/nix/store/[a-z0-9]{32}-${name}$`));

      // A daemon protects what it built only while its connection lasts; the agent's pool recycles connections and
      // loses them with cancelled builds. Without its daemons, only the lease's own root keeps the output.
      const daemons = daemonsOf(pid);
      expect(daemons.length).toBeGreaterThan(0);
      for (const d of daemons) process.kill(d, 'SIGKILL');
      await expect.poll(() => daemons.filter(alive), { timeout: 30_000 }).toEqual([]);

      collectGarbage(pid);
      expect(inNamespace(pid, ['test', '-e', out]).status).toBe(0);

      // Acknowledged: the lease settles, its root goes, and the next collection takes the output.
      const rootsOf = (leaseId: string) =>
        readdirSync(join(dir, 'spool', 'gcroots')).filter((n) => n.startsWith(`${leaseId}~`));
      expect(rootsOf('rooted')).toEqual(['rooted~out']);
      s.send({ $case: 'ack', value: { messageIds: [finished.messageId] } });
      await expect.poll(() => rootsOf('rooted'), { timeout: 30_000 }).toEqual([]);
      collectGarbage(pid);
      expect(inNamespace(pid, ['test', '-e', out]).status).not.toBe(0);
    },
  );
});
