import { execFileSync } from 'node:child_process';
import { mkdirSync, readlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { distFile, hostProcesses, killHost, mountNamespaceOf, sleep, Watched } from './processes.js';

/**
 * `ekaci-agent` as a separate builder host: its own process in a private mount namespace whose `/nix` is an empty
 * directory of the test's (a single-user store of its own, as ENVIRONMENT.md describes), so everything it builds
 * or needs travels through the coordinator's binary cache. With `network`, it also has a network namespace of its
 * own, joined to the machine by a veth pair whose link a test can take down.
 */
export interface AgentSetup {
  name: string;
  token: string;
  /** The coordinator's gRPC endpoint, `host:port`. */
  coordinator: string;
  dir: string;
  maxJobs: number;
  features?: string[];
  network?: AgentNetwork;
  /** More environment for the agent (`NODE_OPTIONS` for a diagnosis, …). */
  env?: NodeJS.ProcessEnv;
}

export interface AgentNetwork {
  /** The machine's end of the veth pair (≤ 15 characters). */
  hostInterface: string;
  hostAddress: string;
  agentAddress: string;
}

export class AgentProcess {
  readonly watched: Watched;
  /** Mount namespaces of this host's processes (the agent's, its nix-daemons'), as seen so far. */
  private readonly namespaces = new Set<string>();

  private constructor(
    readonly setup: AgentSetup,
    watched: Watched,
  ) {
    this.watched = watched;
  }

  static async start(setup: AgentSetup): Promise<AgentProcess> {
    const main = await distFile('agent', 'main.js');
    const nix = join(setup.dir, 'nix');
    const go = join(setup.dir, 'network-ready');
    mkdirSync(nix, { recursive: true });
    if (!setup.network) writeFileSync(go, '');
    const args = [
      main,
      ...['--coordinator', setup.coordinator, '--id', setup.name, '--spool-dir', join(setup.dir, 'spool')],
      ...['--max-jobs', String(setup.maxJobs)],
      ...(setup.features ? ['--features', setup.features.join(',')] : []),
    ];
    // The network namespace exists once unshare has run; the agent starts only after its link is configured.
    const script = 'while [ ! -e "$0" ]; do sleep 0.05; done; mount --bind "$1" /nix && shift && exec "$@"';
    const watched = new Watched(
      setup.name,
      'unshare',
      [
        ...['--mount', '--propagation', 'private', ...(setup.network ? ['--net'] : []), 'sh', '-c', script],
        ...[go, nix, process.execPath, ...args],
      ],
      {
        PATH: process.env.PATH,
        HOME: setup.dir,
        EKACI_AGENT_TOKEN: setup.token,
        EKACI_LOG_LEVEL: 'info',
        // Nix's per-user narinfo disk cache would otherwise be shared between the agents' stores.
        XDG_CACHE_HOME: join(setup.dir, 'cache'),
        // The machine's nixbld users are shared by every store here: isolated stores build as the agent's user.
        NIX_CONFIG: 'build-users-group =',
        ...setup.env,
      },
    );
    const agent = new AgentProcess(setup, watched);
    for (let i = 0; i < 200 && mountNamespaceOf(watched.pid) === mountNamespaceOf(process.pid); i++) await sleep(10);
    agent.track();
    if (setup.network) {
      await agent.joinNetwork(setup.network);
      writeFileSync(go, '');
    }
    return agent;
  }

  get pid(): number {
    return this.watched.pid;
  }

  /** The agent's pid while it is the suite's child: a pid of a process that ended may belong to anyone by now. */
  private get roots(): number[] {
    return this.watched.running ? [this.pid] : [];
  }

  get name(): string {
    return this.setup.name;
  }

  /** Takes the agent's end of the veth pair down or up: packets stop or flow, the connections stay open. */
  setLink(up: boolean): void {
    this.inNetwork('ip', 'link', 'set', 'eth0', up ? 'up' : 'down');
  }

  /** Notes the namespaces of the host's processes now, so that cleaning up finds them after the agent is gone. */
  track(): number[] {
    return hostProcesses(this.roots, this.namespaces, this.setup.dir);
  }

  /** `kill -9` of the agent host: the agent, its nix-daemons and their builders. */
  kill9(): void {
    killHost(this.roots, this.namespaces, this.setup.dir);
  }

  cleanUp(): void {
    this.watched.killGroup('SIGKILL');
    killHost(this.roots, this.namespaces, this.setup.dir);
    if (this.setup.network) {
      try {
        execFileSync('ip', ['link', 'del', this.setup.network.hostInterface], { stdio: 'ignore' });
      } catch {
        // removed with the namespace
      }
    }
  }

  private async joinNetwork(n: AgentNetwork): Promise<void> {
    const pid = this.watched.pid;
    const own = readlinkSync('/proc/self/ns/net');
    for (let i = 0; i < 200 && readlinkSync(`/proc/${pid}/ns/net`) === own; i++) await sleep(10);
    if (readlinkSync(`/proc/${pid}/ns/net`) === own) throw new Error(`${this.name}: no network namespace of its own`);
    const ip = (...args: string[]): void => void execFileSync('ip', args, { stdio: ['ignore', 'ignore', 'pipe'] });
    ip('link', 'add', n.hostInterface, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', String(pid));
    ip('addr', 'add', `${n.hostAddress}/30`, 'dev', n.hostInterface);
    ip('link', 'set', n.hostInterface, 'up');
    this.inNetwork('ip', 'addr', 'add', `${n.agentAddress}/30`, 'dev', 'eth0');
    this.inNetwork('ip', 'link', 'set', 'eth0', 'up');
    this.inNetwork('ip', 'link', 'set', 'lo', 'up');
  }

  private inNetwork(...command: string[]): void {
    execFileSync('nsenter', ['-t', String(this.watched.pid), '-n', ...command], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
  }
}
