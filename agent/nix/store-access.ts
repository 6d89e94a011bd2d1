import { userInfo } from 'node:os';
import { ConfigError } from '../../common/errors.js';
import { runNix } from '../../common/nix/cli.js';
import { HOST_DAEMON_SOCKET, daemonAnswers } from '../../common/nix/daemon-client.js';
import { LVL_DEBUG } from '../../common/nix/worker-protocol.js';
import type { StoreAccess, StorePool } from './store-pool.js';

export { HOST_DAEMON_SOCKET };

/**
 * How this agent reaches its store. `auto`: `NIX_REMOTE=daemon` (or `unix://PATH`), or a daemon answering on the
 * host's socket, means the host's daemon (a multi-user host: the agent needs no root and no write access to /nix);
 * otherwise the agent runs a `nix-daemon --stdio` of its own on a single-user store it owns.
 */
export async function detectStoreAccess(
  choice: 'auto' | 'daemon' | 'local',
  socket: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<StoreAccess> {
  const remote = env.NIX_REMOTE ?? '';
  const fromEnv = remote.startsWith('unix://') ? remote.slice('unix://'.length) : undefined;
  if (choice === 'local') return { kind: 'own-daemon' };
  if (choice === 'daemon') return { kind: 'host-daemon', socket: fromEnv ?? socket };
  if (remote === 'daemon' || fromEnv !== undefined) return { kind: 'host-daemon', socket: fromEnv ?? socket };
  if (remote === 'local' || remote.startsWith('local?')) return { kind: 'own-daemon' };
  return (await daemonAnswers(socket)) ? { kind: 'host-daemon', socket } : { kind: 'own-daemon' };
}

/** The host settings an untrusted user of the daemon depends on, as `nix show-config` prints them. */
export interface HostNixSettings {
  substituters: string[];
  trustedSubstituters: string[];
  trustedPublicKeys: string[];
}

/**
 * Whether the host's daemon will substitute from the coordinator's cache for this agent. A user in
 * `trusted-users` sets substituters and keys per build (the agent does); any other user's settings are ignored by
 * the daemon, which then has to know the cache from its own configuration. Throws a ConfigError naming the
 * settings and the fix when it cannot work, so the agent stops at start-up instead of failing every build.
 */
export async function checkCacheTrust(pool: StorePool, cacheUrl: string, publicKey: string): Promise<void> {
  if (pool.access.kind !== 'host-daemon' || cacheUrl === '') return;
  const conn = await pool.acquire();
  let ignored: readonly string[];
  try {
    // At debug level: that is where a daemon says it ignores a restricted setting of an untrusted user.
    await conn.setOptions({
      verbosity: LVL_DEBUG,
      overrides: { substituters: cacheUrl, 'trusted-public-keys': publicKey },
    });
    ignored = conn.ignored;
  } finally {
    pool.release(conn);
  }
  if (ignored.length === 0) return;
  const host = await hostSettings();
  const problems = cacheProblems(host, cacheUrl, publicKey);
  if (problems.length === 0) return;
  const user = userInfo().username;
  throw new ConfigError(
    `the host's nix-daemon ignores this agent's settings (user ${user} is not in trusted-users) and does not know ` +
      `the coordinator's cache itself: ${problems.join('; ')}. Either add ${user} to trusted-users in ` +
      `/etc/nix/nix.conf, or set there:\n  extra-substituters = ${cacheUrl}\n  extra-trusted-public-keys = ${publicKey}\n` +
      '(the eka-ci NixOS and nix-darwin modules do this), then restart nix-daemon.',
  );
}

/** What is missing from the host's configuration for an untrusted user; [] when nothing is. */
export function cacheProblems(host: HostNixSettings, cacheUrl: string, publicKey: string): string[] {
  const normalise = (u: string): string => u.replace(/\/+$/, '');
  const known = [...host.substituters, ...host.trustedSubstituters].map(normalise);
  const problems: string[] = [];
  if (!known.includes(normalise(cacheUrl))) {
    problems.push(`${cacheUrl} is in neither substituters nor trusted-substituters`);
  }
  if (!host.trustedPublicKeys.includes(publicKey)) problems.push(`its key is not in trusted-public-keys`);
  return problems;
}

async function hostSettings(): Promise<HostNixSettings> {
  // Read as configured: show-config contacts no substituter, so none is overridden here.
  const r = await runNix('nix', ['show-config', '--json', '--extra-experimental-features', 'nix-command']);
  const raw = r.code === 0 ? (JSON.parse(r.stdout) as Record<string, { value?: unknown } | undefined>) : {};
  const list = (key: string): string[] => {
    const v = raw[key]?.value;
    return Array.isArray(v) ? v.filter((x): x is string => typeof x === 'string') : [];
  };
  return {
    substituters: list('substituters'),
    trustedSubstituters: list('trusted-substituters'),
    trustedPublicKeys: list('trusted-public-keys'),
  };
}
