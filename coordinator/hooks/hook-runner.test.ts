import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LogStore } from '../logs/log-store.js';
import { HOOK_PATH, HookProcess } from './hook-runner.js';

const dir = mkdtempSync(join(tmpdir(), 'ekaci-hook-runner-'));
const logs = new LogStore(join(dir, 'logs'));
let n = 0;
const logPath = (): string => join(dir, 'logs', `${++n}.log`);

afterAll(() => logs.closeAll());

/** Whether a process is still there and not a zombie waiting to be reaped. */
function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

async function waitForFile(path: string): Promise<string> {
  while (!existsSync(path) || readFileSync(path, 'utf8') === '') await new Promise((r) => setTimeout(r, 10));
  return readFileSync(path, 'utf8').trim();
}

describe('a hook process', () => {
  it('gets exactly the environment it is given, none of the coordinator’s, in a session of its own', async () => {
    process.env.EKACI_HOOK_RUNNER_CANARY = 'coordinator-only-value';
    try {
      const path = logPath();
      const r = await new HookProcess({
        argv: ['/bin/sh', '-c', '/usr/bin/env; /bin/cat /proc/$$/stat'],
        env: { PATH: HOOK_PATH, GREETING: 'hello there' },
        timeoutMs: 60_000,
        logs,
        logPath: path,
      }).done;
      expect(r).toMatchObject({ outcome: 'exited', exitCode: 0, signal: null, truncated: false });
      const out = logs.read(path).toString();
      expect(out).toContain('GREETING=hello there\n');
      expect(out).toContain(`PATH=${HOOK_PATH}\n`);
      expect(out).not.toContain('coordinator-only-value');
      expect(out).not.toContain('EKACI_HOOK_RUNNER_CANARY');
      // /proc/PID/stat: pid (comm) state ppid pgrp session …: the shell leads its own group and session.
      const stat = out.slice(out.lastIndexOf('(sh)'));
      const [, , , pgrp, session] = stat.split(' ');
      const pid = /^(\d+) \(sh\)/m.exec(out)![1];
      expect(pgrp).toBe(pid);
      expect(session).toBe(pid);
    } finally {
      delete process.env.EKACI_HOOK_RUNNER_CANARY;
    }
  });

  it('is killed at its timeout with what it started, by SIGKILL after the grace when it ignores SIGTERM', async () => {
    const pids = join(dir, 'pids');
    const path = logPath();
    const proc = new HookProcess({
      argv: [
        '/bin/sh',
        '-c',
        `trap '' TERM; /bin/sleep 1000 & echo $! > ${pids}.child; /usr/bin/setsid /bin/sleep 1000 & echo $! > ${pids}.session; echo waiting; wait`,
      ],
      env: { PATH: HOOK_PATH },
      timeoutMs: 1_500,
      killGraceMs: 200,
      logs,
      logPath: path,
    });
    const child = Number(await waitForFile(`${pids}.child`));
    const session = Number(await waitForFile(`${pids}.session`));
    expect(alive(child) && alive(session)).toBe(true);
    const r = await proc.done;
    expect(r).toMatchObject({ outcome: 'timed-out', exitCode: null, signal: 'SIGKILL' });
    // Killed, and gone as soon as the kernel gets to them: on a busy machine that can be after the run has ended
    // (when its output gave up draining before their death closed the pipe).
    await expect.poll(() => alive(child)).toBe(false);
    await expect.poll(() => alive(session)).toBe(false);
    expect(logs.read(path).toString()).toBe('waiting\n');
  });

  it('ends with SIGTERM when it does not ignore it, and kills what it left running when it exits', async () => {
    const pidFile = join(dir, 'left-behind');
    const r = await new HookProcess({
      argv: ['/bin/sh', '-c', `/bin/sleep 1000 & echo $! > ${pidFile}; exit 3`],
      env: { PATH: HOOK_PATH },
      timeoutMs: 60_000,
      logs,
      logPath: logPath(),
    }).done;
    expect(r).toMatchObject({ outcome: 'exited', exitCode: 3 });
    expect(alive(Number(readFileSync(pidFile, 'utf8')))).toBe(false);

    const slow = new HookProcess({
      argv: ['/bin/sleep', '1000'],
      env: { PATH: HOOK_PATH },
      timeoutMs: 300,
      logs,
      logPath: logPath(),
    });
    expect(await slow.done).toMatchObject({ outcome: 'timed-out', signal: 'SIGTERM' });
  });

  it('stores its output up to the cap, with credential values replaced even when split between writes', async () => {
    const secret = 'tok-3f9a1c77e2';
    const path = logPath();
    const r = await new HookProcess({
      argv: [
        '/bin/sh',
        '-c',
        // Two writes with a pause between: the value reaches the coordinator in two chunks.
        `printf 'before tok-3f9a'; /bin/sleep 0.2; printf '1c77e2 after\\n'; echo "$TOKEN" >&2`,
      ],
      env: { PATH: HOOK_PATH, TOKEN: secret },
      timeoutMs: 60_000,
      logs,
      logPath: path,
      secrets: [secret],
    }).done;
    expect(r.outcome).toBe('exited');
    const out = logs.read(path).toString();
    expect(out).toBe('before [redacted] after\n[redacted]\n');
    expect(r.logBytes).toBe(Buffer.byteLength(out));

    const capped = logPath();
    const big = await new HookProcess({
      argv: ['/bin/sh', '-c', 'i=0; while [ $i -lt 200 ]; do echo 0123456789; i=$((i+1)); done'],
      env: { PATH: HOOK_PATH },
      timeoutMs: 60_000,
      logs,
      logPath: capped,
      maxLogBytes: 100,
    }).done;
    expect(big).toMatchObject({ outcome: 'exited', exitCode: 0, logBytes: 100, truncated: true });
    expect(logs.read(capped).length).toBe(100);
  });

  it('says which program could not start, and what PATH it was looked up in', async () => {
    const r = await new HookProcess({
      argv: ['no-such-hook-program', '--flag'],
      env: { PATH: HOOK_PATH },
      timeoutMs: 60_000,
      logs,
      logPath: logPath(),
    }).done;
    expect(r.outcome).toBe('spawn-error');
    expect(r.error).toBe(`no-such-hook-program not found (hooks run with PATH=${HOOK_PATH})`);
  });

  it('is killed at once by a stop that is not graceful', async () => {
    const proc = new HookProcess({
      argv: ['/bin/sh', '-c', "trap '' TERM; echo up; /bin/sleep 1000"],
      env: { PATH: HOOK_PATH },
      timeoutMs: 60_000,
      killGraceMs: 60_000,
      logs,
      logPath: logPath(),
    });
    proc.stop(false);
    expect(await proc.done).toMatchObject({ outcome: 'stopped', signal: 'SIGKILL' });
  });
});
