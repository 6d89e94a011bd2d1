import { randomBytes } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import type { Logger } from '../../common/logging.js';
import { NO_SUBSTITUTERS, nixErrorText, runNix } from '../../common/nix/cli.js';
import { PLATFORM } from '../../common/platform.js';
import type { StorePool } from './store-pool.js';

/**
 * Whether this agent's builds run inside Nix's sandbox — measured, not read from a setting: the agent builds a tiny
 * derivation that looks for the store's own database (`/nix/var/nix/db`), which every build outside the sandbox can
 * see and no build inside it can. The coordinator gives code from untrusted pull requests only to sandboxed agents
 * (ARCHITECTURE.md §7). Any failure counts as unsandboxed, and says why.
 *
 * macOS: Nix's darwin sandbox is a sandbox-exec profile that may let builds read `/nix/var`, so there the agent
 * trusts `nix show-config`'s `sandbox` instead (untested: CI has no macOS).
 */
export async function probeSandbox(
  pool: StorePool,
  system: string,
  logger: Logger,
): Promise<{ sandboxed: boolean; reason: string }> {
  try {
    return PLATFORM === 'darwin' ? await fromConfig() : await fromBuild(pool, system);
  } catch (err) {
    const reason = `the sandbox probe failed: ${err instanceof Error ? err.message : String(err)}`;
    logger.warn({ reason }, 'counting this agent as unsandboxed');
    return { sandboxed: false, reason };
  }
}

async function fromBuild(pool: StorePool, system: string): Promise<{ sandboxed: boolean; reason: string }> {
  // A fresh name each start: an output left by an earlier probe would answer for an older configuration.
  const expr = `derivation {
    name = "ekaci-sandbox-probe";
    system = ${JSON.stringify(system)};
    builder = "/bin/sh";
    args = [ "-c" "if [ -e /nix/var/nix/db ]; then echo host > $out; else echo sandbox > $out; fi" ];
    nonce = "${randomBytes(8).toString('hex')}";
    preferLocalBuild = true;
  }`;
  const instantiated = await runNix('nix-instantiate', [...NO_SUBSTITUTERS, '--expr', expr]);
  if (instantiated.code !== 0) throw new Error(nixErrorText(instantiated.stderr));
  const drv = instantiated.stdout.trim().split('\n').pop() ?? '';
  const conn = await pool.acquire();
  let log = '';
  try {
    // Nothing to substitute: a fresh name no cache has, and reaching for one would only wait on the network. Not by
    // emptying `substituters`: a daemon keeps a connection's settings, and for an untrusted user it only ever
    // narrows them, so the builds that reuse this connection could not get the coordinator's cache back.
    await conn.setOptions({ useSubstitutes: false, overrides: { builders: '' } });
    const built = await conn.buildPaths([`${drv}!out`], (line) => (log += `${line}\n`));
    if (!built.ok) throw new Error(`${built.message} ${log.trim()}`.trim());
  } finally {
    pool.release(conn);
  }
  const out = await runNix('nix-store', [...NO_SUBSTITUTERS, '--query', '--outputs', drv]);
  const answer = (await readFile(out.stdout.trim(), 'utf8')).trim();
  return answer === 'sandbox'
    ? { sandboxed: true, reason: "builds cannot see the host's store database" }
    : { sandboxed: false, reason: "builds see the host's file system: Nix's sandbox is off (sandbox = false)" };
}

async function fromConfig(): Promise<{ sandboxed: boolean; reason: string }> {
  const r = await runNix('nix', ['show-config', '--extra-experimental-features', 'nix-command', ...NO_SUBSTITUTERS]);
  const line = r.stdout.split('\n').find((l) => l.startsWith('sandbox = '));
  const value = line?.slice('sandbox = '.length).trim();
  return value === 'true' || value === 'relaxed'
    ? { sandboxed: value === 'true', reason: `nix show-config: sandbox = ${value}` }
    : { sandboxed: false, reason: `nix show-config: sandbox = ${value ?? 'unknown'}` };
}
