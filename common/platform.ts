import { readFileSync, readdirSync } from 'node:fs';
import { spawnSync } from 'node:child_process';

/**
 * The one place that asks which operating system eka-ci runs on. Everything Linux-only (`/proc`, bubblewrap,
 * `unshare`) branches on `PLATFORM`; the darwin side of each branch is small and lives beside it.
 */
export type Platform = 'linux' | 'darwin';

function detect(): Platform {
  if (process.platform === 'linux' || process.platform === 'darwin') return process.platform;
  throw new Error(`eka-ci runs on Linux and macOS, not on ${process.platform}`);
}

export const PLATFORM: Platform = detect();

/**
 * Resident memory in MiB of a process and all its descendants (0 when it is gone). A sandboxed command runs below
 * a wrapper (bubblewrap, sandbox-exec), so the process the caller started is rarely the one using the memory.
 */
export function processTreeRssMiB(rootPid: number): number {
  return PLATFORM === 'linux' ? linuxTreeRss(rootPid) : psTreeRss(rootPid);
}

function linuxTreeRss(rootPid: number): number {
  let kib = 0;
  const stack = [rootPid];
  for (let pid = stack.pop(); pid !== undefined; pid = stack.pop()) {
    try {
      const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      kib += m ? Number(m[1]) : 0;
      for (const task of readdirSync(`/proc/${pid}/task`)) {
        const children = readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8').trim();
        if (children !== '') stack.push(...children.split(/\s+/).map(Number));
      }
    } catch {
      // exited while we looked
    }
  }
  return kib / 1024;
}

function psTreeRss(rootPid: number): number {
  const r = spawnSync('ps', ['-A', '-o', 'pid=,ppid=,rss='], { encoding: 'utf8' });
  if (r.status !== 0) return 0;
  const rows = r.stdout
    .split('\n')
    .map((l) => l.trim().split(/\s+/).map(Number))
    .filter((f) => f.length === 3 && f.every(Number.isFinite));
  const children = new Map<number, number[]>();
  const rss = new Map<number, number>();
  for (const [pid = 0, ppid = 0, kib = 0] of rows) {
    rss.set(pid, kib);
    children.set(ppid, [...(children.get(ppid) ?? []), pid]);
  }
  let kib = 0;
  const stack = [rootPid];
  for (let pid = stack.pop(); pid !== undefined; pid = stack.pop()) {
    kib += rss.get(pid) ?? 0;
    stack.push(...(children.get(pid) ?? []));
  }
  return kib / 1024;
}
