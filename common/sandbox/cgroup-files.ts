/**
 * What the two cgroup layouts (cgroup-v1.ts, cgroup-v2.ts) share: the limits, one sandbox's cgroup, and the file
 * operations on it. See cgroup.ts for how a layout is chosen.
 */
import { randomBytes } from 'node:crypto';
import { readFile, readdir, rmdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';

/** What one sandbox may use; 0 is no limit. */
export interface CgroupLimits {
  memoryBytes: number;
  /** Processes and threads together: the kernel's `pids` controller counts both. */
  maxProcesses: number;
}

/** One sandbox's cgroup: a directory in v2, one per limited hierarchy in v1. */
export interface SandboxCgroup {
  readonly dirs: readonly string[];
  /** The `cgroup.procs` files the sandbox's first process joins before it starts anything (SandboxSpec.cgroupProcs). */
  readonly procsFiles: readonly string[];
  /** SIGKILL to everything in it; resolves once it is empty (or after KILL_TIMEOUT_MS). Never rejects. */
  kill(): Promise<void>;
  /** How often the kernel enforced the limits so far: processes killed for memory, forks refused. */
  events(): Promise<CgroupEvents>;
  /** Kills what is left and removes the directories; rejects when one cannot be removed. */
  remove(): Promise<void>;
}

export interface CgroupEvents {
  oomKills: number;
  forksRefused: number;
}

/** A layout that works on this host: it makes the cgroups. */
export interface CgroupLayout {
  readonly version: 'v1' | 'v2';
  /** A new cgroup with the limits written; `name` must be new in each hierarchy. */
  create(name: string): Promise<SandboxCgroup>;
  /** The directories below which it makes cgroups: this process's own in each hierarchy it uses. */
  readonly parents: readonly string[];
}

// Between rounds of emptying a cgroup: a killed process leaves its cgroup as soon as it is scheduled to die.
const KILL_POLL_MS = 10;
// A process in uninterruptible sleep (a hung network file system) cannot die at all; the check ends without
// waiting for it longer than this, and its cgroup stays behind (removal says so).
const KILL_TIMEOUT_MS = 5_000;
// rmdir fails with EBUSY while the kernel still accounts processes that are exiting.
const REMOVE_RETRY_MS = 20;
const REMOVE_TIMEOUT_MS = 2_000;

// A sandbox cgroup left behind by an agent that died mid-check (SIGKILL, a crash) is empty and stays so. One younger
// than this may be another agent's, made an instant ago and not yet joined by its sandbox: it is left alone.
const STALE_AGE_MS = 10 * 60_000;

/**
 * Removes the empty cgroups named `prefix…` directly below `parent` that are older than STALE_AGE_MS; answers how
 * many. A cgroup with a process in it cannot be removed (EBUSY), so no running sandbox is disturbed.
 */
export async function sweepStale(parent: string, prefix: string): Promise<number> {
  let removed = 0;
  const names = await readdir(parent).catch(() => []);
  for (const name of names.filter((n) => n.startsWith(prefix))) {
    const dir = join(parent, name);
    const made = await stat(dir).then(
      (s) => s.mtimeMs,
      () => Date.now(),
    );
    if (Date.now() - made < STALE_AGE_MS) continue;
    removed += await rmdir(dir).then(
      () => 1,
      () => 0,
    );
  }
  return removed;
}

/** Where the count of each event is: a file of `key value` lines and the key. */
export interface EventSources {
  oomKills: [file: string, key: string] | null;
  forksRefused: [file: string, key: string] | null;
}

export class CgroupDirs implements SandboxCgroup {
  readonly procsFiles: readonly string[];

  /**
   * `dirs[0]` is the one whose `cgroup.procs` lists the processes to kill; `killFile` is v2's `cgroup.kill`, which
   * kills a whole cgroup at once, racing no fork (null: a signal to every process listed, round after round).
   */
  constructor(
    readonly dirs: readonly string[],
    private readonly sources: EventSources,
    private readonly killFile: string | null,
  ) {
    this.procsFiles = dirs.map((d) => join(d, 'cgroup.procs'));
  }

  async kill(): Promise<void> {
    const deadline = Date.now() + KILL_TIMEOUT_MS;
    for (;;) {
      const pids = await this.pids();
      if (pids.length === 0 || Date.now() > deadline) return;
      if (!(await this.killAtOnce())) for (const pid of pids) sigkill(pid);
      await delay(KILL_POLL_MS);
    }
  }

  async events(): Promise<CgroupEvents> {
    return {
      oomKills: await readCounter(this.sources.oomKills),
      forksRefused: await readCounter(this.sources.forksRefused),
    };
  }

  async remove(): Promise<void> {
    await this.kill();
    for (const dir of this.dirs) await removeDir(dir);
  }

  /** Writes `cgroup.kill`; false where there is none (v1, Linux before 5.14). */
  private async killAtOnce(): Promise<boolean> {
    if (this.killFile === null) return false;
    try {
      await writeFile(this.killFile, '1');
      return true;
    } catch {
      return false;
    }
  }

  private async pids(): Promise<number[]> {
    const first = this.procsFiles[0];
    if (first === undefined) return [];
    const text = await readFile(first, 'utf8').catch(() => '');
    return text
      .split('\n')
      .filter((line) => line !== '')
      .map(Number);
  }
}

/** Removes an empty cgroup directory, waiting out EBUSY briefly; one already gone is fine. */
export async function removeDir(dir: string): Promise<void> {
  const deadline = Date.now() + REMOVE_TIMEOUT_MS;
  for (;;) {
    try {
      await rmdir(dir);
      return;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') return;
      if (code !== 'EBUSY' || Date.now() > deadline) throw err;
    }
    await delay(REMOVE_RETRY_MS);
  }
}

/** Writes a control file; a file this kernel lacks is skipped when `optional`. */
export async function writeControl(dir: string, file: string, value: string, optional = false): Promise<void> {
  try {
    await writeFile(join(dir, file), value);
  } catch (err) {
    if (optional && (err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw new Error(`cannot write ${value} to ${join(dir, file)}: ${(err as Error).message}`, { cause: err });
  }
}

/** A random suffix, so that no two sandboxes (of this agent or another one sharing a v1 hierarchy) meet. */
export function cgroupName(prefix: string, name: string): string {
  const safe = name.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 64);
  return `${prefix}${safe}-${randomBytes(4).toString('hex')}`;
}

async function readCounter(source: [string, string] | null): Promise<number> {
  if (source === null) return 0;
  const text = await readFile(source[0], 'utf8').catch(() => '');
  const line = text.split('\n').find((l) => l.startsWith(`${source[1]} `));
  return line === undefined ? 0 : Number(line.slice(source[1].length + 1)) || 0;
}

function sigkill(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // Gone already; or not ours to signal, which removal then reports.
  }
}

/** The controllers the limits need: none for a limit of 0. */
export function controllersFor(limits: CgroupLimits): ('memory' | 'pids')[] {
  return [
    ...(limits.memoryBytes > 0 ? ['memory' as const] : []),
    ...(limits.maxProcesses > 0 ? ['pids' as const] : []),
  ];
}
