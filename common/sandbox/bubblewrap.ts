import { NETWORK_PATHS, SYSTEM_PATHS, type SandboxSpec } from './spec.js';

/**
 * bubblewrap's options for a spec (everything before `--`). Order matters to bwrap: a mount inside another must
 * come after it, so system paths go first, then the spec's mounts in the order given.
 */
export function bubblewrapArgs(spec: SandboxSpec): string[] {
  const args = [
    // user, IPC, PID, network, UTS and cgroup namespaces of its own
    '--unshare-all',
    ...(spec.network ? ['--share-net'] : []),
    '--die-with-parent',
    // Root in the sandbox (CI runs as root) must not keep the capabilities that would let it undo the mounts.
    '--cap-drop',
    'ALL',
    ...(spec.newSession === false ? [] : ['--new-session']),
    '--proc',
    '/proc',
    '--dev',
    '/dev',
    '--tmpfs',
    '/tmp',
  ];
  for (const path of SYSTEM_PATHS) args.push('--ro-bind-try', path, path);
  if (spec.network) for (const path of NETWORK_PATHS) args.push('--ro-bind-try', path, path);
  for (const m of spec.mounts) {
    const verb = m.writable ? '--bind' : '--ro-bind';
    args.push(m.optional ? `${verb}-try` : verb, m.source, m.target ?? m.source);
  }
  args.push('--clearenv');
  for (const [name, value] of Object.entries(spec.env)) args.push('--setenv', name, value);
  args.push('--chdir', spec.cwd);
  return args;
}
