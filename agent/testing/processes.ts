import type { ChildProcess } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';

/** Whether a process exists (signal 0 checks without disturbing it). */
export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/**
 * Whether a process exists and has not exited: a zombie (exited, waiting for its parent or init to reap it) does not
 * run. A sandbox's init orphaned by bubblewrap's exit is reaped by the host's init whenever that gets to it.
 */
export function running(pid: number): boolean {
  if (!alive(pid)) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3) !== 'Z';
  } catch {
    return false;
  }
}

/** The direct children of a process (of every one of its threads), from /proc. */
export function childrenOf(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`)
    .flatMap((t) => readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').split(' '))
    .filter((p) => p.trim() !== '')
    .map(Number);
}

/** The nix-daemon processes a process started (its store connections). */
export function daemonsOf(pid: number): number[] {
  return childrenOf(pid).filter((p) => {
    try {
      return readFileSync(`/proc/${p}/comm`, 'utf8').trim() === 'nix-daemon';
    } catch {
      return false;
    }
  });
}

/**
 * Ends a test's agent process at once with its direct children (its daemons run in process groups of their own and
 * would outlive a SIGKILLed agent); resolves once it has exited. Nothing happens for one that is gone already.
 */
export async function killAgentTree(agent: ChildProcess | null): Promise<void> {
  if (agent === null || agent.exitCode !== null || agent.signalCode !== null) return;
  for (const child of childrenOf(agent.pid as number)) process.kill(child, 'SIGKILL');
  const exited = new Promise((resolve) => agent.once('exit', resolve));
  agent.kill('SIGKILL');
  await exited;
}
