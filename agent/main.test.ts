import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { shellDerivation } from './testing/derivations.js';
import { is, ScriptedCoordinator } from './testing/scripted-coordinator.js';
import { alive } from './testing/processes.js';

const MAIN = fileURLToPath(new URL('./main.ts', import.meta.url));

let dir: string;
const children: ChildProcess[] = [];
const coordinators: ScriptedCoordinator[] = [];

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-main-'));
});

afterEach(async () => {
  for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
  await Promise.all(coordinators.splice(0).map((c) => c.stop()));
  rmSync(dir, { recursive: true, force: true });
});

interface Run {
  child: ChildProcess;
  exit: Promise<{ code: number | null; stderr: string }>;
}

/** Runs `ekaci-agent` as users do: a separate process, flags and environment, signals. */
function ekaciAgent(args: string[], env: NodeJS.ProcessEnv = {}): Run {
  const child = spawn(process.execPath, ['--import', 'tsx', MAIN, ...args], {
    env: { ...process.env, EKACI_LOG_LEVEL: 'warn', EKACI_AGENT_TOKEN: '', ...env },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  children.push(child);
  let stderr = '';
  child.stderr?.on('data', (b: Buffer) => (stderr += b.toString()));
  const exit = new Promise<{ code: number | null; stderr: string }>((resolve) =>
    child.on('close', (code) => resolve({ code, stderr })),
  );
  return { child, exit };
}

function tokenFile(mode: number): string {
  const path = join(dir, 'token');
  writeFileSync(path, 'test-token\n');
  chmodSync(path, mode);
  return path;
}

describe('ekaci-agent', () => {
  it('exits 2 with a clear message when --coordinator is missing', async () => {
    const { code, stderr } = await ekaciAgent([]).exit;
    expect(code).toBe(2);
    expect(stderr).toMatch(/required option '--coordinator <host:port>' not specified/);
  });

  it('exits 2 when there is no token at all', async () => {
    const { code, stderr } = await ekaciAgent(['--coordinator', '127.0.0.1:1']).exit;
    expect(code).toBe(2);
    expect(stderr).toMatch(/no agent token: pass --token-file FILE or set EKACI_AGENT_TOKEN/);
  });

  it('refuses a token file that group or others can read', async () => {
    const file = tokenFile(0o644);
    const { code, stderr } = await ekaciAgent(['--coordinator', '127.0.0.1:1', '--token-file', file]).exit;
    expect(code).toBe(2);
    expect(stderr).toContain(`token file ${file} is readable by group or others (mode 0644); run 'chmod 600 ${file}'`);
  });

  it('exits 2 on an unusable flag value', async () => {
    const { code, stderr } = await ekaciAgent(['--coordinator', '127.0.0.1:1', '--max-jobs', 'many']).exit;
    expect(code).toBe(2);
    expect(stderr).toMatch(/--max-jobs must be a positive integer, not 'many'/);
  });

  it('connects with a 0600 token file and drains on SIGTERM, then exits 0', async () => {
    const c = await ScriptedCoordinator.start();
    coordinators.push(c);
    const file = tokenFile(0o600);
    const run = ekaciAgent([
      '--coordinator',
      c.address,
      '--token-file',
      file,
      '--id',
      'cli-agent',
      '--max-jobs',
      '3',
      '--system',
      'x86_64-linux',
      '--system',
      'i686-linux',
      '--features',
      'kvm,big-parallel',
      '--spool-dir',
      join(dir, 'spool'),
    ]);
    const s = await c.stream(0);
    await s.waitFor(is.credit);
    expect(s.hello).toMatchObject({
      agentId: 'cli-agent',
      maxJobs: 3,
      systems: ['x86_64-linux', 'i686-linux'],
      supportedFeatures: ['kvm', 'big-parallel'],
    });
    run.child.kill('SIGTERM');
    expect((await s.waitFor(is.draining)).msg?.value).toEqual({ freeSlots: 0, draining: true });
    expect((await run.exit).code).toBe(0);
  });

  it('stops running builds at once on a second SIGTERM', async () => {
    const c = await ScriptedCoordinator.start();
    coordinators.push(c);
    const run = ekaciAgent(['--coordinator', c.address, '--spool-dir', join(dir, 'spool')], {
      EKACI_AGENT_TOKEN: 'test-token',
    });
    const s = await c.stream(0);
    await s.waitFor(is.credit);
    const drvPath = await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait');
    s.send({
      $case: 'assign',
      value: { leaseId: 'long', drvPath, attempt: 1, maxSilentSeconds: 0, timeoutSeconds: 0, outputNames: ['out'] },
    });
    await expect.poll(() => /pids \d+ \d+/.test(c.logs.get('long')?.toString() ?? ''), { timeout: 10_000 }).toBe(true);
    const [, builder, sleeper] = /pids (\d+) (\d+)/.exec(c.logs.get('long')?.toString() ?? '') ?? [];
    run.child.kill('SIGTERM');
    await s.waitFor(is.draining);
    run.child.kill('SIGTERM');
    expect((await run.exit).code).toBe(0);
    await expect.poll(() => [builder, sleeper].filter((pid) => alive(Number(pid))), { timeout: 2000 }).toEqual([]);
  });
});
