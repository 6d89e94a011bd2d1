/**
 * The sandbox for code eka-ci does not trust: a repository's Nix expressions evaluated on the coordinator, and its
 * checks run on agents. Both sides describe what the code may see with one `SandboxSpec` and run the command this
 * module returns; nothing else in eka-ci builds bubblewrap or sandbox-exec command lines.
 *
 * What a sandboxed command gets, whatever the spec says:
 * - a file system of its own: the system's programs and libraries (`/usr`, `/bin`, `/lib*`) and the Nix store,
 *   read-only; the spec's mounts; a private, empty, writable `/tmp`; its own `/dev` and `/proc`; no `/home`, no
 *   `/etc` beyond what the spec mounts (and, with network, name resolution and certificates);
 * - no network unless `network` (Linux: a network namespace of its own, where even loopback is another host's);
 * - exactly `env`: the caller's environment never passes through;
 * - new PID, IPC, UTS and cgroup namespaces and no capabilities, so it can neither see nor signal host processes;
 * - death with its parent: killing the returned command's process ends everything inside;
 * - memory and process-count limits, when the caller made it cgroups (cgroup.ts) and names them in the spec.
 *
 * Linux uses bubblewrap (`bwrap`), which also works unprivileged where user namespaces are allowed. macOS uses
 * `sandbox-exec` with a generated profile of the same intent; see darwin-profile.ts for what is not tested there.
 */
import { spawn } from 'node:child_process';
import { SandboxError } from '../errors.js';
import { PLATFORM } from '../platform.js';
import { descendants, signalGroup } from '../process-tree.js';
import { bubblewrapArgs } from './bubblewrap.js';
import { darwinProfile } from './darwin-profile.js';
import type { SandboxSpec, SandboxedCommand } from './spec.js';

export type { SandboxMount, SandboxSpec, SandboxedCommand } from './spec.js';

// Wrappers run from the sandbox's own PATH, not the caller's.
const WRAPPER_PATH = '/usr/local/bin:/usr/bin:/bin:/run/current-system/sw/bin';

/** `command args` wrapped so that it runs as `spec` allows and no further. */
export function sandboxCommand(command: string, args: readonly string[], spec: SandboxSpec): SandboxedCommand {
  const wrapperEnv = { PATH: process.env.PATH ?? WRAPPER_PATH };
  if (PLATFORM === 'linux') {
    const bwrap = ['bwrap', ...bubblewrapArgs(spec), '--', command, ...args];
    const cgroups = spec.cgroupProcs ?? [];
    if (cgroups.length === 0) return { file: 'bwrap', args: bwrap.slice(1), env: wrapperEnv };
    return { file: '/bin/sh', args: ['-c', joinCgroups(cgroups), 'sh', ...bwrap], env: wrapperEnv };
  }
  // sandbox-exec passes its own environment to the command: the spec's is the wrapper's.
  return {
    file: '/usr/bin/sandbox-exec',
    args: ['-p', darwinProfile(spec), '/usr/bin/env', '-i', ...envArgs(spec.env), command, ...args],
    env: { ...spec.env },
  };
}

/**
 * A shell script that moves itself into the cgroups and execs its arguments (bubblewrap): the pid written is the
 * shell's, which exec hands to bubblewrap, so no process of the sandbox ever runs outside them. A cgroup it cannot
 * join (removed meanwhile) is said on the sandbox's output, and the sandbox runs without that limit: a sandbox never
 * fails for want of limits.
 */
function joinCgroups(procsFiles: readonly string[]): string {
  const join = procsFiles.map((f) => `echo $$ > ${shellQuote(f)}`).join(' && ');
  const warn = "echo 'eka-ci: cannot join the cgroups of the sandbox: it runs without their limits' >&2";
  return `${join} || ${warn}; exec "$@"`;
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, "'\\''")}'`;
}

/**
 * SIGTERM to the sandboxed command and everything it started, given the pid of the process spawned from
 * `sandboxCommand` — but not to the sandbox itself. On Linux that process is bubblewrap, whose child is the PID
 * namespace's init: a SIGTERM to either would end the namespace at once (SIGKILL to everything inside), leaving the
 * command no grace. sandbox-exec execs the command, so on macOS the pid is the command's and its group is signalled.
 */
export function terminateSandboxed(pid: number): void {
  if (PLATFORM === 'darwin') {
    signalGroup(pid, 'SIGTERM');
    return;
  }
  for (const p of descendants(pid)) if (p.ppid !== pid) signal(p.pid, 'SIGTERM');
}

/**
 * SIGKILL to everything inside the sandbox started as `pid`. On Linux the namespace's init dies, the kernel kills
 * every process of the namespace (orphans and daemons included: they all live there) and bubblewrap, left without
 * a child, exits and is reaped by the caller: killing bubblewrap itself instead would orphan its init to a host
 * init that may never reap it. Before the namespace exists, bubblewrap itself is killed. On macOS the command's
 * group and every descendant get SIGKILL (untested; a process that left both escapes, see darwin-profile.ts).
 */
export function killSandboxed(pid: number): void {
  const inside = descendants(pid);
  if (PLATFORM === 'darwin') {
    signalGroup(pid, 'SIGKILL');
    signal(pid, 'SIGKILL');
  } else if (inside.length === 0) {
    signal(pid, 'SIGKILL');
  }
  for (const p of inside) signal(p.pid, 'SIGKILL');
}

function signal(pid: number, name: NodeJS.Signals): void {
  try {
    process.kill(pid, name);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

function envArgs(env: Readonly<Record<string, string>>): string[] {
  return Object.entries(env).map(([k, v]) => `${k}=${v}`);
}

let available: Promise<void> | undefined;

/**
 * Resolves when a sandbox can start here, rejects with a SandboxError naming the fix. Asked once per process: a
 * coordinator refuses to evaluate untrusted code rather than evaluate it unconfined.
 */
export function sandboxAvailable(): Promise<void> {
  available ??= probe();
  return available;
}

async function probe(): Promise<void> {
  const c = sandboxCommand('/bin/sh', ['-c', 'exit 0'], { mounts: [], network: false, env: {}, cwd: '/tmp' });
  const r = await new Promise<{ code: number | null; stderr: string; error?: Error }>((resolve) => {
    const child = spawn(c.file, c.args, { env: c.env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    child.on('error', (error) => resolve({ code: null, stderr, error }));
    child.on('close', (code) => resolve({ code, stderr }));
  });
  if (r.code === 0) return;
  const fix =
    PLATFORM === 'linux'
      ? 'install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; NixOS: the eka-ci module adds it) and make sure user namespaces are allowed (sysctl kernel.unprivileged_userns_clone=1)'
      : 'sandbox-exec ships with macOS; check that /usr/bin/sandbox-exec exists';
  const why = r.error ? r.error.message : r.stderr.trim() || `exit ${r.code}`;
  available = undefined;
  throw new SandboxError(`cannot start the sandbox for untrusted code (${c.file}: ${why}): ${fix}`);
}
