import { status } from '@grpc/grpc-js';
import { execFileSync } from 'node:child_process';
import { createHash, createPublicKey, verify } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NO_SUBSTITUTERS, runNixChecked } from '../common/nix/cli.js';
import { type NarInfo, fingerprint, nixBase32, parseNarInfo, serializeNarInfo } from '../common/nix/narinfo.js';
import { storePathHash } from '../common/nix/store-path.js';
import { Outcome } from '../common/proto/ekaci/agent/v1/agent.js';
import { narInfoName } from '../coordinator/cache/cache-layout.js';
import { LEASE_HEADER } from '../coordinator/cache/http-routes.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { RawAgent, startCoordinator } from './support/coordinator-harness.js';
import { nonce, tempDir, writeNixFile } from './support/nix-project.js';

/**
 * An agent's identity is its token, and it acts only for the leases it holds now (ARCHITECTURE.md §7): these tests
 * play an impostor with a valid token of its own, on a real coordinator over loopback gRPC.
 */

let coordinator: Coordinator | undefined;
const agents: RawAgent[] = [];

afterEach(async () => {
  for (const a of agents.splice(0)) a.close();
  await coordinator?.stopNow();
  coordinator = undefined;
});

function raw(token: string): RawAgent {
  const a = new RawAgent(coordinator!.grpcTarget, token);
  agents.push(a);
  return a;
}

async function drvOf(body: string): Promise<{ drv: string; out: string }> {
  const file = writeNixFile(tempDir(), nonce(), body);
  const drv = (await runNixChecked('nix-instantiate', [...NO_SUBSTITUTERS, file])).trim();
  const out = (await runNixChecked('nix-store', ['--query', '--outputs', drv])).trim();
  return { drv, out };
}

/** Whether a narinfo carries a valid signature of the key `name:base64`. */
function signedBy(publicKey: string, info: NarInfo): boolean {
  const [name, key] = publicKey.split(':') as [string, string];
  const spki = Buffer.concat([Buffer.from('302a300506032b6570032100', 'hex'), Buffer.from(key, 'base64')]);
  const k = createPublicKey({ key: spki, format: 'der', type: 'spki' });
  return info.sigs.some(
    (s) =>
      s.startsWith(`${name}:`) &&
      verify(null, Buffer.from(fingerprint(info)), k, Buffer.from(s.slice(name.length + 1), 'base64')),
  );
}

function finished(
  messageId: number,
  leaseId: string,
  outcome: Outcome,
  outputs: Array<{ name: string; path: string }>,
  outputsInCoordinatorStore = false,
) {
  return {
    $case: 'jobEvent' as const,
    value: {
      messageId,
      leaseId,
      event: {
        $case: 'finished' as const,
        value: {
          outcome,
          error: '',
          outputs: outputs.map((o) => ({ ...o, narSize: 1, closureSize: 1 })),
          finishedAtMs: Date.now(),
          pushes: [],
          outputsInCoordinatorStore,
          logBytes: 0,
        },
      },
    },
  };
}

describe('agent identity', () => {
  it('refuses a Hello that claims another agent, naming both', async () => {
    coordinator = await startCoordinator(tempDir());
    coordinator.tokens.create('builder-1', 'test');
    const impostor = raw(coordinator.tokens.create('builder-2', 'test'));
    impostor.hello({ agentId: 'builder-1' });

    const err = await impostor.next('error');

    expect(err.code).toBe('EKACI_ERR_AUTH');
    expect(err.message).toContain('"builder-2"');
    expect(err.message).toContain('"builder-1"');
    expect((await impostor.ended()).code).toBe(status.PERMISSION_DENIED);
    expect(coordinator.agentHub.agentCount).toBe(0);
  });

  it('names agents by their tokens, so two hosts with one hostname never replace each other', async () => {
    coordinator = await startCoordinator(tempDir());
    const a = raw(coordinator.tokens.create('host-a', 'test'));
    const b = raw(coordinator.tokens.create('host-b', 'test'));
    a.hello({ hostname: 'builder', agentId: 'host-a' });
    await a.next('welcome');
    b.hello({ hostname: 'builder' });
    await b.next('welcome');

    expect(coordinator.agentHub.agentCount).toBe(2);
    const rows = coordinator.db.prepare('SELECT agent_id, hostname FROM agents ORDER BY agent_id').all();
    expect(rows).toEqual([
      { agent_id: 'host-a', hostname: 'builder' },
      { agent_id: 'host-b', hostname: 'builder' },
    ]);
    expect(a.status).toBeUndefined();
  });

  it('closes a stream that sends no Hello in time, and a revoked token ends one still waiting', async () => {
    coordinator = await startCoordinator(tempDir(), { agent_hello_timeout_seconds: 0.3 });
    const silent = raw(coordinator.tokens.create('silent', 'test'));
    const end = await silent.ended();
    expect(end.code).toBe(status.DEADLINE_EXCEEDED);
    expect(end.details).toMatch(/no Hello within/);

    await coordinator.stopNow();
    coordinator = await startCoordinator(tempDir(), { agent_hello_timeout_seconds: 60 });
    const waiting = raw(coordinator.tokens.create('revoked', 'test'));
    // The stream is open once the coordinator answers anything; a heartbeat before Hello gets an error, so use a
    // second stream that does say Hello to know the server has accepted connections.
    const other = raw(coordinator.tokens.create('other', 'test'));
    other.hello();
    await other.next('welcome');
    coordinator.tokens.revoke('revoked', 'test');
    coordinator.agentHub.revoked('revoked');
    expect((await waiting.ended()).code).toBe(status.UNAUTHENTICATED);
    expect(other.status).toBeUndefined();
  });
});

describe('what an agent may report', () => {
  /** A coordinator, agent `holder` with a lease on `drv`, and an impostor agent with a valid token of its own. */
  async function leased(body: string) {
    coordinator = await startCoordinator(tempDir(), { lease_ttl_seconds: 30 });
    const { drv, out } = await drvOf(body);
    const holderToken = coordinator.tokens.create('holder', 'test');
    const holder = raw(holderToken);
    holder.hello();
    await holder.next('welcome');
    const impostor = raw(coordinator.tokens.create('impostor', 'test'));
    impostor.hello();
    await impostor.next('welcome');
    const request = await coordinator.manager.submit([{ attr: 'x', drvPath: drv }], 'test');
    holder.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    const lease = await holder.next('assign');
    return { holder, holderToken, impostor, lease, drv, out, request };
  }

  it('ignores results and logs sent for a lease another agent holds', async () => {
    const { impostor, lease, drv, out } = await leased('{ x = mk "x" {}; }');

    impostor.send({ $case: 'logChunk', value: { leaseId: lease.leaseId, offset: 0, data: Buffer.from('forged') } });
    impostor.send(finished(1, lease.leaseId, Outcome.OUTCOME_SUCCEEDED, [{ name: 'out', path: out }]));
    await impostor.next('ack', (x) => x.messageIds.includes(1));

    expect(coordinator!.store.derivation(drv)?.state).toBe('building');
    expect(coordinator!.store.attempt(lease.leaseId)?.state).toBe('assigned');
    const log = coordinator!.logs.pathFor(drv, 1);
    expect(existsSync(log) ? readFileSync(log, 'utf8') : '').toBe('');
    expect(coordinator!.store.outputsOf(drv).every((o) => o.nar_size === null)).toBe(true);
  });

  it('refuses a success whose outputs are not the derivation’s or are not in the cache, and builds it elsewhere', async () => {
    const { holder, impostor, lease, drv, out } = await leased('{ x = mk "x" {}; }');
    const fake = `/nix/store/${'0'.repeat(32)}-forged`;

    holder.send(finished(1, lease.leaseId, Outcome.OUTCOME_SUCCEEDED, [{ name: 'out', path: fake }]));
    await holder.next('ack', (x) => x.messageIds.includes(1));

    expect(coordinator!.store.attempt(lease.leaseId)?.state).toBe('infra-error');
    expect(coordinator!.store.attempt(lease.leaseId)?.error).toContain(`reported outputs (out=${fake})`);
    expect(coordinator!.store.derivation(drv)?.state).toBe('buildable');
    const refused = coordinator!.audit.recent().filter((r) => r.action === 'agent.result-refused');
    expect(refused).toHaveLength(1);
    expect(refused[0]!.actor).toBe('agent:holder');

    // Retried on the other agent; the right path this time, but never uploaded: nothing in the cache vouches for it.
    impostor.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    const again = await impostor.next('assign');
    expect(again.attempt).toBe(2);
    impostor.send(finished(2, again.leaseId, Outcome.OUTCOME_SUCCEEDED, [{ name: 'out', path: out }]));
    await impostor.next('ack', (x) => x.messageIds.includes(2));
    expect(coordinator!.store.attempt(again.leaseId)?.error).toContain('was not uploaded to the cache');
    expect(coordinator!.store.derivation(drv)?.state).not.toBe('succeeded');
  });

  it('copies outputs left in its own store into the cache, and refuses outputs that store does not hold', async () => {
    const { holder, impostor, lease, drv, out } = await leased('{ x = mk "x" {}; }');

    // Nothing built it: the coordinator's store does not hold the output the agent says it left there.
    holder.send(finished(1, lease.leaseId, Outcome.OUTCOME_SUCCEEDED, [{ name: 'out', path: out }], true));
    await holder.next('ack', (x) => x.messageIds.includes(1));
    expect(coordinator!.store.attempt(lease.leaseId)?.state).toBe('infra-error');
    expect(coordinator!.store.attempt(lease.leaseId)?.error).toContain(
      `${out} is not valid in the coordinator's Nix store`,
    );
    expect((await fetch(`${coordinator!.cacheUrl}/${narInfoName(storePathHash(out))}`)).status).toBe(404);

    // Built in the store the coordinator uses (this machine's): the retry's result stands, copied from there, signed.
    await runNixChecked('nix-store', ['--realise', drv, ...NO_SUBSTITUTERS]);
    impostor.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    const again = await impostor.next('assign');
    impostor.send(finished(2, again.leaseId, Outcome.OUTCOME_SUCCEEDED, [{ name: 'out', path: out }], true));
    await impostor.next('ack', (x) => x.messageIds.includes(2));
    expect(coordinator!.store.derivation(drv)?.state).toBe('succeeded');
    const narinfo = await fetch(`${coordinator!.cacheUrl}/${narInfoName(storePathHash(out))}`);
    expect(narinfo.status).toBe(200);
    const info = parseNarInfo(await narinfo.text());
    expect(signedBy(coordinator!.cachePublicKey, info)).toBe(true);
    const narSize = Number((await runNixChecked('nix-store', ['--query', '--size', out])).trim());
    expect(info.narSize).toBe(narSize);
  });

  it('refuses an upload under a fixed-output derivation’s path whose content is not the declared one', async () => {
    const content = `fixed-${nonce()}`;
    const sha = createHash('sha256').update(content).digest('hex');
    const { holderToken, lease, out } = await leased(
      `{ x = mk "fetched" { outputHashMode = "flat"; outputHashAlgo = "sha256"; outputHash = "${sha}";
           script = "printf '%s' '${content}' > $out"; }; }`,
    );
    const upload = async (body: string): Promise<Response> => {
      const file = join(tempDir(), 'x');
      writeFileSync(file, body);
      const nar = execFileSync('nix-store', ['--dump', file]);
      const hash = nixBase32(createHash('sha256').update(nar).digest());
      const headers = { Authorization: `Bearer ${holderToken}`, [LEASE_HEADER]: lease.leaseId };
      const put = (path: string, data: Buffer) =>
        fetch(`${coordinator!.cacheUrl}/${path}`, { method: 'PUT', headers, body: new Uint8Array(data) });
      expect((await put(`nar/${hash}.nar`, nar)).status).toBe(204);
      const info = {
        storePath: out,
        url: `nar/${hash}.nar`,
        compression: 'none',
        narHash: `sha256:${hash}`,
        narSize: nar.length,
        references: [],
        sigs: [],
      };
      return put(narInfoName(storePathHash(out)), Buffer.from(serializeNarInfo(info)));
    };

    // The lease holder may publish this path, but only with the content the derivation's hash names.
    const forged = await upload('not what was declared');
    expect(await forged.text()).toContain(`does not have the sha256 hash`);
    expect(forged.status).toBe(400);
    const stored = await fetch(`${coordinator!.cacheUrl}/${narInfoName(storePathHash(out))}`, {
      headers: { Authorization: `Bearer ${holderToken}` },
    });
    expect(stored.status).toBe(404);
    expect((await upload(content)).status).toBe(204);
  });
});

describe('untrusted code', () => {
  it('builds code from people without write access only on agents whose Nix sandbox is on', async () => {
    coordinator = await startCoordinator(tempDir(), { unbuildable_grace_seconds: 0 });
    const unsandboxed = raw(coordinator.tokens.create('open', 'test'));
    unsandboxed.hello({ sandboxed: false });
    await unsandboxed.next('welcome');
    unsandboxed.send({ $case: 'credit', value: { freeSlots: 2, draining: false } });
    const { drv } = await drvOf('{ x = mk "x" {}; }');

    const request = await coordinator.manager.submit([{ attr: 'x', drvPath: drv }], 'test', { untrusted: true });
    const [result] = await coordinator.manager.waitFor(request);

    expect(result?.state).toBe('unbuildable');
    expect(result?.error).toMatch(
      /no connected agent with Nix's sandbox on builds .*allow_unsandboxed_untrusted_builds/,
    );
    expect(coordinator.store.attemptsOf(drv)).toEqual([]);
    expect(unsandboxed.received.some((m) => m.msg?.$case === 'assign')).toBe(false);

    // A sandboxed agent takes it when asked again.
    const sandboxed = raw(coordinator.tokens.create('sandboxed', 'test'));
    sandboxed.hello({ sandboxed: true });
    await sandboxed.next('welcome');
    sandboxed.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    await coordinator.manager.submit([{ attr: 'x', drvPath: drv }], 'test', { untrusted: true });
    expect((await sandboxed.next('assign')).drvPath).toBe(drv);
  });

  it('lets any agent build it once a trusted request wants the same derivation', async () => {
    coordinator = await startCoordinator(tempDir(), { unbuildable_grace_seconds: 3600 });
    const unsandboxed = raw(coordinator.tokens.create('open', 'test'));
    unsandboxed.hello({ sandboxed: false });
    await unsandboxed.next('welcome');
    const { drv } = await drvOf('{ x = mk "x" {}; }');
    await coordinator.manager.submit([{ attr: 'x', drvPath: drv }], 'pull request', { untrusted: true });
    expect(coordinator.store.derivation(drv)?.untrusted).toBe(1);

    await coordinator.manager.submit([{ attr: 'x', drvPath: drv }], 'push to main');
    unsandboxed.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });

    expect((await unsandboxed.next('assign')).drvPath).toBe(drv);
    expect(coordinator.store.derivation(drv)?.untrusted).toBe(0);
  });

  it('gives untrusted code to an unsandboxed agent when the server allows it', async () => {
    coordinator = await startCoordinator(tempDir(), { security: { allow_unsandboxed_untrusted_builds: true } });
    const unsandboxed = raw(coordinator.tokens.create('open', 'test'));
    unsandboxed.hello({ sandboxed: false });
    await unsandboxed.next('welcome');
    unsandboxed.send({ $case: 'credit', value: { freeSlots: 1, draining: false } });
    const { drv } = await drvOf('{ x = mk "x" {}; }');

    await coordinator.manager.submit([{ attr: 'x', drvPath: drv }], 'test', { untrusted: true });

    expect((await unsandboxed.next('assign')).drvPath).toBe(drv);
  });
});
