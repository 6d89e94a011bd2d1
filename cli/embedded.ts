import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Agent } from '../agent/agent.js';
import { IllegalStateError } from '../common/errors.js';
import type { Logger } from '../common/logging.js';
import { PLATFORM } from '../common/platform.js';
import { Coordinator } from '../coordinator/coordinator.js';
import type { CoordinatorOptions } from '../coordinator/config.js';

/**
 * The embedded system: a coordinator plus local agents that reach it over loopback gRPC — the same protocol and
 * code path as remote agents. This module is the one place that knows both sides; `agent/` and `coordinator/`
 * never import each other.
 *
 * One agent runs in this process against the machine's Nix store. More agents (`--agents N`, as root) each run
 * as a child process in a private mount namespace with its own empty `/nix`, so derivations and outputs really
 * travel through the coordinator's binary cache, as they do between machines.
 */
export interface EmbeddedOptions {
  coordinator: CoordinatorOptions;
  agents: number;
  /** Build slots per agent; defaults to the coordinator's local_agent.max_jobs, then Nix's max-jobs. */
  maxJobs: number | undefined;
  logger: Logger;
  /** Where agent children send their pino output (fd); inherited stderr by default. */
  agentLogLevel?: string;
}

export class EmbeddedSystem {
  readonly coordinator: Coordinator;
  private readonly localAgents: Agent[] = [];
  private readonly children: ChildProcess[] = [];

  constructor(private readonly options: EmbeddedOptions) {
    this.coordinator = new Coordinator(options.coordinator, options.logger.child({ component: 'coordinator' }));
  }

  async start(): Promise<void> {
    await this.coordinator.start();
    const { agents } = this.options;
    // Separate stores need a mount namespace of their own: Linux, as root.
    const isolate = agents > 1 && PLATFORM === 'linux' && process.getuid?.() === 0;
    for (let i = 1; i <= agents; i++) {
      const agentId = `local-${i}`;
      const dir = join(this.options.coordinator.dataDir, 'agents', agentId);
      if (isolate) this.children.push(this.spawnIsolatedAgent(agentId, dir));
      else {
        const agent = new Agent({
          coordinator: this.coordinator.grpcTarget,
          token: this.coordinator.localAgentToken(agentId),
          maxJobs: this.options.maxJobs ?? null,
          nixSandbox: this.options.coordinator.localAgent.sandbox,
          spoolDir: join(dir, 'spool'),
          logger: this.options.logger.child({ component: 'agent', agentId }),
        });
        this.localAgents.push(agent);
        await agent.start();
      }
    }
    await this.coordinator.agentHub.waitForAgents(agents);
  }

  /** Cancels what runs, stops agents, then the coordinator. */
  async stop(): Promise<void> {
    await Promise.all(this.localAgents.map((a) => a.stopNow()));
    await Promise.all(
      this.children.map(
        (c) =>
          new Promise<void>((resolve) => {
            if (c.exitCode !== null || c.signalCode !== null) return resolve();
            c.once('exit', () => resolve());
            // The whole process group: the agent and the builds it runs.
            if (c.pid !== undefined) process.kill(-c.pid, 'SIGKILL');
          }),
      ),
    );
    await this.coordinator.stopNow();
  }

  private spawnIsolatedAgent(agentId: string, dir: string): ChildProcess {
    const child = spawnAgentProcess({
      coordinator: this.coordinator.grpcTarget,
      token: this.coordinator.localAgentToken(agentId),
      agentId,
      dir,
      isolated: true,
      maxJobs: this.options.maxJobs,
      extraArgs: ['--exit-with-parent', ...(this.options.coordinator.localAgent.sandbox ? ['--nix-sandbox'] : [])],
      logLevel: this.options.agentLogLevel,
    });
    child.on('exit', (code, signal) => {
      if (code !== 0 && signal !== 'SIGKILL')
        this.options.logger.warn({ agentId, code, signal }, 'agent process exited');
    });
    return child;
  }
}

export interface AgentProcessOptions {
  coordinator: string;
  token: string;
  agentId: string;
  /** The agent's own directory: `spool/` and, when isolated, `nix/` (its store) live here. */
  dir: string;
  /** In a private mount namespace with its own empty /nix (needs root). */
  isolated: boolean;
  maxJobs?: number | undefined;
  extraArgs?: string[];
  logLevel?: string | undefined;
  stdio?: 'inherit' | 'ignore' | 'pipe';
}

/** Starts `ekaci-agent` as a child process, optionally as a separate builder host with its own Nix store. */
export function spawnAgentProcess(o: AgentProcessOptions): ChildProcess {
  const main = agentMainPath();
  const args = [
    ...nodeArgsFor(main),
    main,
    '--coordinator',
    o.coordinator,
    '--id',
    o.agentId,
    '--spool-dir',
    join(o.dir, 'spool'),
    ...(o.maxJobs ? ['--max-jobs', String(o.maxJobs)] : []),
    ...(o.extraArgs ?? []),
  ];
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    EKACI_AGENT_TOKEN: o.token,
    EKACI_LOG_LEVEL: o.logLevel ?? process.env.EKACI_LOG_LEVEL ?? 'warn',
    // Nix keeps narinfos it uploaded in a per-user disk cache, carrying the uploader's (absent) signature;
    // another store of the same user would read them from there and refuse them. One cache per agent.
    XDG_CACHE_HOME: join(o.dir, 'cache'),
  };
  if (o.isolated) {
    // The nixbld users are the machine's, shared by every store on it: two stores taking the same build user
    // kill each other's builds. Isolated stores build as the agent's own user instead.
    env.NIX_CONFIG = `${process.env.NIX_CONFIG ?? ''}\nbuild-users-group =`;
  }
  const stdio = ['ignore', 'ignore', o.stdio ?? 'inherit'] as const;
  if (!o.isolated) return spawn(process.execPath, args, { stdio: [...stdio], env, detached: true });
  if (PLATFORM !== 'linux') throw new IllegalStateError('agents with stores of their own need Linux mount namespaces');
  const nixDir = join(o.dir, 'nix');
  mkdirSync(nixDir, { recursive: true });
  // A private mount namespace whose /nix is an empty directory of this agent's: its own store and database.
  return spawn(
    'unshare',
    [
      '--mount',
      '--propagation',
      'private',
      'sh',
      '-c',
      'mount --bind "$0" /nix && exec "$@"',
      nixDir,
      process.execPath,
      ...args,
    ],
    { stdio: [...stdio], env, detached: true },
  );
}

/** The command line that runs `ekaci-agent` with this Node: `[node, …flags, main]`. */
export function agentCommand(): string[] {
  const main = agentMainPath();
  return [process.execPath, ...nodeArgsFor(main), main];
}

/** Node flags to run `main`: TypeScript sources (development, tests) load through tsx. */
function nodeArgsFor(main: string): string[] {
  if (!main.endsWith('.ts')) return [];
  return ['--import', pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href];
}

/** The agent's entry point next to this module: `.ts` under tsx (development, tests), `.js` when built. */
export function agentMainPath(): string {
  const self = fileURLToPath(import.meta.url);
  return join(self, '..', '..', 'agent', `main${self.endsWith('.ts') ? '.ts' : '.js'}`);
}
