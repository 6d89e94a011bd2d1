import { type ChildProcess, execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { spawnAgentProcess } from '../cli/embedded.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { NO_EXTRA_POLICY } from '../coordinator/eval/eval-options.js';
import { instantiate } from '../coordinator/eval/instantiate.js';
import { killGroup } from './support/cli.js';
import { startCoordinator } from './support/coordinator-harness.js';
import { testEvalEnvironment } from './support/eval-environment.js';
import { DEFAULT_SANDBOX_PATHS } from '../agent/options.js';
import { AGENT_USER, type MultiUserHost, ensureUser, startMultiUserHost } from './support/multi-user-nix.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

/**
 * Builder hosts in the shape NixOS, macOS and the upstream installer give them: a root nix-daemon with Nix's sandbox
 * on and nixbld build users, and the agent as an unprivileged user on the daemon's socket (see
 * test/support/multi-user-nix.ts). Needs root, to make the store and the user.
 */

const isRoot = process.getuid?.() === 0;
const REPO = join(import.meta.dirname, '..');

let coordinator: Coordinator | undefined;
const hosts: MultiUserHost[] = [];
const children: ChildProcess[] = [];

afterEach(async () => {
  for (const h of hosts.splice(0)) h.stop();
  for (const c of children.splice(0)) killGroup(c);
  await coordinator?.stopNow();
  coordinator = undefined;
});

/** A multi-user host whose nix.conf knows the coordinator's cache, as the NixOS module writes it. */
function multiUserAgent(c: Coordinator, name: string, nixConf: string, extraArgs: string[] = []): MultiUserHost {
  const host = startMultiUserHost({
    coordinator: c.grpcTarget,
    token: c.tokens.create(name, 'test'),
    nixConf,
    agentArgs: extraArgs,
  });
  hosts.push(host);
  return host;
}

function cacheConf(c: Coordinator): string {
  return `extra-substituters = ${c.cacheUrl}\nextra-trusted-public-keys = ${c.cachePublicKey}`;
}

async function until(what: string, ok: () => boolean, host?: MultiUserHost): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what}; host output:\n${host?.output() ?? ''}`);
    if (host && host.process.exitCode !== null) throw new Error(`the host ended before ${what}:\n${host.output()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function build(body: string, attrs: string[]) {
  const file = writeNixFile(tempDir(), nonce(), body);
  const roots = await instantiate(file, attrs, await testEvalEnvironment(), NO_EXTRA_POLICY);
  const results = await coordinator!.manager.waitFor(await coordinator!.manager.submit(roots, 'test'));
  return Object.fromEntries(results.map((r) => [r.attr, r]));
}

describe('an agent as an unprivileged user of a sandboxed multi-user nix-daemon', () => {
  it.skipIf(!isRoot)(
    'builds the diamond with a single-user agent, each edge crossing between their stores',
    async () => {
      coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 20 });
      // The host's daemon decides which features it builds: the agent announces what the host's nix.conf says.
      const host = multiUserAgent(coordinator, 'nixos-builder', `system-features = side-a\n${cacheConf(coordinator)}`);
      const single = spawnAgentProcess({
        coordinator: coordinator.grpcTarget,
        token: coordinator.localAgentToken('single-user'),
        agentId: 'single-user',
        dir: tempDir('ekaci-single-'),
        isolated: true,
        maxJobs: 1,
        extraArgs: ['--features', 'side-b'],
        logLevel: 'error',
      });
      children.push(single);
      await until('both agents', () => coordinator!.agentHub.agentCount === 2, host);

      const r = await build(
        `rec {
        base = mk "base" { script = "echo base > $out"; requiredSystemFeatures = [ "side-b" ]; };
        left = mk "left" { deps = [ base ]; script = "read b < \${base}; echo left-$b > $out"; requiredSystemFeatures = [ "side-a" ]; };
        right = mk "right" { deps = [ base ]; script = "read b < \${base}; echo right-$b > $out"; requiredSystemFeatures = [ "side-b" ]; };
        top = mk "top" { deps = [ left right ]; script = "read l < \${left}; read r < \${right}; echo $l $r > $out"; requiredSystemFeatures = [ "side-a" ]; };
      }`,
        ['base', 'left', 'right', 'top'],
      );

      for (const attr of ['base', 'left', 'right', 'top'])
        expect(r[attr]?.state, `${attr}: ${r[attr]?.error}`).toBe('succeeded');
      expect([r.left?.agent, r.top?.agent]).toEqual(['nixos-builder', 'nixos-builder']);
      expect([r.base?.agent, r.right?.agent]).toEqual(['single-user', 'single-user']);
      const agents = coordinator.db.prepare('SELECT agent_id, sandboxed FROM agents ORDER BY agent_id').all();
      expect(agents).toEqual([
        { agent_id: 'nixos-builder', sandboxed: 1 },
        { agent_id: 'single-user', sandboxed: 0 },
      ]);
      // It really was the daemon that built, as a build user: the agent's user never wrote to the store.
      expect(host.output()).toMatch(new RegExp(`accepted connection from pid \\d+, user ${AGENT_USER}$`, 'm'));
    },
  );

  it.skipIf(!isRoot)('keeps a build from the network and the host’s files: Nix’s sandbox', async () => {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 20 });
    const host = multiUserAgent(coordinator, 'nixos-builder', cacheConf(coordinator));
    await until('the agent', () => coordinator!.agentHub.agentCount === 1, host);
    const secret = `${tempDir('ekaci-host-file-')}/secret`;
    writeFileSync(secret, 'a file of the host');
    const port = coordinator.httpPort;

    const r = await build(
      `{ escape = mk "escape" { script = ''
          /bin/cat ${secret} && exit 10
          /bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/${port}' && exit 11
          echo contained > $out
        ''; }; }`,
      ['escape'],
    );

    expect(r.escape?.state, r.escape?.error ?? '').toBe('succeeded');
    const log = readFileSync(coordinator.logs.pathFor(r.escape!.drvPath, 1), 'utf8');
    expect(log).toMatch(/No such file or directory/);
    expect(log).toMatch(/Connection refused|Network is unreachable|Cannot assign requested address/);
  });

  it.skipIf(!isRoot)(
    'stops at start-up, saying what to configure, when the daemon will not use the coordinator’s cache for it',
    async () => {
      coordinator = await startCoordinator(tempDir());
      const host = multiUserAgent(coordinator, 'untrusted', '');

      const code = await new Promise<number | null>((resolve) => host.process.once('exit', resolve));

      expect(code).not.toBe(0);
      const said = host.output();
      expect(said).toContain(`user ${AGENT_USER} is not in trusted-users`);
      expect(said).toContain(`extra-substituters = ${coordinator.cacheUrl}`);
      expect(said).toContain(`extra-trusted-public-keys = ${coordinator.cachePublicKey}`);
      expect(said).toContain('EKACI_ERR_CONFIG');
    },
  );

  it.skipIf(!isRoot)(
    'uses the settings it sends as a trusted user, with nothing about the cache in the host’s nix.conf',
    async () => {
      coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 20 });
      const host = multiUserAgent(coordinator, 'trusted', `trusted-users = root ${AGENT_USER}`);
      await until('the agent', () => coordinator!.agentHub.agentCount === 1, host);

      const r = await build(`{ x = mk "x" { script = "echo x > $out"; }; }`, ['x']);

      expect(r.x?.state, r.x?.error ?? '').toBe('succeeded');
      expect(r.x?.agent).toBe('trusted');
    },
  );
});

describe('the coordinator as an unprivileged user of a sandboxed multi-user nix-daemon', () => {
  it.skipIf(!isRoot)(
    'evaluates into its evaluation store, and imports what it builds through the daemon, which owns and builds it',
    () => {
      const { uid, gid } = ensureUser(AGENT_USER);
      const dir = tempDir('ekaci-eval-store-multi-user-');
      const [nix, conf, work] = ['nix', 'etc-nix', 'work'].map((d) => join(dir, d)) as [string, string, string];
      for (const d of [nix, conf, join(work, 'checkout')]) mkdirSync(d, { recursive: true });
      chmodSync(dir, 0o755);
      const tag = nonce();
      writeFileSync(join(work, 'checkout', 'builder.sh'), `# ${tag}\nread x < "$dep"; echo "$x built" > "$out"\n`);
      writeFileSync(
        join(work, 'checkout', 'default.nix'),
        `rec {
          dep = derivation { name = "dep-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${tag} > $out" ]; };
          app = derivation { name = "app-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ ./builder.sh ]; inherit dep; };
        }`,
      );
      // A repository allowed to import from derivations evaluates through the daemon, which builds what it imports.
      writeFileSync(
        join(work, 'checkout', 'tools.nix'),
        `let
          gen = derivation { name = "gen-${tag}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo '{ x = 7; }' > $out" ]; };
          v = import gen;
        in {
          tool = derivation { name = "tool-${tag}-\${toString v.x}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; };
        }`,
      );
      execFileSync('chown', ['-R', `${uid}:${gid}`, work]);
      writeFileSync(
        join(conf, 'nix.conf'),
        [
          'sandbox = true',
          'build-users-group = nixbld',
          'substituters =',
          `sandbox-paths = ${DEFAULT_SANDBOX_PATHS.join(' ')}`,
        ].join('\n'),
      );
      // What the coordinator does, from the built modules (the user runs plain JavaScript).
      const dist = (p: string) => JSON.stringify(join(REPO, 'dist', p));
      writeFileSync(
        join(work, 'inside.mjs'),
        `import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { EvalEnvironment } from ${dist('coordinator/eval/eval-environment.js')};
import { DEFAULT_EVALUATION_OPTIONS, NO_EXTRA_POLICY } from ${dist('coordinator/eval/eval-options.js')};
import { evaluateBuiltIn } from ${dist('coordinator/eval/evaluator.js')};
import { silentLogger } from ${dist('common/logging.js')};
const work = ${JSON.stringify(work)};
const env = await EvalEnvironment.open(DEFAULT_EVALUATION_OPTIONS, silentLogger(), { evalStoreDir: work + '/eval-store' });
await env.prepare();
const launcher = env.launcher({ roots: [work + '/checkout'], policy: NO_EXTRA_POLICY });
const drvs = {};
for await (const r of evaluateBuiltIn({ file: work + '/checkout/default.nix', attrPath: [], gcRootsDir: work + '/roots', workers: 1, launcher })) drvs[r.attr] = r.drvPath ?? r.error;
const validBefore = spawnSync('nix-store', ['--check-validity', drvs.app]).status === 0;
const report = await env.importDerivations([drvs.app], work + '/gcroots');
const out = execFileSync('nix-store', ['--realise', drvs.app], { encoding: 'utf8' }).trim();
const ifdPolicy = { ...NO_EXTRA_POLICY, allowImportFromDerivation: true };
await env.prepare(ifdPolicy);
const ifd = {};
const ifdLauncher = env.launcher({ roots: [work + '/checkout'], policy: ifdPolicy });
for await (const r of evaluateBuiltIn({ file: work + '/checkout/tools.nix', attrPath: [], gcRootsDir: work + '/roots-ifd', workers: 1, launcher: ifdLauncher })) ifd[r.attr] = r.drvPath ?? r.error;
writeFileSync(work + '/ifd-drvs', Object.values(ifd).join('\\n'));
console.log(JSON.stringify({ drvs, validBefore, report, owner: statSync(drvs.app).uid, built: readFileSync(out, 'utf8'), ifd }));
env.close();
`,
      );
      const script = `set -e
mount --bind "$1" /nix
mkdir -p /nix/store /nix/var/nix/daemon-socket
chgrp nixbld /nix/store
chmod 1775 /nix/store
nix-daemon 2>/dev/null &
trap 'kill $!' EXIT
for i in $(seq 1 200); do [ -S /nix/var/nix/daemon-socket/socket ] && break; sleep 0.05; done
setpriv --reuid=${uid} --regid=${gid} --init-groups --reset-env -- env PATH="$PATH" HOME="$2" NIX_CONF_DIR="$3" NIX_REMOTE=daemon node "$2/inside.mjs"
for f in /nix/var/nix/gcroots/auto/*; do echo "root $(readlink "$f")"; done
# The collector keeps what the evaluation through the daemon rooted.
nix-store --gc >/dev/null 2>&1
for p in $(cat "$2/ifd-drvs"); do nix-store --check-validity "$p" && echo "kept $p"; done`;
      const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, 'sh', nix, work, conf], {
        cwd: REPO,
        encoding: 'utf8',
        timeout: 180_000,
        env: { ...process.env, NIX_CONF_DIR: conf },
      });
      expect(r.status, r.stderr).toBe(0);
      const lines = r.stdout.trim().split('\n');
      const out = JSON.parse(lines.find((l) => l.startsWith('{'))!) as {
        drvs: Record<string, string>;
        validBefore: boolean;
        report: { added: number; present: number };
        owner: number;
        built: string;
        ifd: Record<string, string>;
      };
      expect(Object.keys(out.drvs).sort()).toEqual(['app', 'dep']);
      // Evaluated into the evaluation store only: the daemon's store had none of it.
      expect(out.validBefore).toBe(false);
      // Imported through the daemon: both .drv files and the builder script, now root's, as the daemon stores them.
      expect(out.report).toEqual({ added: 3, present: 0 });
      expect(out.owner).toBe(0);
      // Rooted with its commit through the daemon: the user may not write the store's gcroots itself.
      expect(lines).toContain(`root ${join(work, 'gcroots', out.drvs.app!.slice('/nix/store/'.length))}`);
      // And built by the daemon, in its sandbox.
      expect(out.built).toBe(`${tag} built\n`);
      // Evaluated through the daemon, which built what it imported, and rooted through it: the collector keeps it.
      expect(out.ifd.tool).toMatch(new RegExp(`-tool-${tag}-7\\.drv$`));
      expect(lines.some((l) => l.startsWith(`root ${join(work, 'roots-ifd')}/`))).toBe(true);
      expect(lines).toContain(`kept ${out.ifd.tool}`);
    },
  );
});
