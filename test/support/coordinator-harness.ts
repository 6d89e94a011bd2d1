import { join } from 'node:path';
import { credentials, Metadata } from '@grpc/grpc-js';
import { clientChannelOptions } from '../../common/grpc-options.js';
import { silentLogger } from '../../common/logging.js';
import {
  type AgentMessage,
  AgentServiceClient,
  type CoordinatorMessage,
  type Hello,
  type Outcome,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { PROTOCOL_VERSION } from '../../common/protocol-version.js';
import { compileCoordinatorConfig } from '../../coordinator/config.js';
import { Coordinator } from '../../coordinator/coordinator.js';
import { Agent } from '../../agent/agent.js';
import { tempDir } from './nix-project.js';

/** A coordinator on loopback ports chosen by the OS, in its own data directory, with test-sized timings. */
export async function startCoordinator(dataDir: string, overrides: Record<string, unknown> = {}): Promise<Coordinator> {
  const options = compileCoordinatorConfig(
    {
      data_dir: dataDir,
      lease_ttl_seconds: 2,
      unbuildable_grace_seconds: 0,
      web: { port: 0 },
      grpc: { port: 0 },
      ...overrides,
    },
    'test',
  );
  const c = new Coordinator(options, silentLogger());
  await c.start();
  return c;
}

type Msg = NonNullable<CoordinatorMessage['msg']>;
type Kind = Msg['$case'];
type ValueOf<K extends Kind> = Extract<Msg, { $case: K }>['value'];

/**
 * A hand-driven agent stream: the test writes protocol messages and reads the coordinator's answers, to check
 * the coordinator's side of the contract message by message.
 */
export class RawAgent {
  readonly received: CoordinatorMessage[] = [];
  readonly client: AgentServiceClient;
  readonly call;
  status: { code: number; details: string } | undefined;
  private waiters: Array<() => void> = [];

  constructor(target: string, token: string | undefined) {
    this.client = new AgentServiceClient(target, credentials.createInsecure(), clientChannelOptions);
    const md = new Metadata();
    if (token !== undefined) md.set('authorization', `Bearer ${token}`);
    this.call = this.client.connect(md);
    this.call.on('data', (m: CoordinatorMessage) => {
      this.received.push(m);
      this.notify();
    });
    this.call.on('error', (e: { code: number; details: string }) => {
      this.status = { code: e.code, details: e.details };
      this.notify();
    });
    this.call.on('status', (s: { code: number; details: string }) => {
      this.status ??= { code: s.code, details: s.details };
      this.notify();
    });
  }

  send(msg: AgentMessage['msg']): void {
    this.call.write({ msg });
  }

  /** Reports a lease's build as ended with `outcome`, with no outputs. */
  finished(messageId: number, leaseId: string, outcome: Outcome, error = ''): void {
    this.send({
      $case: 'jobEvent',
      value: {
        messageId,
        leaseId,
        event: {
          $case: 'finished',
          value: {
            outcome,
            error,
            outputs: [],
            finishedAtMs: Date.now(),
            logBytes: 0,
            pushes: [],
            outputsInCoordinatorStore: false,
          },
        },
      },
    });
  }

  hello(overrides: Partial<Hello> = {}): void {
    this.send({
      $case: 'hello',
      value: {
        agentId: '',
        protocolVersion: PROTOCOL_VERSION,
        nixVersion: '2.8.0',
        hostname: 'raw',
        os: 'linux',
        systems: ['x86_64-linux'],
        supportedFeatures: [],
        mandatoryFeatures: [],
        maxJobs: 2,
        runningLeases: [],
        sessionNonce: 'n',
        sandboxed: false,
        runsChecks: false,
        ...overrides,
      },
    });
  }

  /** Waits until a received message satisfies `pick`, and returns it. */
  async next<K extends Kind>(kind: K, pick: (m: ValueOf<K>) => boolean = () => true, from = 0): Promise<ValueOf<K>> {
    for (;;) {
      for (const m of this.received.slice(from)) {
        if (m.msg?.$case === kind) {
          const v = m.msg.value as ValueOf<K>;
          if (pick(v)) return v;
        }
      }
      if (this.status) throw new Error(`stream ended (${this.status.code}: ${this.status.details}) before ${kind}`);
      await new Promise<void>((r) => this.waiters.push(r));
    }
  }

  async ended(): Promise<{ code: number; details: string }> {
    while (!this.status) await new Promise<void>((r) => this.waiters.push(r));
    return this.status;
  }

  close(): void {
    this.call.cancel();
    this.client.close();
  }

  private notify(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const r of w) r();
  }
}

export { freePort } from './ports.js';

/**
 * A coordinator that is not public, with one API token (`reader`), and one real agent with one slot named `agentId`:
 * what the API and web UI tests build against. `overrides` are configuration keys.
 */
export async function startWithAgent(
  token: string,
  agentId: string,
  overrides: Record<string, unknown> = {},
): Promise<{ coordinator: Coordinator; agent: Agent }> {
  const coordinator = await startCoordinator(tempDir(), {
    web: { port: 0, public: false },
    api_tokens: [{ name: 'reader', token }],
    ...overrides,
  });
  const agent = new Agent({
    coordinator: coordinator.grpcTarget,
    token: coordinator.localAgentToken(agentId),
    agentId,
    maxJobs: 1,
    spoolDir: join(tempDir(), 'spool'),
    logger: silentLogger(),
  });
  await agent.start();
  return { coordinator, agent };
}
