import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { DEFAULT_SANDBOX_PATHS } from '../../agent/options.js';
import { tempDir } from './nix-project.js';

/**
 * A builder host of the shape NixOS, macOS and the upstream installer give: a multi-user store owned by root, a
 * real `nix-daemon` running as root with Nix's sandbox on and `nixbld` build users, and the eka-ci agent as an
 * unprivileged user talking to the daemon's socket. All in a private mount namespace whose `/nix` is an empty
 * directory of the test's, so the machine's store is never touched (the recipe of ENVIRONMENT.md). Needs root.
 */
export interface MultiUserHostOptions {
  coordinator: string;
  token: string;
  /** The agent's user; created when missing. */
  user?: string;
  /** Extra nix.conf lines of the host (trusted-users, extra-substituters, …). */
  nixConf?: string;
  agentArgs?: string[];
}

export interface MultiUserHost {
  process: ChildProcess;
  /** The host's nix.conf directory (the daemon and the agent read it). */
  confDir: string;
  /** Everything the host's shell, daemon and agent wrote to stderr. */
  output(): string;
  stop(): void;
}

export const AGENT_USER = 'ekaci-agent-test';

const REPO = join(import.meta.dirname, '..', '..');

/** Creates the agent's user if it does not exist; returns its uid and gid. */
export function ensureUser(name: string): { uid: number; gid: number } {
  try {
    execFileSync('id', ['-u', name], { stdio: 'ignore' });
  } catch {
    execFileSync('useradd', ['--system', '--no-create-home', '--shell', '/usr/sbin/nologin', name]);
  }
  const uid = Number(execFileSync('id', ['-u', name], { encoding: 'utf8' }).trim());
  const gid = Number(execFileSync('id', ['-g', name], { encoding: 'utf8' }).trim());
  return { uid, gid };
}

export function startMultiUserHost(o: MultiUserHostOptions): MultiUserHost {
  const user = o.user ?? AGENT_USER;
  const { uid, gid } = ensureUser(user);
  const dir = tempDir('ekaci-multi-user-');
  const nix = join(dir, 'nix');
  const confDir = join(dir, 'etc-nix');
  const agentDir = join(dir, 'agent');
  for (const d of [nix, confDir, agentDir]) mkdirSync(d, { recursive: true });
  // The agent's user reaches its own directory and reads the host's nix.conf, as on a real host.
  chmodSync(dir, 0o755);
  chownSync(agentDir, uid, gid);
  writeFileSync(
    join(confDir, 'nix.conf'),
    [
      'sandbox = true',
      'build-users-group = nixbld',
      'substituters =',
      `sandbox-paths = ${DEFAULT_SANDBOX_PATHS.join(' ')}`,
      o.nixConf ?? '',
    ].join('\n'),
  );
  // The built agent, as a package installs it (`npm test` builds it first): the unprivileged user runs plain
  // JavaScript, no TypeScript loader.
  const main = join(REPO, 'dist', 'agent', 'main.js');
  if (!existsSync(main)) throw new Error(`${main} is missing: run npm run build first`);
  const agent = [
    process.execPath,
    main,
    '--coordinator',
    o.coordinator,
    '--spool-dir',
    join(agentDir, 'spool'),
    '--exit-with-parent',
    ...(o.agentArgs ?? []),
  ];
  // As root in the namespace: a store owned by root, the daemon, then the agent as `user`. The shell waits for the
  // agent; the daemon goes with the namespace's processes when the test kills the group.
  const script = `set -e
mount --bind "$NIX_DIR" /nix
mkdir -p /nix/store /nix/var/nix/daemon-socket
chgrp nixbld /nix/store
chmod 1775 /nix/store
nix-daemon \${NIX_DAEMON_FLAGS:-} &
for i in $(seq 1 200); do [ -S /nix/var/nix/daemon-socket/socket ] && break; sleep 0.05; done
cd "$AGENT_DIR"
exec setpriv --reuid=${uid} --regid=${gid} --init-groups --reset-env -- env \\
  PATH="$PATH" HOME="$AGENT_DIR" NIX_CONF_DIR="$NIX_CONF_DIR" NIX_REMOTE=daemon \\
  EKACI_AGENT_TOKEN="$EKACI_AGENT_TOKEN" EKACI_LOG_LEVEL="\${EKACI_LOG_LEVEL:-warn}" XDG_CACHE_HOME="$AGENT_DIR/cache" \\
  "$@"`;
  let output = '';
  const child = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, 'sh', ...agent], {
    cwd: REPO,
    env: {
      PATH: process.env.PATH,
      NIX_DIR: nix,
      NIX_CONF_DIR: confDir,
      AGENT_DIR: agentDir,
      EKACI_AGENT_TOKEN: o.token,
      ...(process.env.NIX_DAEMON_FLAGS ? { NIX_DAEMON_FLAGS: process.env.NIX_DAEMON_FLAGS } : {}),
      ...(process.env.EKACI_LOG_LEVEL ? { EKACI_LOG_LEVEL: process.env.EKACI_LOG_LEVEL } : {}),
    },
    stdio: ['ignore', 'ignore', 'pipe'],
    detached: true,
  });
  child.stderr?.setEncoding('utf8').on('data', (s: string) => (output += s));
  return {
    process: child,
    confDir,
    output: () => output,
    stop: () => {
      if (child.pid === undefined) return;
      try {
        process.kill(-child.pid, 'SIGKILL');
      } catch {
        // gone already
      }
      // The daemon and its builders were started in the namespace's process group too.
    },
  };
}
