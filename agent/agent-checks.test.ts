import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../common/logging.js';
import { Outcome, type JobEvent } from '../common/proto/ekaci/agent/v1/agent.js';
import { SandboxCgroups } from '../common/sandbox/cgroup.js';
import { Agent } from './agent.js';
import { compileAgentOptions, type AgentOptionsInput } from './options.js';
import { testAssign } from './testing/assign.js';
import { killAgentTree } from './testing/processes.js';
import { is, ScriptedCoordinator, type ScriptedStream } from './testing/scripted-coordinator.js';
import { serveSource, type SourceServer } from './testing/source-server.js';

let dir: string;
let coordinator: ScriptedCoordinator | null = null;
let agent: Agent | null = null;
let source: SourceServer | null = null;
let agentProcess: ChildProcess | null = null;

const MAIN = fileURLToPath(new URL('./main.ts', import.meta.url));

// Whether this process may make cgroups for a process limit (root, or a delegated cgroup).
const cgroupsHere = await SandboxCgroups.probe({ memoryBytes: 0, maxProcesses: 20 });

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'ekaci-agent-checks-'));
});

afterEach(async () => {
  await killAgentTree(agentProcess);
  agentProcess = null;
  await agent?.stopNow();
  await coordinator?.stop();
  await source?.close();
  agent = null;
  coordinator = null;
  source = null;
  rmSync(dir, { recursive: true, force: true });
});

async function startAgent(options: Partial<AgentOptionsInput> = {}): Promise<ScriptedStream> {
  coordinator = await ScriptedCoordinator.start();
  source = await serveSource({ 'README.md': 'readme of the pull request\n' }, 'test-token');
  agent = new Agent(
    compileAgentOptions({
      coordinator: coordinator.address,
      token: 'test-token',
      maxJobs: 1,
      spoolDir: join(dir, 'spool'),
      logger: silentLogger(),
      ...options,
    }),
  );
  await agent.start();
  const s = await coordinator.stream(0);
  await s.waitFor(is.credit);
  return s;
}

function checkAssign(leaseId: string, command: string) {
  const check = { name: 'lint', command, allowNetwork: false, roBind: [], sourceUrl: source?.url ?? '' };
  return { $case: 'assign' as const, value: testAssign(leaseId, '', { outputNames: [], check }) };
}

async function finished(s: ScriptedStream, leaseId: string) {
  const event = (await s.waitFor(is.event(leaseId, 'finished'))).msg?.value as JobEvent;
  if (event.event?.$case !== 'finished') throw new Error('not a finished event');
  return event.event.value;
}

// The probe's answer is remembered once the sandbox started: the agent that cannot start it comes first.
describe('an agent whose bubblewrap cannot start', () => {
  it('says in Hello that it runs no checks and fails a check lease as INFRA_ERROR, saying why', async () => {
    const bin = join(dir, 'bin');
    mkdirSync(bin);
    writeFileSync(join(bin, 'bwrap'), '#!/bin/sh\necho "bwrap: setting up uid map: Permission denied" >&2\nexit 1\n');
    chmodSync(join(bin, 'bwrap'), 0o755);
    const path = process.env.PATH;
    process.env.PATH = `${bin}:${path ?? ''}`;
    let s: ScriptedStream;
    try {
      s = await startAgent();
    } finally {
      process.env.PATH = path;
    }

    expect(s.hello?.runsChecks).toBe(false);
    s.send(checkAssign('no-sandbox', 'echo ran'));
    const f = await finished(s, 'no-sandbox');
    expect(f.outcome).toBe(Outcome.OUTCOME_INFRA_ERROR);
    expect(f.error).toMatch(/^this agent cannot run checks: cannot start the sandbox .*uid map: Permission denied/);
    expect(source?.requests).toEqual([]);
  });
});

describe('an agent that runs checks', () => {
  it('says so in Hello, runs a check lease in the sandbox and reports its log and exit code', async () => {
    const s = await startAgent();
    expect(s.hello?.runsChecks).toBe(true);

    s.send(checkAssign('lint', 'cat README.md; exit 4'));
    const f = await finished(s, 'lint');

    expect(f.outcome).toBe(Outcome.OUTCOME_FAILED);
    expect(f.exitCode).toBe(4);
    expect(f.error).toBe('exit code 4');
    expect(f.outputs).toEqual([]);
    const log = coordinator?.logs.get('lint')?.toString('utf8') ?? '';
    expect(log).toMatch(/^eka-ci: check 'lint': /);
    expect(log).toContain('readme of the pull request');
    expect(f.logBytes).toBe(Buffer.byteLength(log));
    expect(source?.requests.map((h) => h.authorization)).toEqual(['Bearer test-token']);
    await new Promise((resolve) => agent?.once('settled', resolve));
    expect(existsSync(join(dir, 'spool', 'work', 'lint'))).toBe(false);
  });

  it.skipIf(cgroupsHere.unavailable !== null)(
    `gives its checks the process limit it was started with${
      cgroupsHere.unavailable === null ? '' : ` (skipped: ${cgroupsHere.unavailable})`
    }`,
    async () => {
      const s = await startAgent({ checkMaxProcesses: 20, checkMemoryMib: 0 });

      // dash, unlike bash, fails at the first refused fork instead of retrying it for seconds.
      s.send(checkAssign('forks', "sh -c 'for i in $(seq 50); do /bin/sleep 30 & done; wait'"));
      const f = await finished(s, 'forks');

      expect(f.outcome).toBe(Outcome.OUTCOME_FAILED);
      expect(f.exitCode).toBe(2);
      expect(f.error).toMatch(
        /^exit code 2; (a fork|\d+ forks) refused at the check's limit of 20 processes and threads$/,
      );
      const log = coordinator?.logs.get('forks')?.toString('utf8') ?? '';
      expect(log).toContain('eka-ci: limits: 20 processes and threads (cgroup v');
      expect(log).toContain('Cannot fork');
    },
  );

  it('passes none of the descriptors its process inherited to a check', async () => {
    coordinator = await ScriptedCoordinator.start();
    source = await serveSource({ 'README.md': 'readme\n' }, 'test-token');
    // Started the way a careless supervisor starts it: with a file of the host open on descriptor 99, not
    // close-on-exec (Node marks its low descriptors close-on-exec at start-up, but not such a one).
    const leaked = join(dir, 'supervisor-state');
    const flags = ['--coordinator', coordinator.address, '--spool-dir', join(dir, 'spool')];
    writeFileSync(leaked, '');
    agentProcess = spawn(
      'bash',
      ['-c', 'exec 99>>"$LEAKED"; exec "$@"', 'bash', process.execPath, '--import', 'tsx', MAIN, ...flags],
      {
        env: {
          ...process.env,
          LEAKED: leaked,
          EKACI_AGENT_TOKEN: 'test-token',
          EKACI_LOG_LEVEL: 'warn',
        },
        stdio: ['ignore', 'ignore', 'inherit'],
      },
    );
    const s = await coordinator.stream(0);
    await s.waitFor(is.credit);

    // What the check's shell hands a child: `ls` lists its own descriptors, 3 being the directory it reads. (Listing
    // the shell's, /proc/$$/fd, raced with the shell closing its ends of the pipe to `tr`.)
    s.send(checkAssign('fds', 'echo -n "fds: "; ls /proc/self/fd | tr "\\n" " "; echo; echo written >&99'));
    const f = await finished(s, 'fds');

    expect(f.outcome).toBe(Outcome.OUTCOME_FAILED);
    const log = coordinator.logs.get('fds')?.toString('utf8') ?? '';
    expect(log).toContain('fds: 0 1 2 3 \r\n');
    expect(log).toContain('99: Bad file descriptor');
    expect(readFileSync(leaked, 'utf8')).toBe('');
  });
});
