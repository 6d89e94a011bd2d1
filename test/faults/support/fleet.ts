import { mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from '../../support/nix-project.js';
import { AgentProcess, type AgentSetup } from './agent-process.js';
import { CoordinatorProcess, type CoordinatorSetup, type RequestStatus } from './coordinator-process.js';
import { sleep, type Watched } from './processes.js';

/** An external coordinator and its agent hosts, all cleaned up together. */
export class Fleet {
  readonly dir = tempDir('ekaci-faults-');
  readonly coordinator: CoordinatorProcess;
  readonly agents: AgentProcess[] = [];

  constructor(setup: Omit<CoordinatorSetup, 'dir'>) {
    this.coordinator = new CoordinatorProcess({ ...setup, dir: join(this.dir, 'coordinator') });
  }

  /** A directory for a test's gate files (see gatedScript), removed with the fleet. */
  gate(): string {
    const dir = join(this.dir, 'gate');
    mkdirSync(dir, { recursive: true });
    return dir;
  }

  /** Ports and configuration, before anything starts: agents may dial before the coordinator listens. */
  prepare(): Promise<void> {
    return this.coordinator.prepare();
  }

  async startAgent(
    name: string,
    options: Partial<Omit<AgentSetup, 'name' | 'token' | 'dir'>> = {},
  ): Promise<AgentProcess> {
    await this.coordinator.prepare();
    const token = this.coordinator.tokens.get(name);
    if (!token) throw new Error(`no token for ${name}: name it in the fleet's agents`);
    const agent = await AgentProcess.start({
      name,
      token,
      coordinator: this.coordinator.grpcTarget,
      dir: join(this.dir, name),
      maxJobs: 2,
      ...options,
    });
    this.agents.push(agent);
    return agent;
  }

  /** Waits until the current coordinator process has welcomed these agents (each since `from` of its log). */
  async connected(names: readonly string[], from = 0): Promise<void> {
    const c = this.coordinator.current;
    for (const name of names) await connectedTo(c, name, from);
  }

  /**
   * Polls a request until it settles; `onProgress` sees every answer. Answers fail while the coordinator is down.
   * The deadline only guards against a hang, and says how far the request got.
   */
  async settle(
    id: number,
    onProgress: (s: RequestStatus) => Promise<void> | void = () => {},
    deadlineMs = 600_000,
  ): Promise<RequestStatus> {
    const deadline = Date.now() + deadlineMs;
    let last: RequestStatus | undefined;
    for (;;) {
      if (Date.now() > deadline) throw new Error(`request ${id} did not settle: ${await this.whyUnsettled(last)}`);
      let status: RequestStatus | undefined;
      try {
        status = await this.coordinator.request(id);
      } catch (err) {
        if (!this.coordinator.current.running) {
          throw new Error(`the coordinator exited while building:\n${this.coordinator.current.tail()}`, {
            cause: err,
          });
        }
      }
      if (status) {
        last = status;
        await onProgress(status);
        if (status.settled) return status;
      }
      await sleep(200);
    }
  }

  /** What a request that does not settle waits for: its unfinished builds, their attempts, what agents said of them. */
  private async whyUnsettled(last: RequestStatus | undefined): Promise<string> {
    if (!last) return `no answer; the coordinator said:\n${this.coordinator.current.tail()}`;
    const lines = [JSON.stringify(countStates(last))];
    for (const b of last.builds.filter((x) => x.state === 'building').slice(0, 3)) {
      const attempts = await this.coordinator.derivation(b.drvPath).then(
        (d) => d.attempts,
        () => [],
      );
      lines.push(`${b.drvPath} is building: ${JSON.stringify(attempts)}`);
      for (const a of attempts) {
        for (const agent of this.agents) {
          const said = agent.watched.lines.filter((l) => l.raw.includes(a.lease_id)).map((l) => l.raw);
          if (said.length > 0) lines.push(`${agent.name} on lease ${a.lease_id}:\n${said.slice(-8).join('\n')}`);
        }
        const coordinator = this.coordinator.current.lines.filter((l) => l.raw.includes(a.lease_id)).map((l) => l.raw);
        if (coordinator.length > 0)
          lines.push(`coordinator on lease ${a.lease_id}:\n${coordinator.slice(-8).join('\n')}`);
      }
    }
    lines.push(`the coordinator said:\n${this.coordinator.current.tail(15)}`);
    return lines.join('\n');
  }

  /** Ends every process of the fleet and removes its directory (agents' stores, the coordinator's data). */
  cleanUp(): void {
    for (const a of this.agents) a.cleanUp();
    this.coordinator.cleanUp();
    rmSync(this.dir, { recursive: true, force: true, maxRetries: 5 });
  }
}

export function connectedTo(c: Watched, agent: string, from = 0): Promise<unknown> {
  return c.waitForLine(
    `agent ${agent} connected`,
    (l) => typeof l.msg === 'string' && l.msg.startsWith('agent connected') && l.agentId === agent,
    from,
  );
}

export function countStates(s: RequestStatus): Record<string, number> {
  const out: Record<string, number> = {};
  for (const b of s.builds) out[b.state] = (out[b.state] ?? 0) + 1;
  return out;
}
