import { spawnSync } from 'node:child_process';
import { generateKeyPairSync } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { runNix } from '../common/nix/cli.js';
import { generateSigningKey } from '../coordinator/cache/signing-key.js';
import { loadCoordinatorConfig } from '../coordinator/config.js';
import { ConfigError } from '../common/errors.js';
import {
  NIXPKGS_LIB,
  NIXPKGS_LIB_VAR,
  REPO,
  evalJson,
  evalModule,
  execStartWords,
  loadCredentials,
  populateCredentials,
  renderedToml,
} from './support/nixos-module.js';
import { tempDir } from './support/nix-project.js';

/**
 * The deployment files: the flake, the NixOS and nix-darwin modules, the plain systemd units and launchd plist.
 * Modules are evaluated by nixpkgs' real module system (lib from $EKACI_NIXPKGS_LIB); what they render is checked
 * with the coordinator's own config loader and systemd's own verifier. The units are run for real in
 * test/packaging-run.test.ts.
 */

const withLib = it.skipIf(!NIXPKGS_LIB);
if (!NIXPKGS_LIB) {
  process.stderr.write(
    `packaging tests: ${NIXPKGS_LIB_VAR} is not set, so the module evaluations are skipped (point it at a checkout ` +
      'of nixpkgs or nixpkgs.lib; .ci/run sets it to ../shared/vendor/nixpkgs-lib)\n',
  );
}

function nixFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    if (['node_modules', 'dist', '.git', '.bench'].includes(e.name)) return [];
    const path = join(dir, e.name);
    if (e.isDirectory()) return nixFiles(path);
    return e.name.endsWith('.nix') ? [path] : [];
  });
}

const APP_KEY = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({
  type: 'pkcs1',
  format: 'pem',
}) as string;

/** Secret files on the "host", as an administrator would put them before deploying. */
function hostSecrets() {
  const dir = tempDir('ekaci-host-secrets-');
  const file = (name: string, content: string): string => {
    writeFileSync(join(dir, name), content, { mode: 0o600 });
    return join(dir, name);
  };
  const key = generateSigningKey('ci.example.org-1');
  return {
    key,
    agentToken: file('agent-token', 'ekaci_builder-token-0123456789abcdef\n'),
    apiToken: file('api-token', 'ekaci_api-token-0123456789abcdef\n'),
    webhook: file('webhook', 'a-webhook-secret-of-some-length\n'),
    app: file('app.env', `GITHUB_APP_ID=4242\nGITHUB_APP_PRIVATE_KEY="${APP_KEY}"\n`),
    cacheKey: file('cache.sec', key.secretKey),
  };
}

function coordinatorConfiguration(s: ReturnType<typeof hostSecrets>, extra: Record<string, unknown> = {}) {
  return {
    services: {
      'eka-ci': {
        coordinator: {
          enable: true,
          agentTokenFiles: { builder: s.agentToken },
          apiTokenFiles: { dashboard: s.apiToken },
          webhookSecretFile: s.webhook,
          cacheSecretKeyFile: s.cacheKey,
          githubApps: { main: { credentialsFile: s.app, settings: { permissions: { allowed_repos: ['my-org/*'] } } } },
          settings: { web: { public_url: 'https://ci.example.org' }, evaluation: { workers: 3 } },
          ...extra,
        },
      },
    },
  };
}

const agentConfiguration = (extra: Record<string, unknown> = {}) => ({
  services: {
    'eka-ci': {
      agent: {
        enable: true,
        coordinator: 'ci.example.org:50051',
        tokenFile: '/run/keys/eka-ci-agent-token',
        systems: ['x86_64-linux', 'i686-linux'],
        supportedFeatures: ['kvm', 'big-parallel'],
        maxJobs: 4,
        cache: { url: 'https://ci.example.org/cache', publicKey: 'ci.example.org-1:AAAA' },
        ...extra,
      },
    },
  },
});

describe('Nix files', () => {
  it('all parse', async () => {
    const files = nixFiles(REPO);
    expect(files.map((f) => relative(REPO, f))).toEqual(
      expect.arrayContaining([
        'flake.nix',
        'packaging/package.nix',
        'nixos-module/coordinator.nix',
        'nixos-module/agent.nix',
        'nixos-module/darwin-agent.nix',
      ]),
    );
    for (const file of files) {
      const r = await runNix('nix-instantiate', ['--parse', file]);
      expect(r.code, `${relative(REPO, file)}: ${r.stderr}`).toBe(0);
    }
  });

  it("declare the flake's outputs (which need nixpkgs to evaluate, so are only read here)", () => {
    const flake = readFileSync(join(REPO, 'flake.nix'), 'utf8');
    for (const output of [
      'packages =',
      'apps =',
      'overlays.default =',
      'nixosModules =',
      'darwinModules =',
      'devShells =',
      'checks =',
      './nixos-module/coordinator.nix',
      './nixos-module/agent.nix',
      './nixos-module/darwin-agent.nix',
      'importNpmLock',
    ]) {
      expect(flake + readFileSync(join(REPO, 'packaging', 'package.nix'), 'utf8')).toContain(output);
    }
  });
});

describe('the NixOS coordinator module', () => {
  withLib(
    'renders a hardened unit: the package, the user, credentials, the sandbox bubblewrap needs, PATH',
    async () => {
      const s = hostSecrets();
      const r = await evalModule('nixos-module/coordinator.nix', coordinatorConfiguration(s, { openFirewall: true }));

      expect(r.failedAssertions).toEqual([]);
      const unit = r.services['eka-ci-coordinator']!;
      const c = unit.serviceConfig;
      expect(c.ExecStart).toMatch(
        /^\/standin\/eka-ci\/bin\/ekaci-coordinator --config \/nix\/store\/\S+-eka-ci-coordinator\.toml$/,
      );
      expect([c.User, c.Group, c.StateDirectory]).toEqual(['eka-ci', 'eka-ci', 'eka-ci']);
      expect(r.users.users['eka-ci']).toMatchObject({ isSystemUser: true, group: 'eka-ci', home: '/var/lib/eka-ci' });
      expect(r.users.groups).toHaveProperty('eka-ci');
      expect(loadCredentials(unit).sort()).toEqual(
        [
          ['agent-token-builder', s.agentToken],
          ['api-token-dashboard', s.apiToken],
          ['cache-secret-key', s.cacheKey],
          ['github-app-main', s.app],
          ['webhook-secret', s.webhook],
        ].sort(),
      );
      expect(c).toMatchObject({
        NoNewPrivileges: true,
        ProtectSystem: 'strict',
        ProtectHome: true,
        PrivateTmp: true,
        CapabilityBoundingSet: '',
        // bubblewrap: user namespaces, and a /proc it can mount again.
        RestrictNamespaces: 'user mnt pid net ipc uts cgroup',
        ProtectKernelTunables: false,
        ProcSubset: 'all',
        SystemCallFilter: ['@system-service', '@mount'],
      });
      expect(c.RestrictAddressFamilies).toEqual(['AF_UNIX', 'AF_INET', 'AF_INET6', 'AF_NETLINK']);
      expect(unit.path).toEqual(['nix', 'git', 'bubblewrap']);
      expect(unit.environment.PATH).toBe('/usr/bin:/usr/sbin:/usr/bin:/usr/sbin:/usr/bin:/usr/sbin');
      expect(unit.after).toContain('nix-daemon.socket');
      expect(r.firewall.allowedTCPPorts).toEqual([8080, 50051]);
      // No secret is in the rendered configuration (which lands in the world-readable store).
      const file = String(c.ExecStart).split(' ').at(-1)!;
      const toml = renderedToml(file);
      for (const secret of [s.agentToken, s.apiToken, s.webhook, s.app, s.cacheKey]) {
        expect(toml).not.toContain(readFileSync(secret, 'utf8').trim());
      }
    },
  );

  withLib("renders settings the coordinator's loader accepts, reading every secret from its credential", async () => {
    const s = hostSecrets();
    const r = await evalModule('nixos-module/coordinator.nix', coordinatorConfiguration(s));
    const unit = r.services['eka-ci-coordinator']!;
    const dir = tempDir('ekaci-rendered-');
    const toml = join(dir, 'coordinator.toml');
    writeFileSync(toml, renderedToml(String(unit.serviceConfig.ExecStart).split(' ').at(-1)!));
    const credentials = join(dir, 'credentials');
    populateCredentials(unit, credentials);

    const o = loadCoordinatorConfig(toml, { CREDENTIALS_DIRECTORY: credentials });

    expect(o.dataDir).toBe('/var/lib/eka-ci');
    expect(o.web).toMatchObject({ address: '127.0.0.1', port: 8080, publicUrl: 'https://ci.example.org' });
    expect(o.grpc).toMatchObject({ address: '0.0.0.0', port: 50051 });
    expect(o.localAgent.enabled).toBe(false);
    expect(o.evaluation.workers).toBe(3);
    expect(o.agentTokens).toEqual([{ name: 'builder', token: 'ekaci_builder-token-0123456789abcdef' }]);
    expect(o.apiTokens).toEqual([{ name: 'dashboard', token: 'ekaci_api-token-0123456789abcdef' }]);
    expect(o.security.webhookSecret).toBe('a-webhook-secret-of-some-length');
    expect(o.cache.secretKey).toBe(s.key.secretKey);
    expect(o.githubApps).toHaveLength(1);
    expect(o.githubApps[0]).toMatchObject({ id: 'main', credentials: { appId: 4242 } });
    expect(o.githubApps[0]!.permissions).toBeDefined();
  });

  withLib('lets an invalid setting through to the loader, which names it', async () => {
    const s = hostSecrets();
    const r = await evalModule(
      'nixos-module/coordinator.nix',
      coordinatorConfiguration(s, { settings: { evaluation: { workers: 0 }, web: { prot: 1 } } }),
    );
    const unit = r.services['eka-ci-coordinator']!;
    const toml = join(tempDir(), 'coordinator.toml');
    writeFileSync(toml, renderedToml(String(unit.serviceConfig.ExecStart).split(' ').at(-1)!));
    const credentials = join(tempDir(), 'credentials');
    populateCredentials(unit, credentials);
    expect(() => loadCoordinatorConfig(toml, { CREDENTIALS_DIRECTORY: credentials })).toThrow(ConfigError);
    expect(() => loadCoordinatorConfig(toml, { CREDENTIALS_DIRECTORY: credentials })).toThrow(
      /web\.prot|evaluation\.workers/,
    );
  });

  withLib(
    'refuses secrets in the Nix store, relative paths, a bad port, and GitHub Apps without a webhook secret',
    async () => {
      const s = hostSecrets();
      await expect(
        evalModule(
          'nixos-module/coordinator.nix',
          coordinatorConfiguration(s, { webhookSecretFile: '/nix/store/abc-secret' }),
        ),
      ).rejects.toThrow(/absolute path of a file outside the Nix store/);
      await expect(
        evalModule('nixos-module/coordinator.nix', coordinatorConfiguration(s, { agentTokenFiles: { b: 'token' } })),
      ).rejects.toThrow(/absolute path of a file outside the Nix store/);
      await expect(
        evalModule('nixos-module/coordinator.nix', coordinatorConfiguration(s, { settings: { web: { port: 70000 } } })),
      ).rejects.toThrow(/port/);
      const r = await evalModule(
        'nixos-module/coordinator.nix',
        coordinatorConfiguration(s, { webhookSecretFile: null }),
      );
      expect(r.failedAssertions.join('\n')).toMatch(/GitHub Apps need webhookSecretFile/);
    },
  );

  withLib('puts nix-eval-jobs on PATH when asked, and moves the state when data_dir does', async () => {
    const s = hostSecrets();
    const r = await evalModule(
      'nixos-module/coordinator.nix',
      coordinatorConfiguration(s, { nixEvalJobs: true, settings: { data_dir: '/srv/eka-ci' } }),
    );
    const unit = r.services['eka-ci-coordinator']!;
    expect(unit.path).toEqual(['nix', 'git', 'bubblewrap', 'nix-eval-jobs']);
    expect(unit.serviceConfig.StateDirectory).toBeUndefined();
    expect(unit.serviceConfig.ReadWritePaths).toEqual(['/srv/eka-ci']);
  });
});

describe('the agent modules', () => {
  const words = (execStart: unknown) =>
    execStartWords(String(execStart), { d: '/run/credentials/eka-ci-agent.service' });

  withLib('NixOS: the agent as an unprivileged user of the host daemon, which gets to know the cache', async () => {
    const r = await evalModule('nixos-module/agent.nix', agentConfiguration());

    expect(r.failedAssertions).toEqual([]);
    const unit = r.services['eka-ci-agent']!;
    expect(words(unit.serviceConfig.ExecStart)).toEqual([
      '/standin/eka-ci/bin/ekaci-agent',
      '--coordinator',
      'ci.example.org:50051',
      '--token-file',
      '/run/credentials/eka-ci-agent.service/agent-token',
      '--store',
      'daemon',
      '--system',
      'x86_64-linux',
      '--system',
      'i686-linux',
      '--features',
      'kvm,big-parallel',
      '--max-jobs',
      '4',
      '--drain-grace',
      '100',
      '--cache-wait',
      '120',
    ]);
    expect(unit.serviceConfig).toMatchObject({
      TimeoutStopSec: 120,
      User: 'eka-ci-agent',
      StateDirectory: 'eka-ci-agent',
      LoadCredential: ['agent-token:/run/keys/eka-ci-agent-token'],
      NoNewPrivileges: true,
      ProtectSystem: 'strict',
      // Repository checks run in bubblewrap, each in a cgroup of the service's delegated subtree.
      ProtectKernelTunables: false,
      RestrictNamespaces: 'user mnt pid net ipc uts cgroup',
      ProtectControlGroups: false,
      Delegate: true,
    });
    // nix, bubblewrap, xz and zstd (the stand-ins of these packages live in one directory here).
    expect(unit.environment).toMatchObject({
      NIX_REMOTE: 'daemon',
      PATH: '/usr/bin:/usr/sbin:'.repeat(4).slice(0, -1),
    });
    expect(r.users.users['eka-ci-agent']).toMatchObject({ isSystemUser: true });
    expect(r.nixSettings).toEqual({
      'extra-substituters': ['https://ci.example.org/cache'],
      'extra-trusted-public-keys': ['ci.example.org-1:AAAA'],
    });
  });

  withLib('NixOS: a trusted user instead, extra Nix settings, and the checks on what cannot work', async () => {
    const trusted = await evalModule(
      'nixos-module/agent.nix',
      agentConfiguration({ trustedUser: true, cache: {}, nixSettings: { 'max-silent-time': 3600 } }),
    );
    expect(trusted.failedAssertions).toEqual([]);
    expect(trusted.nixSettings).toEqual({ 'trusted-users': ['eka-ci-agent'], 'max-silent-time': 3600 });

    const neither = await evalModule('nixos-module/agent.nix', agentConfiguration({ cache: {} }));
    expect(neither.failedAssertions.join('\n')).toMatch(
      /set cache.url and cache.publicKey .* or\s+trustedUser = true/s,
    );
    const root = await evalModule('nixos-module/agent.nix', agentConfiguration({ user: 'root' }));
    expect(root.failedAssertions.join('\n')).toMatch(/not root/);
    const half = await evalModule('nixos-module/agent.nix', agentConfiguration({ tls: { certFile: '/etc/c.pem' } }));
    expect(half.failedAssertions.join('\n')).toMatch(/tls.certFile and tls.keyFile go together/);
  });

  withLib('nix-darwin: the same command line and Nix settings as a launchd daemon of its own user', async () => {
    const nixos = await evalModule('nixos-module/agent.nix', agentConfiguration());
    const r = await evalModule('nixos-module/darwin-agent.nix', agentConfiguration());

    expect(r.failedAssertions).toEqual([]);
    const daemon = r.launchd['eka-ci-agent']!;
    const nixosWords = words(nixos.services['eka-ci-agent']!.serviceConfig.ExecStart);
    // The same flags; on macOS the token is read from its file (there are no systemd credentials).
    expect(daemon.ProgramArguments).toEqual(
      nixosWords.map((w) =>
        w === '/run/credentials/eka-ci-agent.service/agent-token' ? '/run/keys/eka-ci-agent-token' : w,
      ),
    );
    expect(daemon).toMatchObject({
      UserName: 'eka-ci-agent',
      GroupName: 'eka-ci-agent',
      KeepAlive: true,
      RunAtLoad: true,
      ExitTimeOut: 120,
      EnvironmentVariables: {
        NIX_REMOTE: 'daemon',
        STATE_DIRECTORY: '/var/lib/eka-ci-agent',
        // nix, xz and zstd (one stand-in directory here), then the system's.
        PATH: '/usr/bin:/usr/bin:/usr/bin:/usr/bin:/bin:/usr/sbin:/sbin',
      },
    });
    expect(r.users.knownUsers).toEqual(['eka-ci-agent']);
    expect(r.users.users['eka-ci-agent']).toMatchObject({ uid: 531, home: '/var/lib/eka-ci-agent' });
    expect(r.nixSettings).toEqual(nixos.nixSettings);
    expect(r.services).toEqual({});
  });
});

describe('packaging/ for hosts without the modules', () => {
  const hasSystemdAnalyze = spawnSync('systemd-analyze', ['--version']).status === 0;

  it.skipIf(!hasSystemdAnalyze)('systemd-analyze verifies the units without a complaint', () => {
    // verify looks the units up by name: copies in a directory of their own.
    const dir = tempDir('ekaci-units-');
    const units = ['eka-ci-coordinator.service', 'eka-ci-agent.service'];
    for (const u of units) writeFileSync(join(dir, u), readFileSync(join(REPO, 'packaging', u)));
    const r = spawnSync('systemd-analyze', ['verify', ...units.map((u) => join(dir, u))], { encoding: 'utf8' });
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
  });

  withLib('carry the modules’ hardening, key for key', async () => {
    for (const [unit, cgroups] of [
      ['eka-ci-coordinator.service', false],
      ['eka-ci-agent.service', true],
    ] as const) {
      const expected = (await evalJson(
        `import ${join(REPO, 'nixos-module', 'hardening.nix')} { bubblewrap = true; cgroups = ${cgroups}; }`,
      )) as Record<string, unknown>;
      const lines = readFileSync(join(REPO, 'packaging', unit), 'utf8').split('\n');
      const settings = new Map(
        lines
          .filter((l) => /^[A-Za-z]+=/.test(l))
          .map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]),
      );
      for (const [key, value] of Object.entries(expected)) {
        const systemd = Array.isArray(value) ? value.join(' ') : String(value);
        expect(settings.get(key), `${unit}: ${key}`).toBe(systemd);
      }
    }
  });

  it('ship an example configuration the loader accepts with the unit’s credentials', () => {
    const s = hostSecrets();
    const credentials = tempDir('ekaci-credentials-');
    mkdirSync(credentials, { recursive: true });
    const unit = readFileSync(join(REPO, 'packaging', 'eka-ci-coordinator.service'), 'utf8');
    const names = [...unit.matchAll(/^LoadCredential=([^:]+):/gm)].map((m) => m[1]!);
    expect(names).toEqual(['webhook-secret', 'github-app-main']);
    writeFileSync(join(credentials, 'webhook-secret'), readFileSync(s.webhook));
    writeFileSync(join(credentials, 'github-app-main'), readFileSync(s.app));

    const o = loadCoordinatorConfig(join(REPO, 'packaging', 'coordinator.toml'), {
      CREDENTIALS_DIRECTORY: credentials,
    });

    expect(o.githubApps[0]?.credentials.appId).toBe(4242);
    expect(o.security.webhookSecret).toBe('a-webhook-secret-of-some-length');
    expect(o.dataDir).toBe('/var/lib/eka-ci');
  });
});
