import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DEFAULT_SANDBOX_PATHS } from '../agent/options.js';
import { generateSigningKey } from '../coordinator/cache/signing-key.js';
import { killGroup } from './support/cli.js';
import { freePort } from './support/ports.js';
import { AGENT_USER, ensureUser } from './support/multi-user-nix.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';
import {
  NIXPKGS_LIB,
  REPO,
  type Evaluated,
  type Service,
  evalModule,
  execStartWords,
  loadCredentials,
  renderedToml,
} from './support/nixos-module.js';

/**
 * The units the NixOS modules render, run as systemd would run them — as far as this machine (no systemd as PID 1)
 * allows: each in a mount namespace of its own with the root file system and /nix read-only but for its
 * StateDirectory (ProtectSystem=strict), a private /tmp (PrivateTmp), no /home or /root (ProtectHome), as its User=
 * and Group= with no_new_privs and an empty capability bounding set (NoNewPrivileges, CapabilityBoundingSet=), the
 * unit's environment and PATH, and $CREDENTIALS_DIRECTORY populated from LoadCredential=. The host is a multi-user
 * one: a root nix-daemon with Nix's sandbox on, configured with the nix.settings the agent module produced. The
 * coordinator and the agent build the diamond, submitted through the API with the API token the module handed over.
 * seccomp (SystemCallFilter) and the kernel-facing Protect* settings are not reproduced here.
 */

const isRoot = process.getuid?.() === 0;
const COORDINATOR_USER = 'ekaci-coord-test';
/** Inside the namespace: systemd's state directories, credentials, and the stand-in package. */
const STANDIN = '/var/lib/.standin';
const CREDENTIALS = '/var/lib/.credentials';

let host: ChildProcess | undefined;
afterEach(() => {
  if (host) killGroup(host);
  host = undefined;
});

function groupName(user: string): string {
  return execFileSync('id', ['-gn', user], { encoding: 'utf8' }).trim();
}

const q = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

/** nix.conf lines for `nix.settings`, as NixOS writes them. */
function nixConf(settings: Record<string, unknown>): string {
  return Object.entries(settings)
    .map(([k, v]) => `${k} = ${Array.isArray(v) ? v.join(' ') : String(v)}`)
    .join('\n');
}

/**
 * Shell lines (run as root in the host namespace) that start `service` as systemd would, in the background.
 * `home`: the user's home directory as the module declares it; `replace` swaps words of ExecStart (store paths the
 * namespace's empty store lacks).
 */
function startUnit(name: string, service: Service, home: string, replace: Record<string, string>): string {
  const c = service.serviceConfig;
  const user = String(c.User);
  const group = String(c.Group);
  // StateDirectory= and CacheDirectory=: the unit's own writable directories.
  const state = `/var/lib/${String(c.StateDirectory)}`;
  const cache = typeof c.CacheDirectory === 'string' ? `/var/cache/${c.CacheDirectory}` : undefined;
  const own = [[state, c.StateDirectoryMode], ...(cache ? [[cache, c.CacheDirectoryMode]] : [])] as Array<
    [string, unknown]
  >;
  const credentials = `${CREDENTIALS}/${name}.service`;
  const argv = execStartWords(String(c.ExecStart), { d: credentials }).map((w) => replace[w] ?? w);
  const env = {
    ...service.environment,
    HOME: home,
    USER: user,
    LOGNAME: user,
    STATE_DIRECTORY: state,
    ...(cache ? { CACHE_DIRECTORY: cache } : {}),
    CREDENTIALS_DIRECTORY: credentials,
    EKACI_LOG_LEVEL: process.env.EKACI_LOG_LEVEL ?? 'warn',
  };
  const copies = loadCredentials(service).map(([n, source]) => `cp ${q(source)} ${credentials}/${n}`);
  const sandbox = [
    ...own.map(([d]) => `mount --bind ${d} ${d}`),
    'mount -o remount,bind,ro /',
    'mount -o remount,bind,ro /nix',
    'mount -o remount,bind,ro /var/lib',
    'mount -o remount,bind,ro /var/cache',
    'mount -t tmpfs -o mode=1777 tmpfs /tmp',
    'mount -t tmpfs -o mode=0755,ro tmpfs /home',
    'mount -t tmpfs -o mode=0700,ro tmpfs /root',
    `umask ${String(c.UMask)}`,
    `cd /`,
    `exec setpriv --reuid=${user} --regid=${group} --init-groups --no-new-privs --bounding-set=-all -- ` +
      `env -i ${Object.entries(env)
        .map(([k, v]) => q(`${k}=${v}`))
        .join(' ')} ${argv.map(q).join(' ')}`,
  ].join('\n');
  return [
    `mkdir -p ${own.map(([d]) => d).join(' ')} ${credentials}`,
    ...own.flatMap(([d, mode]) => [`chown ${user}:${group} ${d}`, `chmod ${String(mode)} ${d}`]),
    ...copies,
    `chown -R ${user}:${group} ${credentials}`,
    `chmod 0500 ${credentials}`,
    `chmod 0400 ${credentials}/*`,
    `unshare -m --propagation private sh -c ${q(sandbox)} &`,
  ].join('\n');
}

describe('the units the NixOS modules render', () => {
  it.skipIf(!isRoot || !NIXPKGS_LIB)(
    'run as their users with their credentials: a coordinator and an agent on a sandboxed multi-user host build the diamond',
    async () => {
      ensureUser(COORDINATOR_USER);
      ensureUser(AGENT_USER);
      const [webPort, grpcPort] = [await freePort(), await freePort()];
      const dir = tempDir('ekaci-units-');
      chmodSync(dir, 0o755);
      const secret = (name: string, content: string): string => {
        writeFileSync(join(dir, name), content, { mode: 0o600 });
        return join(dir, name);
      };
      const key = generateSigningKey('ci.test-1');
      const apiToken = 'ekaci_api-token-for-the-unit-test-0123456789';
      const agentToken = 'ekaci_agent-token-for-the-unit-test-0123456789';
      const evalOptions = { package: `${STANDIN}/eka-ci`, tools: '/usr' };

      const coordinator: Evaluated = await evalModule(
        'nixos-module/coordinator.nix',
        {
          services: {
            'eka-ci': {
              coordinator: {
                enable: true,
                user: COORDINATOR_USER,
                group: groupName(COORDINATOR_USER),
                agentTokenFiles: { builder: secret('agent-token', agentToken) },
                apiTokenFiles: { tester: secret('api-token', apiToken) },
                cacheSecretKeyFile: secret('cache-key', key.secretKey),
                settings: {
                  web: { port: webPort },
                  grpc: { address: '127.0.0.1', port: grpcPort },
                  lease_ttl_seconds: 20,
                },
              },
            },
          },
        },
        evalOptions,
      );
      const agent: Evaluated = await evalModule(
        'nixos-module/agent.nix',
        {
          services: {
            'eka-ci': {
              agent: {
                enable: true,
                user: AGENT_USER,
                group: groupName(AGENT_USER),
                coordinator: `127.0.0.1:${grpcPort}`,
                tokenFile: join(dir, 'agent-token'),
                maxJobs: 2,
                cache: { url: `http://127.0.0.1:${webPort}/cache`, publicKey: key.publicKey },
              },
            },
          },
        },
        evalOptions,
      );
      const coordinatorUnit = coordinator.services['eka-ci-coordinator']!;
      const agentUnit = agent.services['eka-ci-agent']!;

      // The package as a store path would hold it: the three commands, here running the built JavaScript.
      const pkg = join(dir, 'standin');
      mkdirSync(join(pkg, 'eka-ci', 'bin'), { recursive: true });
      for (const [cmd, main] of [
        ['ekaci-coordinator', 'cli/ekaci-coordinator.js'],
        ['ekaci-agent', 'agent/main.js'],
      ]) {
        const file = join(REPO, 'dist', main!);
        if (!existsSync(file)) throw new Error(`${file} is missing: run npm run build first`);
        writeFileSync(join(pkg, 'eka-ci', 'bin', cmd!), `#!/bin/sh\nexec ${process.execPath} ${file} "$@"\n`, {
          mode: 0o755,
        });
      }
      const storeToml = String(coordinatorUnit.serviceConfig.ExecStart).split(' ').at(-1)!;
      writeFileSync(join(pkg, 'eka-ci-coordinator.toml'), renderedToml(storeToml), { mode: 0o644 });
      const confDir = join(dir, 'etc-nix');
      mkdirSync(confDir);
      writeFileSync(
        join(confDir, 'nix.conf'),
        [
          'sandbox = true',
          'build-users-group = nixbld',
          'substituters =',
          `sandbox-paths = ${DEFAULT_SANDBOX_PATHS.join(' ')}`,
          nixConf(agent.nixSettings),
        ].join('\n'),
      );
      const file = writeNixFile(
        dir,
        nonce(),
        `rec {
          base = mk "base" { script = "echo base > $out"; };
          left = mk "left" { deps = [ base ]; script = "read b < \${base}; echo left-$b > $out"; };
          right = mk "right" { deps = [ base ]; script = "read b < \${base}; echo right-$b > $out"; };
          top = mk "top" { deps = [ left right ]; script = "read l < \${left}; read r < \${right}; echo $l $r > $out"; };
        }`,
      );
      const nixDir = join(dir, 'nix');
      mkdirSync(nixDir);

      const script = [
        'set -e',
        `mount --bind ${q(nixDir)} /nix`,
        'mkdir -p /nix/store /nix/var/nix/daemon-socket',
        'chgrp nixbld /nix/store',
        'chmod 1775 /nix/store',
        `mount --bind ${q(confDir)} /etc/nix`,
        'mount -t tmpfs -o mode=0755 tmpfs /var/lib',
        'mount -t tmpfs -o mode=0755 tmpfs /var/cache',
        `mkdir -p ${STANDIN} ${CREDENTIALS}`,
        `cp -r ${q(pkg)}/. ${STANDIN}/`,
        'nix-daemon &',
        'for i in $(seq 1 200); do [ -S /nix/var/nix/daemon-socket/socket ] && break; sleep 0.05; done',
        startUnit('eka-ci-coordinator', coordinatorUnit, String(coordinator.users.users[COORDINATOR_USER]!.home), {
          [storeToml]: `${STANDIN}/eka-ci-coordinator.toml`,
        }),
        // NixOS gives a system user without a home /var/empty.
        startUnit('eka-ci-agent', agentUnit, '/var/empty', {}),
        `NIX_REMOTE=daemon nix-instantiate ${q(file)} -A base -A left -A right -A top > ${q(dir)}/drvs.tmp`,
        `mv ${q(dir)}/drvs.tmp ${q(dir)}/drvs`,
        'wait',
      ].join('\n');
      let output = '';
      host = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script], {
        stdio: ['ignore', 'ignore', 'pipe'],
        detached: true,
      });
      host.stderr!.setEncoding('utf8').on('data', (s: string) => (output += s));

      const web = `http://127.0.0.1:${webPort}`;
      const auth = { authorization: `Bearer ${apiToken}` };
      const until = async <T>(what: string, probe: () => Promise<T | undefined>): Promise<T> => {
        const deadline = Date.now() + 120_000;
        for (;;) {
          const value = await probe().catch(() => undefined);
          if (value !== undefined) return value;
          if (host!.exitCode !== null || Date.now() > deadline) {
            throw new Error(`gave up waiting for ${what}; the host's output:\n${output}`);
          }
          await new Promise((r) => setTimeout(r, 100));
        }
      };
      await until('the coordinator', async () => ((await fetch(`${web}/readyz`)).ok ? true : undefined));
      const drvs = await until('the derivations', () =>
        Promise.resolve(
          existsSync(join(dir, 'drvs')) ? readFileSync(join(dir, 'drvs'), 'utf8').trim().split('\n') : undefined,
        ),
      );
      expect(drvs).toHaveLength(4);

      const submitted = await fetch(`${web}/api/v1/builds`, {
        method: 'POST',
        headers: { ...auth, 'content-type': 'application/json' },
        body: JSON.stringify({ drvs }),
      });
      expect(submitted.status, await submitted.clone().text()).toBe(202);
      const { url } = (await submitted.json()) as { url: string };
      const builds = await until('the builds', async () => {
        const r = (await (await fetch(`${web}${url}`, { headers: auth })).json()) as {
          settled: boolean;
          builds: Array<{ drvPath: string; state: string; agent?: string; error?: string }>;
        };
        return r.settled ? r.builds : undefined;
      });

      for (const b of builds) expect(b.state, `${b.drvPath}: ${b.error ?? ''}\n${output}`).toBe('succeeded');
      expect(builds.map((b) => b.agent)).toEqual(['builder', 'builder', 'builder', 'builder']);
      // The agent was the daemon's unprivileged client; the daemon built in its sandbox.
      const derivation = (await (
        await fetch(`${web}/api/v1/derivations/${drvs[3]!.slice('/nix/store/'.length, '/nix/store/'.length + 32)}`, {
          headers: auth,
        })
      ).json()) as { derivation: { state: string } };
      expect(derivation.derivation.state).toBe('succeeded');
      // Nothing on the way complained: no write outside the unit's directories, no connection the daemon found odd.
      expect(output).not.toMatch(/Read-only file system|Permission denied|unexpected Nix daemon error/);
    },
  );
});
