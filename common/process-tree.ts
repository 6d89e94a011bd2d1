import { readdirSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { PLATFORM } from './platform.js';

export interface ProcessInfo {
  pid: number;
  ppid: number;
  pgid: number;
}

/**
 * The process groups of every descendant of `rootPid`. Nix starts each builder in a session of its own, so killing
 * the `nix-store` group alone would orphan a builder that Nix had no chance to stop (after SIGKILL).
 */
export function descendantGroups(rootPid: number): number[] {
  const groups = new Set(descendants(rootPid).map((p) => p.pgid));
  groups.delete(rootPid);
  return [...groups];
}

/** Every process below `rootPid`, children before their own children. */
export function descendants(rootPid: number): ProcessInfo[] {
  const children = new Map<number, ProcessInfo[]>();
  for (const p of listProcesses()) {
    const siblings = children.get(p.ppid) ?? [];
    siblings.push(p);
    children.set(p.ppid, siblings);
  }
  const found: ProcessInfo[] = [];
  for (let i = -1; i < found.length; i++) {
    const pid = i < 0 ? rootPid : found[i]!.pid;
    found.push(...(children.get(pid) ?? []));
  }
  return found;
}

/** Signals a whole process group; a group that is already gone is not an error. */
export function signalGroup(pgid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pgid, signal);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

function listProcesses(): ProcessInfo[] {
  return PLATFORM === 'linux' ? fromProc() : fromPs();
}

function fromProc(): ProcessInfo[] {
  const result: ProcessInfo[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
    } catch {
      continue; // exited while we looked
    }
    // The command name (field 2) may contain spaces and parentheses; the fields after its last ')' are fixed.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    result.push({ pid: Number(entry), ppid: Number(fields[1]), pgid: Number(fields[2]) });
  }
  return result;
}

function fromPs(): ProcessInfo[] {
  const r = spawnSync('ps', ['-A', '-o', 'pid=,ppid=,pgid='], { encoding: 'utf8' });
  if (r.status !== 0) return [];
  return r.stdout
    .split('\n')
    .map((line) => line.trim().split(/\s+/).map(Number))
    .filter((f) => f.length === 3 && f.every(Number.isInteger))
    .map(([pid, ppid, pgid]) => ({ pid: pid ?? 0, ppid: ppid ?? 0, pgid: pgid ?? 0 }));
}
