import { PLATFORM } from '../platform.js';

export interface SandboxMount {
  /** A host path. */
  source: string;
  /** Where it appears inside; the same path by default (store paths and drv paths must not change). */
  target?: string;
  /** Read-only unless set. */
  writable?: boolean;
  /** A missing source is skipped instead of failing the start. */
  optional?: boolean;
}

export interface SandboxSpec {
  mounts: readonly SandboxMount[];
  network: boolean;
  /** The whole environment inside. */
  env: Readonly<Record<string, string>>;
  /** Working directory inside (a mount target, or /tmp). */
  cwd: string;
  /**
   * A new terminal session, so the command cannot push input into the caller's terminal (TIOCSTI). Off only for a
   * command given a terminal of its own (a check under node-pty), which needs to be its session leader.
   */
  newSession?: boolean;
  /**
   * Linux: the `cgroup.procs` files of the cgroups the sandbox runs in (SandboxCgroup.procsFiles), joined before it
   * starts anything, so that its limits hold from its first fork.
   */
  cgroupProcs?: readonly string[];
}

export interface SandboxedCommand {
  /** The program to spawn. */
  file: string;
  args: string[];
  /** The environment to spawn it with (the wrapper's; the command inside gets `spec.env`). */
  env: Record<string, string>;
}

/** Host paths every sandboxed program needs to run at all: programs, libraries, and the Nix store. */
export const SYSTEM_PATHS: readonly string[] =
  PLATFORM === 'linux'
    ? ['/usr', '/bin', '/sbin', '/lib', '/lib32', '/lib64', '/nix/store', '/run/current-system/sw']
    : ['/usr', '/bin', '/sbin', '/System', '/Library', '/nix/store', '/private/var/db/dyld', '/dev'];

/**
 * With network, name resolution and TLS need these (NixOS keeps them as links into `/etc/static`). Without network
 * they are not mounted: there is nothing to resolve.
 */
export const NETWORK_PATHS: readonly string[] = [
  '/etc/resolv.conf',
  '/etc/hosts',
  '/etc/nsswitch.conf',
  '/etc/ssl',
  '/etc/pki',
  '/etc/static',
];
