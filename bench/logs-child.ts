/**
 * A child process of bench/logs driven over IPC: commands go out, reports come back into an inbox that `next`
 * takes from. `stop` ends it and every process below it (its nix-daemon, the builder), by process id.
 */
import { type ChildProcess, fork } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { descendants } from '../common/process-tree.js';

// How long a child gets to stop by itself before it and what it started are killed.
const STOP_GRACE_MS = 10_000;
// How often the processes below a child are noted: a nix-daemon whose agent died is a child of init, and only a
// note taken before that still says it was ours.
const TRACK_MS = 2_000;

export class Child<Command, Report extends { type: string }> {
  private readonly process: ChildProcess;
  private readonly inbox: Report[] = [];
  private waiters = new Set<() => void>();
  private exited = false;
  private exitNote = '';
  /** Processes seen below the child: pid → start time (so that a reused pid is never killed). */
  private readonly below = new Map<number, string>();
  private readonly tracker: NodeJS.Timeout;

  constructor(
    private readonly name: string,
    file: string,
    env: NodeJS.ProcessEnv = process.env,
  ) {
    this.process = fork(file, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env });
    this.process.on('message', (m: Report) => {
      this.inbox.push(m);
      this.wake();
    });
    this.process.on('exit', (code, signal) => {
      this.exited = true;
      this.exitNote = `${this.name} exited (${code ?? signal})`;
      this.wake();
    });
    this.tracker = setInterval(() => this.track(), TRACK_MS);
    this.tracker.unref();
  }

  get pid(): number | undefined {
    return this.process.pid;
  }

  /** Sends a command; one to a child that has gone is dropped (its absence shows in `next`). */
  send(command: Command): void {
    if (this.process.connected) this.process.send(command as object, undefined, {}, () => undefined);
  }

  /** The next report of this type; a `failed` report, the child's exit or the deadline (ms since 1970) throws. */
  async next<T extends Report['type']>(type: T, deadline: number): Promise<Extract<Report, { type: T }>> {
    for (;;) {
      const i = this.inbox.findIndex((m) => m.type === type);
      if (i >= 0) return this.inbox.splice(i, 1)[0] as Extract<Report, { type: T }>;
      const failure = this.inbox.find((m) => m.type === 'failed') as { error?: string } | undefined;
      if (failure) throw new Error(`${this.name}: ${failure.error ?? 'failed'}`);
      if (this.exited) throw new Error(`${this.exitNote} while waiting for "${type}"`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${this.name}: no "${type}" in time`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiters.add(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** Waits up to STOP_GRACE_MS for the child to exit, then kills what is left of it and its descendants. */
  async stop(): Promise<void> {
    this.track();
    const until = Date.now() + STOP_GRACE_MS;
    while (!this.exited && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 50));
    clearInterval(this.tracker);
    this.track();
    const pid = this.process.pid;
    if (!this.exited && pid !== undefined) this.process.kill('SIGKILL');
    for (const [p, started] of this.below) {
      if (startTime(p) !== started) continue;
      try {
        process.kill(p, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }

  private track(): void {
    const pid = this.process.pid;
    if (pid === undefined || this.exited) return;
    for (const { pid: p } of descendants(pid)) {
      const started = startTime(p);
      if (started !== undefined) this.below.set(p, started);
    }
  }

  private wake(): void {
    const waiters = this.waiters;
    this.waiters = new Set();
    for (const wake of waiters) wake();
  }
}

/** A process's start time (field 22 of /proc/PID/stat), undefined once it is gone. */
function startTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}
