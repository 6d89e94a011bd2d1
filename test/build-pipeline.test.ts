import type { ChildProcess } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { status } from '@grpc/grpc-js';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { Agent } from '../agent/agent.js';
import { spawnAgentProcess } from '../cli/embedded.js';
import { sleep } from '../common/backoff.js';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import { silentLogger } from '../common/logging.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { NO_EXTRA_POLICY } from '../coordinator/eval/eval-options.js';
import { instantiate } from '../coordinator/eval/instantiate.js';
import { testEvalEnvironment } from './support/eval-environment.js';
import type { BuildResult } from '../coordinator/scheduler/build-manager.js';
import { killGroup } from './support/cli.js';
import { RawAgent, startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

const isRoot = process.getuid?.() === 0;

let coordinator: Coordinator | undefined;
const agents: Agent[] = [];
const children: ChildProcess[] = [];

afterEach(async () => {
  for (const c of children.splice(0)) killGroup(c);
  await Promise.all(agents.splice(0).map((a) => a.stopNow()));
  await coordinator?.stopNow();
  coordinator = undefined;
});

async function localAgent(
  agentId: string,
  extra: Partial<ConstructorParameters<typeof Agent>[0]> = {},
): Promise<Agent> {
  const agent = new Agent({
    coordinator: coordinator!.grpcTarget,
    token: coordinator!.localAgentToken(agentId),
    agentId,
    maxJobs: 2,
    spoolDir: join(tempDir(), 'spool'),
    logger: silentLogger(),
    ...extra,
  });
  agents.push(agent);
  await agent.start();
  return agent;
}

/** A separate builder host: an agent process with its own empty /nix in a private mount namespace. */
function isolatedAgent(agentId: string, extraArgs: string[] = []): ChildProcess {
  const child = spawnAgentProcess({
    coordinator: coordinator!.grpcTarget,
    token: coordinator!.localAgentToken(agentId),
    agentId,
    dir: tempDir(`ekaci-${agentId}-`),
    isolated: true,
    maxJobs: 1,
    extraArgs,
    logLevel: 'error',
  });
  children.push(child);
  return child;
}

async function build(body: string, attrs: string[]): Promise<Record<string, BuildResult>> {
  const file = writeNixFile(tempDir(), nonce(), body);
  const roots = await instantiate(file, attrs, await testEvalEnvironment(), NO_EXTRA_POLICY);
  const request = await coordinator!.manager.submit(roots, 'test');
  const results = await coordinator!.manager.waitFor(request);
  return Object.fromEntries(results.map((r) => [r.attr, r]));
}

function attemptsOf(drvPath: string): Array<{ agent_id: string; state: string }> {
  return coordinator!.store.attemptsOf(drvPath);
}

describe('building derivations on agents', () => {
  it.skipIf(!isRoot)(
    'builds a diamond across two hosts with separate stores, moving outputs through the coordinator cache',
    async () => {
      coordinator = await startCoordinator(tempDir());
      // Features pin each derivation to one host, so every edge of the diamond crosses between stores.
      isolatedAgent('host-a', ['--features', 'side-a']);
      isolatedAgent('host-b', ['--features', 'side-b']);
      await coordinator.agentHub.waitForAgents(2);
      const r = await build(
        `rec {
          base = mk "base" { script = "echo base > $out"; requiredSystemFeatures = [ "side-b" ]; };
          left = mk "left" { deps = [ base ]; script = "read b < \${base}; echo left-$b \${base} > $out"; requiredSystemFeatures = [ "side-a" ]; };
          right = mk "right" { deps = [ base ]; script = "read b < \${base}; echo right-$b \${base} > $out"; requiredSystemFeatures = [ "side-b" ]; };
          top = mk "top" { deps = [ left right ]; script = "read l < \${left}; read r < \${right}; echo $l $r \${left} \${right} > $out"; requiredSystemFeatures = [ "side-a" ]; };
        }`,
        ['base', 'left', 'right', 'top'],
      );
      for (const attr of ['base', 'left', 'right', 'top'])
        expect(
          r[attr]?.state,
          `${attr}: ${r[attr]?.error} ${readFileSync(coordinator.logs.pathFor(r[attr]!.drvPath, 1), 'utf8')}`,
        ).toBe('succeeded');
      expect(r.base?.agent).toBe('host-b');
      expect(r.left?.agent).toBe('host-a');
      expect(r.right?.agent).toBe('host-b');
      expect(r.top?.agent).toBe('host-a');
      const top = r.top!.outputs[0]!;
      expect(top.narSize).toBeGreaterThan(0);
      // top's output refers to left and right, which refer to base: its closure holds all four
      const nar = (attr: string): number => r[attr]!.outputs[0]!.narSize!;
      expect(top.closureSize).toBe(nar('top') + nar('left') + nar('right') + nar('base'));
      // The coordinator's store never built it; its content comes from the cache, as the agents left it.
      const cached = coordinator.store.outputsOf(r.top!.drvPath);
      expect(cached[0]?.path).toBe(top.path);
      const log = readFileSync(coordinator.logs.pathFor(r.top!.drvPath, 1), 'utf8');
      expect(log).toMatch(/copying path .*right/);
    },
  );

  it.skipIf(!isRoot)('moves a build whose agent dies mid-build to the other agent once the lease expires', async () => {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 2 });
    const hosts = new Map([
      ['host-a', isolatedAgent('host-a')],
      ['host-b', isolatedAgent('host-b')],
    ]);
    await coordinator.agentHub.waitForAgents(2);
    const file = writeNixFile(
      tempDir(),
      nonce(),
      `{ slow = mk "slow" { script = "echo starting; /bin/sleep 4; echo done > $out"; }; }`,
    );
    const [root] = await instantiate(file, ['slow'], await testEvalEnvironment(), NO_EXTRA_POLICY);
    const request = await coordinator.manager.submit([root!], 'test');
    let first: { agent_id: string; state: string } | undefined;
    // Wait until the build runs and its first log line has reached the coordinator.
    const firstLog = (): string => coordinator!.logs.read(coordinator!.logs.pathFor(root!.drvPath, 1)).toString();
    while (
      !(first = attemptsOf(root!.drvPath).find((a) => a.state === 'started')) ||
      !firstLog().includes('starting')
    ) {
      await sleep(50);
    }
    killGroup(hosts.get(first.agent_id)!);
    const [result] = await coordinator.manager.waitFor(request);
    expect(result?.state).toBe('succeeded');
    expect(result?.attempts).toBe(2);
    const attempts = attemptsOf(root!.drvPath);
    expect(attempts.map((a) => a.state)).toEqual(['lost', 'succeeded']);
    expect(attempts[1]?.agent_id).not.toBe(first.agent_id);
    // Each attempt keeps its own log: the retry did not overwrite what the lost attempt had sent.
    for (const attempt of [1, 2]) {
      expect(readFileSync(coordinator.logs.pathFor(root!.drvPath, attempt), 'utf8')).toContain('starting');
    }
  });

  it('stops a silent build at max-silent-time and records it as timed out', async () => {
    coordinator = await startCoordinator(tempDir(), { build_no_output_timeout_seconds: 1 });
    await localAgent('local');
    const r = await build(`{ quiet = mk "quiet" { script = "/bin/sleep 30; echo > $out"; }; }`, ['quiet']);
    expect(r.quiet?.state).toBe('timed-out');
    expect(r.quiet?.attempts).toBe(1);
  });

  it('reports a derivation that needs a feature no agent has as unbuildable, and its dependents as dependency-failed', async () => {
    coordinator = await startCoordinator(tempDir(), { unbuildable_grace_seconds: 0 });
    await localAgent('local');
    const r = await build(
      `rec {
        gpu = mk "gpu" { requiredSystemFeatures = [ "cuda-h100" ]; };
        report = mk "report" { deps = [ gpu ]; };
        fine = mk "fine" { };
      }`,
      ['gpu', 'report', 'fine'],
    );
    expect(r.gpu?.state).toBe('unbuildable');
    expect(r.gpu?.error).toMatch(/no connected agent builds .* with features cuda-h100/);
    expect(r.report?.state).toBe('dependency-failed');
    expect(r.report?.rootCause).toBe(r.gpu?.drvPath);
    expect(r.fine?.state).toBe('succeeded');
  });

  it('makes the thousands of dependents of one success buildable a slice per write, all of them in the end', async () => {
    coordinator = await startCoordinator(tempDir(), { unbuildable_grace_seconds: 3600 });
    await localAgent('local');
    // 1,100 dependents of one root; they need a feature no agent here has, so they stay buildable.
    const file = writeNixFile(
      tempDir(),
      nonce(),
      `let root = mk "root" {}; in { inherit root; } // builtins.listToAttrs (builtins.genList (i: {
         name = "d\${toString i}"; value = mk "d\${toString i}" { deps = [ root ]; requiredSystemFeatures = [ "cuda" ]; };
       }) 1100)`,
    );
    const all = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file])).trim().split('\n');
    const root = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', 'root'])).trim();
    expect(all).toHaveLength(1101);
    const buildable = () =>
      (
        coordinator!.store.db
          .prepare("SELECT COUNT(*) AS n FROM derivations WHERE state = 'buildable' AND drv_path != ?")
          .get(root) as { n: number }
      ).n;
    let atRootSuccess: number | undefined;
    coordinator.manager.on('state', (drvPath: string, state: string) => {
      // Told right after the root's write committed, before the next slice's.
      if (drvPath === root && state === 'succeeded') atRootSuccess = buildable();
    });
    await coordinator.manager.submit(
      all.map((drvPath, i) => ({ attr: `a${i}`, drvPath })),
      'test',
    );

    await expect.poll(buildable).toBe(1100);
    expect(atRootSuccess).toBe(1000);
    expect(coordinator.manager.queues([]).lanes[0]).toMatchObject({ features: ['cuda'], buildable: 1100 });
  });

  it('fails the thousands of dependents of one failure a slice per write, and a restart between slices fails the rest', async () => {
    coordinator = await startCoordinator(tempDir(), { unbuildable_grace_seconds: 3600 });
    await localAgent('local');
    const file = writeNixFile(
      tempDir(),
      nonce(),
      `let root = mk "root" { script = "exit 3"; }; in { inherit root; } // builtins.listToAttrs (builtins.genList (i: {
         name = "d\${toString i}"; value = mk "d\${toString i}" { deps = [ root ]; };
       }) 1100)`,
    );
    const all = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file])).trim().split('\n');
    const root = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file, '-A', 'root'])).trim();
    const count = (c: Coordinator, states: string) =>
      (
        c.store.db
          .prepare(`SELECT COUNT(*) AS n FROM derivations WHERE state IN (${states}) AND drv_path != ?`)
          .get(root) as { n: number }
      ).n;
    const dataDir = tempDir();
    let atRootFailure: number | undefined;
    coordinator.manager.on('state', (drvPath: string, state: string) => {
      if (drvPath !== root || state !== 'failed') return;
      // Told right after the failure's write committed, before the next slice's: the database a coordinator killed
      // now would restart on.
      atRootFailure = count(coordinator!, "'dependency-failed'");
      coordinator!.store.db.prepare('VACUUM INTO ?').run(join(dataDir, 'ekaci.sqlite'));
    });

    const results = await coordinator.manager.waitFor(
      await coordinator.manager.submit(
        all.map((drvPath, i) => ({ attr: `a${i}`, drvPath })),
        'test',
      ),
    );

    expect(results.filter((r) => r.state === 'dependency-failed' && r.rootCause === root)).toHaveLength(1100);
    expect(atRootFailure).toBe(1000);
    await coordinator.stopNow();
    coordinator = await startCoordinator(dataDir, { unbuildable_grace_seconds: 3600 });
    expect(count(coordinator, "'dependency-failed'")).toBe(1100);
    expect(count(coordinator, "'queued', 'buildable', 'building'")).toBe(0);
    expect(coordinator.manager.pendingCount).toBe(0);
  });

  it('fails dependents of a failed build with the root cause, without retrying the failure', async () => {
    coordinator = await startCoordinator(tempDir());
    await localAgent('local');
    const r = await build(
      `rec {
        broken = mk "broken" { script = "echo something went wrong; exit 3"; };
        user = mk "user" { deps = [ broken ]; };
        app = mk "app" { deps = [ user ]; };
      }`,
      ['broken', 'user', 'app'],
    );
    expect(r.broken?.state).toBe('failed');
    expect(r.broken?.attempts).toBe(1);
    expect(r.user?.state).toBe('dependency-failed');
    expect(r.app?.state).toBe('dependency-failed');
    expect(r.app?.rootCause).toBe(r.broken?.drvPath);
    expect(readFileSync(coordinator.logs.pathFor(r.broken!.drvPath, 1), 'utf8')).toContain('something went wrong');
    // Requested again: the failure is remembered, not rebuilt.
    const again = await coordinator.manager.waitFor(
      await coordinator.manager.submit([{ attr: 'broken', drvPath: r.broken!.drvPath }], 'test'),
    );
    expect(again[0]?.state).toBe('failed');
    expect(attemptsOf(r.broken!.drvPath)).toHaveLength(1);
  });

  it('serves agents over TLS when configured with a certificate', async () => {
    const dir = tempDir();
    const [key, cert] = [join(dir, 'key.pem'), join(dir, 'cert.pem')];
    execFileSync(
      'openssl',
      [
        ...['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=localhost'],
        ...['-addext', 'subjectAltName=DNS:localhost', '-keyout', key, '-out', cert],
      ],
      { stdio: 'ignore' },
    );
    coordinator = await startCoordinator(join(dir, 'data'), {
      grpc: { port: 0, tls_cert_file: cert, tls_key_file: key },
    });
    await localAgent('tls', { tlsCaPath: cert, coordinator: `localhost:${coordinator.grpcPort}` });
    const r = await build(`{ secure = mk "secure" { }; }`, ['secure']);
    expect(r.secure?.state, r.secure?.error ?? '').toBe('succeeded');
    // Without the certificate, the agent cannot even start its stream.
    const plain = new RawAgent(`localhost:${coordinator.grpcPort}`, coordinator.localAgentToken('plain'));
    plain.hello();
    expect((await plain.ended()).code).toBe(status.UNAVAILABLE);
    plain.close();
  });

  it('requires a client certificate from agents when configured for mutual TLS', async () => {
    const dir = tempDir();
    const pem = (name: string): string => join(dir, name);
    const openssl = (...args: string[]): void => void execFileSync('openssl', args, { stdio: 'ignore' });
    // A server certificate, and a CA that signs the agents' client certificates.
    openssl(
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '1',
      '-subj',
      '/CN=localhost',
      '-addext',
      'subjectAltName=DNS:localhost',
      '-keyout',
      pem('server.key'),
      '-out',
      pem('server.crt'),
    );
    openssl(
      'req',
      '-x509',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-days',
      '1',
      '-subj',
      '/CN=agents-ca',
      '-keyout',
      pem('ca.key'),
      '-out',
      pem('ca.crt'),
    );
    openssl(
      'req',
      '-newkey',
      'rsa:2048',
      '-nodes',
      '-subj',
      '/CN=mtls',
      '-keyout',
      pem('agent.key'),
      '-out',
      pem('agent.csr'),
    );
    openssl(
      'x509',
      '-req',
      '-in',
      pem('agent.csr'),
      '-CA',
      pem('ca.crt'),
      '-CAkey',
      pem('ca.key'),
      '-CAcreateserial',
      '-days',
      '1',
      '-out',
      pem('agent.crt'),
    );
    coordinator = await startCoordinator(join(dir, 'data'), {
      grpc: {
        port: 0,
        tls_cert_file: pem('server.crt'),
        tls_key_file: pem('server.key'),
        client_ca_file: pem('ca.crt'),
      },
    });
    const target = `localhost:${coordinator.grpcPort}`;

    await localAgent('mtls', {
      coordinator: target,
      tlsCaPath: pem('server.crt'),
      tlsCertPath: pem('agent.crt'),
      tlsKeyPath: pem('agent.key'),
    });
    const r = await build(`{ mutual = mk "mutual" { }; }`, ['mutual']);
    expect(r.mutual?.state, r.mutual?.error ?? '').toBe('succeeded');

    // The same token without a certificate gets no stream at all.
    const without = new Agent({
      coordinator: target,
      token: coordinator.localAgentToken('mtls'),
      tlsCaPath: pem('server.crt'),
      spoolDir: join(tempDir(), 'spool'),
      logger: silentLogger(),
      backoffBaseMs: 20,
      backoffCapMs: 50,
    });
    agents.push(without);
    const disconnected = new Promise<string>((resolve) => without.once('disconnected', resolve));
    void without.start().catch(() => undefined);
    expect(await disconnected).toMatch(/UNAVAILABLE|handshake|certificate|14/i);
    expect(coordinator.agentHub.agentCount).toBe(1);
  });

  it('finds outputs that are already built without building them again', async () => {
    coordinator = await startCoordinator(tempDir());
    await localAgent('local');
    const body = `rec { a = mk "a" {}; b = mk "b" { deps = [ a ]; }; }`;
    const file = writeNixFile(tempDir(), nonce(), body);
    const roots = await instantiate(file, ['a', 'b'], await testEvalEnvironment(), NO_EXTRA_POLICY);
    const first = await coordinator.manager.waitFor(await coordinator.manager.submit(roots, 'test'));
    expect(first.map((x) => x.state)).toEqual(['succeeded', 'succeeded']);
    await coordinator.stopNow();
    // A new coordinator with an empty database: the outputs are valid in the local store and are found in one query.
    coordinator = await startCoordinator(tempDir());
    const second = await coordinator.manager.waitFor(await coordinator.manager.submit(roots, 'test'));
    expect(second.map((x) => x.state)).toEqual(['substituted', 'substituted']);
  });
});
