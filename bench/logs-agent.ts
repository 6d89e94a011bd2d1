/**
 * bench/logs-agent: the agent of bench/logs (agent/agent.ts, building with its own `nix-daemon --stdio`), in a
 * process of its own as on a builder host, so that the coordinator's process measures the coordinator alone.
 * Driven over the IPC channel by bench/logs.ts; with `profile` it records a CPU profile from `mark` to `stop`.
 * The environment it is forked with reaches its nix-daemon (`NIX_CONFIG`, as a host's nix.conf would).
 */
import type { Session } from 'node:inspector/promises';
import { fileURLToPath } from 'node:url';
import { Agent } from '../agent/agent.js';
import { silentLogger } from '../common/logging.js';
import type { ProfileSummary } from './fleet-stats.js';
import { startProfiler, stopProfiler } from './logs-host.js';

export type AgentCommand =
  | { type: 'start'; target: string; token: string; spoolDir: string; profileFile: string | null }
  | { type: 'mark' }
  | { type: 'stop' };

export type AgentReport =
  | { type: 'ready' }
  | { type: 'stopped'; cpuMs: number; profile: ProfileSummary | null }
  | { type: 'failed'; error: string };

const root = fileURLToPath(new URL('..', import.meta.url));
// With a callback, a message the bench can no longer take (it has gone) is dropped instead of ending this process.
const send = (m: AgentReport): void => void process.send?.(m, undefined, {}, () => undefined);

let agent: Agent | undefined;
let profiler: Session | undefined;
let profileFile: string | null = null;
let cpu = process.cpuUsage();

process.on('message', (command: AgentCommand) => {
  void handle(command).catch((err: unknown) =>
    send({ type: 'failed', error: err instanceof Error ? (err.stack ?? err.message) : String(err) }),
  );
});
// Its nix-daemon runs in a process group of its own: a signal to the bench's group does not reach it.
for (const signal of ['SIGINT', 'SIGTERM'] as const)
  process.on(signal, () => void stop().finally(() => process.exit(0)));
// A bench that died leaves no agent behind.
process.on('disconnect', () => void stop().finally(() => process.exit(0)));

async function handle(command: AgentCommand): Promise<void> {
  switch (command.type) {
    case 'start':
      profileFile = command.profileFile;
      agent = new Agent({
        coordinator: command.target,
        token: command.token,
        agentId: 'bench-logs',
        maxJobs: 1,
        store: 'local',
        spoolDir: command.spoolDir,
        logger: silentLogger(),
      });
      await agent.start();
      send({ type: 'ready' });
      return;
    case 'mark':
      cpu = process.cpuUsage();
      if (profileFile !== null) profiler = await startProfiler();
      return;
    case 'stop': {
      const used = process.cpuUsage(cpu);
      let profile: ProfileSummary | null = null;
      if (profiler && profileFile !== null) profile = await stopProfiler(profiler, profileFile, root);
      await stop();
      process.send?.({ type: 'stopped', cpuMs: (used.user + used.system) / 1000, profile } satisfies AgentReport, () =>
        process.exit(0),
      );
      return;
    }
  }
}

async function stop(): Promise<void> {
  await agent?.stopNow();
  agent = undefined;
}
