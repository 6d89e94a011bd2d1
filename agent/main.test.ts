import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { shellDerivation } from './testing/derivations.js';
import { testAssign } from './testing/assign.js';
import { is, ScriptedCoordinator } from './testing/scripted-coordinator.js';
import { alive } from './testing/processes.js';

const MAIN = fileURLToPath(new URL('./main.ts', import.meta.url));
const COORDINATOR = fileURLToPath(new URL('./testing/coordinator-process.ts', import.meta.url));

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

interface CoordinatorProcess {
  address: string;
  /** The first stdout line (already printed or still to come) that matches. */
  line(pattern: RegExp): Promise<string>;
  /** `kill -9`, resolved once the process is gone. */
  kill(): Promise<void>;
}

/** A scripted coordinator in a process of its own (testing/coordinator-process.ts), so that it can be killed. */
async function coordinatorProcess(args: string[]): Promise<CoordinatorProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', COORDINATOR, ...args], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  children.push(child);
  const lines: string[] = [];
  let waiters: { pattern: RegExp; resolve: (line: string) => void }[] = [];
  let partial = '';
  child.stdout?.setEncoding('utf8').on('data', (text: string) => {
    const parts = (partial + text).split('\n');
    partial = parts.pop() ?? '';
    for (const l of parts) {
      lines.push(l);
      for (const w of waiters.filter((w) => w.pattern.test(l))) w.resolve(l);
      waiters = waiters.filter((w) => !w.pattern.test(l));
    }
  });
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const line = (pattern: RegExp): Promise<string> => {
    const seen = lines.find((l) => pattern.test(l));
    return seen !== undefined ? Promise.resolve(seen) : new Promise((resolve) => waiters.push({ pattern, resolve }));
  };
  const address = (await line(/^listening /)).slice('listening '.length);
  return {
    address,
    line,
    kill: () => {
      child.kill('SIGKILL');
      return exited;
    },
  };
}

/** A loopback port nothing listens on: connections to it are refused, as to a coordinator that died. */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** The builder and its child, from the `pids $$ $!` line a build wrote to the agent's spool. */
async function pidsInSpool(leaseId: string): Promise<number[]> {
  const file = join(dir, 'spool', 'logs', `${leaseId}.log`);
  const read = (): string => (existsSync(file) ? readFileSync(file, 'utf8') : '');
  await expect.poll(() => /pids \d+ \d+/.test(read()), { timeout: 30_000 }).toBe(true);
  const [, builder, sleeper] = /pids (\d+) (\d+)/.exec(read()) ?? [];
  return [Number(builder), Number(sleeper)];
}

/** Resolves at the first chunk of stderr matching `pattern`. */
function stderrMatch(run: Run, pattern: RegExp): Promise<void> {
  return new Promise((resolve) => {
    let seen = '';
    const check = (b: Buffer): void => {
      seen += b.toString();
      if (!pattern.test(seen)) return;
      run.child.stderr?.off('data', check);
      resolve();
    };
    run.child.stderr?.on('data', check);
  });
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
    const memory = await ekaciAgent(['--coordinator', '127.0.0.1:1', '--check-memory-mib', '4G']).exit;
    expect(memory.code).toBe(2);
    expect(memory.stderr).toMatch(/--check-memory-mib must be a whole number, not '4G'/);
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
      value: testAssign('long', drvPath),
    });
    await expect.poll(() => /pids \d+ \d+/.test(c.logs.get('long')?.toString() ?? ''), { timeout: 10_000 }).toBe(true);
    const [, builder, sleeper] = /pids (\d+) (\d+)/.exec(c.logs.get('long')?.toString() ?? '') ?? [];
    run.child.kill('SIGTERM');
    await s.waitFor(is.draining);
    run.child.kill('SIGTERM');
    expect((await run.exit).code).toBe(0);
    await expect.poll(() => [builder, sleeper].filter((pid) => alive(Number(pid))), { timeout: 2000 }).toEqual([]);
  });

  it('exits on SIGTERM after its coordinator was killed, not waiting for acknowledgements only it could send', async () => {
    const drvPath = await shellDerivation('echo x > $out');
    const welcome = JSON.stringify({ cacheUrl: `file://${join(dir, 'cache')}` });
    const c = await coordinatorProcess(['--no-ack', '--assign', `unacked=${drvPath}`, '--welcome-json', welcome]);
    const run = ekaciAgent(['--coordinator', c.address, '--spool-dir', join(dir, 'spool')], {
      EKACI_AGENT_TOKEN: 'test-token',
    });
    await c.line(/^event unacked finished$/);
    await c.kill();
    run.child.kill('SIGTERM');
    const { code, stderr } = await run.exit;
    expect(code).toBe(0);
    expect(stderr).toMatch(/"leases":\["unacked"\].*no coordinator is connected to acknowledge these results/);
    expect(stderr).not.toMatch(/still open/);
  });

  it('stops at once on a second SIGTERM after its coordinator was killed, even after an upload failed', async () => {
    const refused = `http://127.0.0.1:${await closedPort()}`;
    const failing = await shellDerivation('echo x > $out');
    const long = await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait');
    const c = await coordinatorProcess([
      ...['--assign', `upload-fails=${failing}`, '--assign', `long=${long}`],
      ...['--welcome-json', JSON.stringify({ cacheUrl: refused })],
    ]);
    // --cache-wait 0: the upload fails at once instead of waiting for a coordinator that may come back.
    const run = ekaciAgent(
      ['--coordinator', c.address, '--spool-dir', join(dir, 'spool'), '--max-jobs', '2', '--cache-wait', '0'],
      { EKACI_AGENT_TOKEN: 'test-token', EKACI_LOG_LEVEL: 'info' },
    );
    await c.line(/^event upload-fails finished$/);
    const pids = await pidsInSpool('long');
    await c.kill();
    const draining = stderrMatch(run, /draining; send it again to stop now/);
    run.child.kill('SIGTERM');
    await draining;
    run.child.kill('SIGTERM');
    const { code, stderr } = await run.exit;
    expect(code).toBe(0);
    // Nothing was left open: the connection of the failed upload was closed with the rest.
    expect(stderr).not.toMatch(/still open/);
    await expect.poll(() => pids.filter(alive), { timeout: 30_000 }).toEqual([]);
  });

  it('stops the builds that outlast the drain grace after one SIGTERM', async () => {
    const c = await ScriptedCoordinator.start();
    coordinators.push(c);
    const run = ekaciAgent(['--coordinator', c.address, '--spool-dir', join(dir, 'spool'), '--drain-grace', '1'], {
      EKACI_AGENT_TOKEN: 'test-token',
    });
    const s = await c.stream(0);
    await s.waitFor(is.credit);
    const drvPath = await shellDerivation('/bin/sleep 60 & echo "pids $$ $!"; wait');
    s.send({
      $case: 'assign',
      value: testAssign('slow', drvPath),
    });
    const pids = await pidsInSpool('slow');
    run.child.kill('SIGTERM');
    const { code, stderr } = await run.exit;
    expect(code).toBe(0);
    expect(stderr).toMatch(/the drain outlasted its grace; stopping now/);
    await expect.poll(() => pids.filter(alive), { timeout: 30_000 }).toEqual([]);
  });
});
