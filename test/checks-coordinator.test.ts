import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { silentLogger } from '../common/logging.js';
import { sseEvents } from '../common/sse.js';
import { type Assign, Outcome } from '../common/proto/ekaci/agent/v1/agent.js';
import type { CheckSpec } from '../coordinator/checks/check-manager.js';
import type { Coordinator } from '../coordinator/coordinator.js';
import { GitMirrors } from '../coordinator/git/git-mirrors.js';
import { RawAgent, startCoordinator } from './support/coordinator-harness.js';
import { tempDir } from './support/nix-project.js';

/**
 * The coordinator's side of repository checks, played against hand-driven agent streams: who gets a check, who may
 * download its source, and what becomes of its result, its log, a vanished agent and a restart.
 */

let coordinator: Coordinator | undefined;
const agents: RawAgent[] = [];

afterEach(async () => {
  for (const a of agents.splice(0)) a.close();
  await coordinator?.stopNow();
  coordinator = undefined;
});

function raw(name: string): { agent: RawAgent; token: string } {
  const token = coordinator!.tokens.create(name, 'test');
  const agent = new RawAgent(coordinator!.grpcTarget, token);
  agents.push(agent);
  return { agent, token };
}

const git = (cwd: string, ...args: string[]): string =>
  execFileSync('git', args, {
    cwd,
    encoding: 'utf8',
    env: {
      ...process.env,
      GIT_AUTHOR_NAME: 't',
      GIT_AUTHOR_EMAIL: 't@x',
      GIT_COMMITTER_NAME: 't',
      GIT_COMMITTER_EMAIL: 't@x',
    },
  }).trim();

/** A real repository with one commit, mirrored into the coordinator's data directory (before it starts). */
async function repository(dataDir: string): Promise<{ url: string; commit: string }> {
  const url = tempDir('ekaci-check-repo-');
  git(url, 'init', '-q', '-b', 'main');
  mkdirSync(join(url, 'src'));
  writeFileSync(join(url, 'src', 'lint.sh'), 'echo linting\n');
  writeFileSync(join(url, 'README'), 'a repository with a check\n');
  git(url, 'add', '.');
  git(url, 'commit', '-q', '-m', 'first');
  const commit = git(url, 'rev-parse', 'HEAD');
  const mirrors = new GitMirrors({ dir: join(dataDir, 'git'), logger: silentLogger() });
  await mirrors.fetch(url, [commit]);
  return { url, commit };
}

const spec = (over: Partial<CheckSpec> = {}): CheckSpec => ({
  name: 'lint',
  system: 'x86_64-linux',
  command: 'bash src/lint.sh',
  allowNetwork: false,
  roBind: ['src'],
  timeoutSeconds: 60,
  shellDrv: undefined,
  error: undefined,
  ...over,
});

async function setUp(overrides: Record<string, unknown> = {}): Promise<{ url: string; commit: string; ids: number[] }> {
  const dataDir = tempDir();
  const repo = await repository(dataDir);
  coordinator = await startCoordinator(dataDir, overrides);
  const ids = coordinator.checks.request({
    repo: 'local/checks',
    commit: repo.commit,
    cloneUrl: repo.url,
    checks: [spec()],
    untrusted: false,
    private: true,
    rerunFailed: false,
  });
  return { ...repo, ids };
}

function credit(a: RawAgent, slots = 1): void {
  a.send({ $case: 'credit', value: { freeSlots: slots, draining: false } });
}

function event(a: RawAgent, messageId: number, leaseId: string, e: NonNullable<Parameters<typeof eventOf>[0]>): void {
  a.send({ $case: 'jobEvent', value: { messageId, leaseId, event: eventOf(e) } });
}

function eventOf(
  e: { finished: { outcome: Outcome; exitCode?: number; error?: string; logBytes: number } } | 'started',
) {
  if (e === 'started') return { $case: 'started' as const, value: { startedAtMs: Date.now() } };
  return {
    $case: 'finished' as const,
    value: {
      error: '',
      outputs: [],
      pushes: [],
      outputsInCoordinatorStore: false,
      finishedAtMs: Date.now(),
      ...e.finished,
    },
  };
}

async function download(url: string, token: string | undefined): Promise<{ status: number; body: Buffer }> {
  const res = await fetch(url, token === undefined ? {} : { headers: { Authorization: `Bearer ${token}` } });
  return { status: res.status, body: Buffer.from(await res.arrayBuffer()) };
}

function tarListing(tar: Buffer): string[] {
  return execFileSync('tar', ['-t'], { input: tar, encoding: 'utf8' }).trim().split('\n').sort();
}

describe('repository checks on the coordinator', () => {
  it('gives a check only to an agent that runs checks, and its source only to the agent holding its lease', async () => {
    const { commit, ids } = await setUp({
      web: { port: 0, public: false },
      api_tokens: [{ name: 'r', token: 'api-token-for-reading-0001' }],
    });
    // An agent without a check sandbox asks first: the check stays queued for one that has it.
    const plain = raw('plain');
    plain.agent.hello({ runsChecks: false });
    await plain.agent.next('welcome');
    credit(plain.agent);
    const other = raw('other');
    other.agent.hello({ runsChecks: true });
    await other.agent.next('welcome');
    const runner = raw('runner');
    runner.agent.hello({ runsChecks: true, systems: ['x86_64-linux'] });
    await runner.agent.next('welcome');
    credit(runner.agent);

    const assign: Assign = await runner.agent.next('assign');

    expect(assign.check).toMatchObject({
      name: 'lint',
      command: 'bash src/lint.sh',
      allowNetwork: false,
      roBind: ['src'],
    });
    expect(assign.drvPath).toBe('');
    expect(assign.timeoutSeconds).toBe(60);
    expect(plain.agent.received.some((m) => m.msg?.$case === 'assign')).toBe(false);
    expect(coordinator!.checks.row(ids[0]!)!.state).toBe('running');

    const url = assign.check!.sourceUrl;
    const mine = await download(url, runner.token);
    expect(mine.status).toBe(200);
    expect(tarListing(mine.body)).toEqual(['README', 'src/', 'src/lint.sh']);
    const theirs = await download(url, other.token);
    expect(theirs.status).toBe(403);
    expect(theirs.body.toString()).toContain('agent other holds no open check lease');
    expect((await download(url, undefined)).status).toBe(401);
    expect((await download(url, 'api-token-for-reading-0001')).status).toBe(403);
    expect(
      coordinator!.audit
        .recent()
        .filter((e) => e.action === 'agent.source-refused')
        .map((e) => e.actor),
    ).toContain('agent:other');

    // The lease ends: its source is gone for its holder too.
    event(runner.agent, 1, assign.leaseId, 'started');
    runner.agent.send({
      $case: 'logChunk',
      value: { leaseId: assign.leaseId, offset: 0, data: Buffer.from('linting\nsrc/lint.sh: bad style\n') },
    });
    await runner.agent.next('logAck', (a) => a.storedBytes > 0);
    event(runner.agent, 2, assign.leaseId, {
      finished: { outcome: Outcome.OUTCOME_FAILED, exitCode: 3, error: 'exit code 3', logBytes: 31 },
    });
    const [row] = await coordinator!.checks.waitFor(ids);

    expect(row).toMatchObject({ state: 'failed', exit_code: 3, error: 'exit code 3', attempts: 1, agent_id: 'runner' });
    expect((await download(url, runner.token)).status).toBe(403);
    const [result] = coordinator!.checks.resultsOf('local/checks', commit);
    expect(result).toMatchObject({ name: 'lint', system: 'x86_64-linux', state: 'failed', exitCode: 3 });
    expect(result!.logTail).toBe('linting\nsrc/lint.sh: bad style');
  });

  it('stops a check whose output outgrows check_max_log_bytes, and fails it saying so', async () => {
    const { ids } = await setUp({ check_max_log_bytes: 100 });
    const { agent } = raw('runner');
    agent.hello({ runsChecks: true });
    await agent.next('welcome');
    credit(agent);
    const assign = await agent.next('assign');
    expect(assign.maxLogBytes).toBe(100);

    agent.send({ $case: 'logChunk', value: { leaseId: assign.leaseId, offset: 0, data: Buffer.alloc(250, 'y') } });
    const cancel = await agent.next('cancel');
    expect(cancel.leaseId).toBe(assign.leaseId);
    expect(cancel.reason).toContain('check_max_log_bytes (100 bytes)');
    event(agent, 1, assign.leaseId, { finished: { outcome: Outcome.OUTCOME_CANCELLED, logBytes: 250 } });
    const [row] = await coordinator!.checks.waitFor(ids);

    expect(row!.state).toBe('failed');
    expect(row!.error).toContain("the check's output exceeded check_max_log_bytes (100 bytes)");
    expect(row!.log_bytes).toBe(100);
  });

  it('runs a check again elsewhere when its agent vanishes, and keeps a running one across a coordinator restart', async () => {
    const { ids } = await setUp();
    const first = raw('first');
    first.agent.hello({ runsChecks: true });
    await first.agent.next('welcome');
    credit(first.agent);
    const lost = await first.agent.next('assign');
    first.agent.close();

    // No renewals: the lease lapses after its TTL and the check goes to the next agent, as attempt 2.
    const second = raw('second');
    second.agent.hello({ runsChecks: true });
    await second.agent.next('welcome');
    credit(second.agent);
    const retry = await second.agent.next('assign');
    expect(retry.attempt).toBe(2);
    expect(retry.leaseId).not.toBe(lost.leaseId);
    expect(coordinator!.checks.row(ids[0]!)!.error).toContain('lease expired: agent first stopped renewing it');

    // The coordinator restarts while the check runs; the agent comes back with it and keeps it.
    const dataDir = coordinator!.options.dataDir;
    await coordinator!.stopNow();
    coordinator = await startCoordinator(dataDir);
    const back = new RawAgent(coordinator.grpcTarget, second.token);
    agents.push(back);
    back.hello({ runsChecks: true, runningLeases: [{ leaseId: retry.leaseId, logBytes: 0 }] });
    const welcome = await back.next('welcome');

    expect(welcome.leaseDecisions).toEqual([{ leaseId: retry.leaseId, keep: true, logOffset: 0, reason: '' }]);
    event(back, 1, retry.leaseId, { finished: { outcome: Outcome.OUTCOME_SUCCEEDED, exitCode: 0, logBytes: 0 } });
    const [row] = await coordinator.checks.waitFor(ids);
    expect(row).toMatchObject({ state: 'succeeded', exit_code: 0, attempts: 2, agent_id: 'second' });
  });

  it('cancels a running check: the agent is told, and the check ends cancelled whatever the agent reports', async () => {
    const { commit, ids } = await setUp();
    const seen: string[] = [];
    coordinator!.events.subscribe(undefined, (e) => {
      if (e.event.type === 'check')
        seen.push(`${e.event.name}@${e.event.commit.slice(0, 7)}: ${e.event.state} (${e.visibility})`);
    });
    const { agent } = raw('runner');
    agent.hello({ runsChecks: true });
    await agent.next('welcome');
    credit(agent);
    const assign = await agent.next('assign');
    event(agent, 1, assign.leaseId, 'started');

    coordinator!.checks.cancel('local/checks', commit, 'a newer push');
    const cancel = await agent.next('cancel');
    expect(cancel).toMatchObject({ leaseId: assign.leaseId, reason: 'a newer push' });
    event(agent, 2, assign.leaseId, { finished: { outcome: Outcome.OUTCOME_FAILED, exitCode: 143, logBytes: 0 } });
    const [row] = await coordinator!.checks.waitFor(ids);

    expect(row).toMatchObject({ state: 'cancelled', error: 'a newer push' });
    // Pages that show the commit hear each change (a local repository's data is private).
    expect(seen).toEqual([
      `lint@${commit.slice(0, 7)}: running (private)`,
      `lint@${commit.slice(0, 7)}: cancelled (private)`,
    ]);
    const metrics = await (await fetch(`${coordinator!.publicUrl}/metrics`)).text();
    expect(metrics).toContain('ekaci_checks_finished_total{outcome="cancelled"} 1');
    expect(metrics).toMatch(/ekaci_check_duration_seconds_count\{outcome="cancelled"\} 1/);
  });

  it('serves a running check’s output live over the API, ending with its state and exit code', async () => {
    // A local repository is private data: an API token reads it.
    const { commit } = await setUp({ api_tokens: [{ name: 'r', token: 'api-token-for-reading-0002' }] });
    const auth = { Authorization: 'Bearer api-token-for-reading-0002' };
    const { agent } = raw('runner');
    agent.hello({ runsChecks: true });
    await agent.next('welcome');
    credit(agent);
    const assign = await agent.next('assign');
    event(agent, 1, assign.leaseId, 'started');
    agent.send({ $case: 'logChunk', value: { leaseId: assign.leaseId, offset: 0, data: Buffer.from('first line\n') } });
    await agent.next('logAck', (a) => a.storedBytes === 11);

    const url = `${coordinator!.publicUrl}/api/v1/repos/local/checks/commits/${commit}/checks/lint/log?follow=1`;
    const response = await fetch(url, { headers: auth });
    expect(response.status).toBe(200);
    const received: string[] = [];
    let end: Record<string, unknown> | undefined;
    for await (const e of sseEvents(response)) {
      if (e.event === 'log') {
        received.push(JSON.parse(e.data) as string);
        // The first chunk arrived live: the rest of the output and the result come after it.
        if (received.length === 1) {
          agent.send({
            $case: 'logChunk',
            value: { leaseId: assign.leaseId, offset: 11, data: Buffer.from('second line\n') },
          });
          await agent.next('logAck', (a) => a.storedBytes === 23);
          event(agent, 2, assign.leaseId, {
            finished: { outcome: Outcome.OUTCOME_FAILED, exitCode: 2, error: 'exit code 2', logBytes: 23 },
          });
        }
      } else if (e.event === 'end') {
        end = JSON.parse(e.data) as Record<string, unknown>;
        break;
      }
    }

    expect(received.join('')).toBe('first line\nsecond line\n');
    expect(end).toEqual({ attempt: 1, state: 'failed', exitCode: 2, error: 'exit code 2', bytes: 23 });
    // Not started, or no such check: a 404 that says which.
    const missing = await fetch(url.replace('/checks/lint/', '/checks/nope/'), { headers: auth });
    expect((await fetch(url)).status).toBe(401);
    expect(missing.status).toBe(404);
    expect(((await missing.json()) as { error: { message: string } }).error.message).toContain('has no check nope');
  });

  it('marks a check unbuildable without running it when its shell did not evaluate', async () => {
    const dataDir = tempDir();
    const repo = await repository(dataDir);
    coordinator = await startCoordinator(dataDir);
    const ids = coordinator.checks.request({
      repo: 'local/checks',
      commit: repo.commit,
      cloneUrl: repo.url,
      checks: [spec({ error: 'shell default.nix attribute devShell does not exist' })],
      untrusted: false,
      private: true,
      rerunFailed: false,
    });

    const [row] = await coordinator.checks.waitFor(ids);
    expect(row).toMatchObject({
      state: 'unbuildable',
      error: 'shell default.nix attribute devShell does not exist',
      attempts: 0,
    });
  });
});
