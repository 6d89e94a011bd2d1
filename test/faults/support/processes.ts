import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { freePort } from '../../support/ports.js';

/** The suite needs fixed ports, so that a restarted coordinator keeps them. */
export { freePort };

/**
 * Processes of the fault-injection suite: what they printed, how to wait for something they say, and how to end
 * every process a namespace holds (Nix runs builders in sessions of their own, so a process group is not enough).
 */

export const REPO = join(import.meta.dirname, '..', '..', '..');

export const isRoot = process.getuid?.() === 0;

/** Whether a command is on PATH. */
export function hasCommand(command: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Whether this machine can run the suite: root (namespaces, mounts) and `unshare`. */
export function canInjectFaults(): boolean {
  return isRoot && hasCommand('unshare');
}

/** Whether network partitions can be made here: network namespaces and veth pairs need `ip` and `nsenter`. */
export function canPartition(): boolean {
  return canInjectFaults() && hasCommand('ip') && hasCommand('nsenter');
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * `dist/…` as `npm run build` leaves it, or under EKACI_FAULTS_DIST (a copy with a fault planted, to watch a test
 * fail). Another build may be replacing dist/ at this moment (`rm -rf dist && tsc`): wait for the file instead of
 * failing on a window of a few seconds.
 */
export async function distFile(...parts: string[]): Promise<string> {
  const file = join(process.env.EKACI_FAULTS_DIST ?? join(REPO, 'dist'), ...parts);
  for (let i = 0; i < 600 && !existsSync(file); i++) await sleep(100);
  if (!existsSync(file)) throw new Error(`${file} is missing: run npm run build first`);
  return file;
}

/** One JSON log line of pino, or the raw text for anything else. */
export type LogLine = Record<string, unknown> & { msg?: string; raw: string };

/**
 * A child process whose stderr (pino JSON) is kept line by line, with waiters for lines and for its exit. The
 * process leads its own process group.
 */
export class Watched {
  readonly lines: LogLine[] = [];
  readonly child: ChildProcess;
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private partial = '';
  private waiters: Array<() => void> = [];

  constructor(
    readonly name: string,
    command: string,
    args: string[],
    env: NodeJS.ProcessEnv,
  ) {
    this.child = spawn(command, args, { cwd: REPO, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const onData = (b: Buffer): void => {
      const text = this.partial + b.toString('utf8');
      const parts = text.split('\n');
      this.partial = parts.pop() ?? '';
      for (const raw of parts) this.lines.push(parseLine(raw));
      this.notify();
    };
    this.child.stdout?.on('data', onData);
    this.child.stderr?.on('data', onData);
    this.exited = new Promise((resolve) =>
      this.child.once('exit', (code, signal) => {
        this.notify();
        resolve({ code, signal });
      }),
    );
  }

  get pid(): number {
    if (this.child.pid === undefined) throw new Error(`${this.name} did not start`);
    return this.child.pid;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** The last lines it printed, for failure messages. */
  tail(n = 30): string {
    return this.lines
      .slice(-n)
      .map((l) => l.raw)
      .join('\n');
  }

  /**
   * Waits for a line matching `pick` (from index `from`); throws if the process exits first. The deadline only
   * guards against a hang, with a message naming what never came.
   */
  async waitForLine(what: string, pick: (l: LogLine) => boolean, from = 0, deadlineMs = 120_000): Promise<LogLine> {
    const deadline = Date.now() + deadlineMs;
    for (;;) {
      const found = this.lines.slice(from).find(pick);
      if (found) return found;
      if (!this.running) throw new Error(`${this.name} exited before ${what}:\n${this.tail()}`);
      if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}; ${this.name} said:\n${this.tail()}`);
      await new Promise<void>((r) => {
        const timer = setTimeout(r, 1_000);
        this.waiters.push(() => {
          clearTimeout(timer);
          r();
        });
      });
    }
  }

  /** SIGKILL to the process group (and so to nothing outside it). */
  killGroup(signal: NodeJS.Signals = 'SIGKILL'): void {
    try {
      process.kill(-this.pid, signal);
    } catch {
      // gone already
    }
  }

  signal(signal: NodeJS.Signals): void {
    try {
      process.kill(this.pid, signal);
    } catch {
      // gone already
    }
  }

  /** Resolves the exit, or undefined if it still runs after `ms` (used to decide on a second signal, never asserted). */
  exitWithin(ms: number): Promise<{ code: number | null; signal: NodeJS.Signals | null } | undefined> {
    let timer: NodeJS.Timeout | undefined;
    return Promise.race([
      this.exited.finally(() => clearTimeout(timer)),
      new Promise<undefined>((resolve) => (timer = setTimeout(() => resolve(undefined), ms))),
    ]);
  }

  private notify(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const r of w) r();
  }
}

function parseLine(raw: string): LogLine {
  if (raw.startsWith('{')) {
    try {
      return { ...(JSON.parse(raw) as Record<string, unknown>), raw };
    } catch {
      // not JSON after all
    }
  }
  return { raw };
}

/** The mount namespace of a process (`mnt:[4026…]`), or undefined once it is gone. */
export function mountNamespaceOf(pid: number): string | undefined {
  try {
    return readlinkSync(`/proc/${pid}/ns/mnt`);
  } catch {
    return undefined;
  }
}

interface ProcessTable {
  parents: Map<number, number>;
  namespaces: Map<number, string>;
}

function processTable(): ProcessTable {
  const parents = new Map<number, number>();
  const namespaces = new Map<number, string>();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    const pid = Number(entry);
    try {
      const ppid = /^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
      const ns = mountNamespaceOf(pid);
      if (ppid === undefined || ns === undefined) continue;
      parents.set(pid, Number(ppid));
      namespaces.set(pid, ns);
    } catch {
      // gone meanwhile
    }
  }
  return { parents, namespaces };
}

/**
 * The processes of a host the suite started (an agent, a coordinator on a tmpfs): the descendants of `roots`, and
 * everything in the mount namespaces they are in. Nix's daemon runs in a mount namespace of its own below the
 * agent's, and its builders lead sessions of their own, which outlive their parents: neither a process group nor
 * one namespace covers them. `namespaces` accumulates what was seen, so that orphans are found after their parents
 * died. Only processes whose mounts name `marker` (the host's directory, mounted in its namespace) are taken: a
 * recycled pid or namespace number never makes the suite touch a process of someone else.
 */
export function hostProcesses(roots: readonly number[], namespaces: Set<string>, marker: string): number[] {
  const table = processTable();
  const children = new Map<number, number[]>();
  for (const [pid, ppid] of table.parents) children.set(ppid, [...(children.get(ppid) ?? []), pid]);
  const found = new Set<number>();
  const todo = roots.filter((r) => table.parents.has(r));
  while (todo.length > 0) {
    const pid = todo.pop()!;
    if (found.has(pid)) continue;
    found.add(pid);
    todo.push(...(children.get(pid) ?? []));
  }
  for (const [pid, ns] of table.namespaces) if (namespaces.has(ns)) found.add(pid);
  const ours = [...found].filter((pid) => pid !== process.pid && mounts(pid).includes(marker));
  for (const pid of ours) namespaces.add(table.namespaces.get(pid)!);
  return ours;
}

function mounts(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/mountinfo`, 'utf8');
  } catch {
    return '';
  }
}

/** SIGKILL to every process of a host (see hostProcesses); twice, for what forked meanwhile. */
export function killHost(roots: readonly number[], namespaces: Set<string>, marker: string): void {
  for (let round = 0; round < 2; round++) {
    for (const pid of hostProcesses(roots, namespaces, marker)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone already
      }
    }
  }
}

/** Whether a process exists (and is not a zombie). */
export function alive(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/^\d+ \(.*\) Z /.test(stat);
  } catch {
    return false;
  }
}

/** The parent of a process, from /proc. */
export function parentOf(pid: number): number {
  const m = /^PPid:\s+(\d+)$/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no parent for ${pid}`);
  return Number(m[1]);
}

/** Polls `ok` until it holds; a deadline only guards against a hang, with a message saying what never happened. */
export async function until(what: string, ok: () => boolean | Promise<boolean>, deadlineMs = 120_000): Promise<void> {
  const deadline = Date.now() + deadlineMs;
  while (!(await ok())) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}`);
    await sleep(100);
  }
}
