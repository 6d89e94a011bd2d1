import {
  Server,
  ServerCredentials,
  status,
  type Metadata,
  type ServerDuplexStream,
  type ServiceError,
} from '@grpc/grpc-js';
import { serverChannelOptions } from '../../common/grpc-options.js';
import { PROTOCOL_VERSION } from '../../common/protocol-version.js';
import {
  AgentServiceService,
  type AgentMessage,
  type CoordinatorMessage,
  type Hello,
  type JobEvent,
  type Welcome,
} from '../../common/proto/ekaci/agent/v1/agent.js';

/**
 * A small coordinator for agent tests: a real grpc-js server on 127.0.0.1 whose behaviour each test scripts. By
 * default it checks the bearer token, answers Hello with a Welcome that keeps every running lease at the log
 * offset it has stored, acknowledges every job event and stores and acknowledges every log chunk.
 */
export interface ScriptOptions {
  /** The token it accepts; any other ends the call with UNAUTHENTICATED. */
  token: string;
  /** Fields of the Welcome it sends (lease decisions are computed unless given). */
  welcome: Partial<Welcome>;
  /** Answers Hello itself instead of the default Welcome. */
  onHello: ((hello: Hello, stream: ScriptedStream) => void) | null;
  /** Sees every message after Hello, after the default handling (storing, acknowledging). */
  onMessage: ((message: AgentMessage, stream: ScriptedStream) => void) | null;
  autoAckEvents: boolean;
  autoAckLogs: boolean;
}

type Message = NonNullable<CoordinatorMessage['msg']>;
type Call = ServerDuplexStream<AgentMessage, CoordinatorMessage>;

interface Waiter {
  predicate: (m: AgentMessage) => boolean;
  resolve: (m: AgentMessage) => void;
}

/** One `Connect` call as the coordinator sees it. */
export class ScriptedStream {
  readonly received: AgentMessage[] = [];
  hello: Hello | null = null;
  ended = false;
  private closing = false;
  private waiters: Waiter[] = [];
  private endWaiters: (() => void)[] = [];

  constructor(
    readonly index: number,
    readonly metadata: Metadata,
    private readonly call: Call,
  ) {}

  send(msg: Message): void {
    if (!this.ended && !this.closing) this.call.write({ msg });
  }

  /**
   * Stops reading the agent's messages, as a coordinator too busy to keep up: gRPC stops taking them off the
   * HTTP/2 stream, and flow control holds the agent's writes once the window is full.
   */
  pause(): void {
    this.call.pause();
  }

  resume(): void {
    this.call.resume();
  }

  /** Ends the call with OK, as a coordinator does after an ErrorReply or at shutdown. */
  end(): void {
    if (this.ended || this.closing) return;
    this.closing = true;
    this.call.end();
  }

  /** Ends the call with an error status (a revoked token, a dying coordinator). */
  fail(code: status, details: string): void {
    if (this.ended || this.closing) return;
    this.closing = true;
    const err: Partial<ServiceError> = { code, details };
    this.call.emit('error', err);
  }

  /** The first message (already received or still to come) that matches. */
  waitFor(predicate: (m: AgentMessage) => boolean): Promise<AgentMessage> {
    const seen = this.received.find(predicate);
    if (seen !== undefined) return Promise.resolve(seen);
    return new Promise((resolve) => this.waiters.push({ predicate, resolve }));
  }

  whenEnded(): Promise<void> {
    return this.ended ? Promise.resolve() : new Promise((resolve) => this.endWaiters.push(resolve));
  }

  /** @internal */
  deliver(message: AgentMessage): void {
    this.received.push(message);
    const ready = this.waiters.filter((w) => w.predicate(message));
    this.waiters = this.waiters.filter((w) => !ready.includes(w));
    for (const w of ready) w.resolve(message);
  }

  /** @internal */
  markEnded(): void {
    this.ended = true;
    for (const resolve of this.endWaiters.splice(0)) resolve();
  }
}

export class ScriptedCoordinator {
  readonly streams: ScriptedStream[] = [];
  /** Log bytes stored per lease, appended in offset order. */
  readonly logs = new Map<string, Buffer>();
  /** Every job event received, repeats included. */
  readonly events: JobEvent[] = [];
  /** Protocol breaches seen (a log gap, ...); a test expects this to stay empty. */
  readonly violations: string[] = [];
  readonly options: ScriptOptions;
  private streamWaiters: ((s: ScriptedStream) => void)[] = [];
  private readonly backings = new WeakSet<ArrayBufferLike>();

  private constructor(
    private readonly server: Server,
    readonly port: number,
    options: Partial<ScriptOptions>,
  ) {
    this.options = {
      token: 'test-token',
      welcome: {},
      onHello: null,
      onMessage: null,
      autoAckEvents: true,
      autoAckLogs: true,
      ...options,
    };
  }

  static async start(
    options: Partial<ScriptOptions> = {},
    credentials = ServerCredentials.createInsecure(),
  ): Promise<ScriptedCoordinator> {
    const server = new Server(serverChannelOptions);
    let self: ScriptedCoordinator | null = null;
    server.addService(AgentServiceService, { connect: (call: Call) => self?.accept(call) });
    const port = await new Promise<number>((resolve, reject) =>
      server.bindAsync('127.0.0.1:0', credentials, (err, p) => (err ? reject(err) : resolve(p))),
    );
    self = new ScriptedCoordinator(server, port, options);
    return self;
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  /** The n-th stream (0-based), once it has been opened. */
  stream(index: number): Promise<ScriptedStream> {
    const existing = this.streams[index];
    if (existing !== undefined) return Promise.resolve(existing);
    return new Promise((resolve) => {
      const check = (s: ScriptedStream): void => {
        if (s.index === index) resolve(s);
        else this.streamWaiters.push(check);
      };
      this.streamWaiters.push(check);
    });
  }

  /** The default Welcome for a Hello: every running lease kept at the log offset stored here. */
  welcomeFor(hello: Hello): Welcome {
    return {
      protocolVersion: PROTOCOL_VERSION,
      heartbeatIntervalMs: 60_000,
      leaseTtlMs: 120_000,
      logWindowBytes: 1024 * 1024,
      cacheUrl: '',
      cachePublicKey: '',
      storeMarker: '',
      leaseDecisions: hello.runningLeases.map((l) => ({
        leaseId: l.leaseId,
        keep: true,
        logOffset: this.logs.get(l.leaseId)?.length ?? 0,
        reason: '',
      })),
      ...this.options.welcome,
    };
  }

  /** Job events of one kind for one lease, in arrival order. */
  eventsOf(leaseId: string, kind: 'accepted' | 'started' | 'finished'): JobEvent[] {
    return this.events.filter((e) => e.leaseId === leaseId && e.event?.$case === kind);
  }

  async stop(): Promise<void> {
    for (const s of this.streams) s.end();
    await new Promise<void>((resolve) => this.server.tryShutdown(() => resolve()));
    this.server.forceShutdown();
  }

  private accept(call: Call): void {
    const stream = new ScriptedStream(this.streams.length, call.metadata, call);
    this.streams.push(stream);
    for (const notify of this.streamWaiters.splice(0)) notify(stream);
    call.on('error', () => {});
    call.on('close', () => stream.markEnded());
    call.on('finish', () => stream.markEnded());
    if (call.metadata.get('authorization')[0] !== `Bearer ${this.options.token}`) {
      stream.fail(status.UNAUTHENTICATED, 'unknown agent token');
      return;
    }
    call.on('data', (message: AgentMessage) => this.handle(stream, message));
    call.on('end', () => stream.end());
  }

  private handle(stream: ScriptedStream, message: AgentMessage): void {
    const msg = message.msg;
    if (msg?.$case === 'hello') {
      stream.hello = msg.value;
      stream.deliver(message);
      if (this.options.onHello) this.options.onHello(msg.value, stream);
      else stream.send({ $case: 'welcome', value: this.welcomeFor(msg.value) });
      return;
    }
    if (msg?.$case === 'jobEvent') {
      this.events.push(msg.value);
      if (this.options.autoAckEvents) stream.send({ $case: 'ack', value: { messageIds: [msg.value.messageId] } });
    }
    if (msg?.$case === 'logChunk') {
      const stored = this.store(msg.value.leaseId, msg.value.offset, msg.value.data);
      if (this.options.autoAckLogs)
        stream.send({ $case: 'logAck', value: { leaseId: msg.value.leaseId, storedBytes: stored } });
    }
    stream.deliver(message);
    this.options.onMessage?.(message, stream);
  }

  /** Appends the bytes it does not have yet; a chunk beyond the end would leave a gap and is refused. */
  store(leaseId: string, offset: number, data: Buffer): number {
    const have = this.logs.get(leaseId) ?? Buffer.alloc(0);
    if (offset > have.length) {
      this.violations.push(`log gap for ${leaseId}: chunk at ${offset}, stored ${have.length}`);
      return have.length;
    }
    if (offset < have.length)
      this.violations.push(`log bytes resent for ${leaseId}: chunk at ${offset}, stored ${have.length}`);
    const fresh = data.subarray(Math.max(0, have.length - offset));
    const next = this.appended(have, fresh);
    this.logs.set(leaseId, next);
    return next.length;
  }

  /**
   * `have` + `fresh`, in a buffer of doubling capacity: concatenating the whole log for every chunk would make a
   * log of many chunks quadratic. The result may share memory with `have` (a view that only ever grows).
   */
  private appended(have: Buffer, fresh: Buffer): Buffer {
    const length = have.length + fresh.length;
    const spare = have.buffer.byteLength - have.byteOffset;
    const owned = this.backings.has(have.buffer);
    if (owned && spare >= length) {
      fresh.copy(Buffer.from(have.buffer, have.byteOffset + have.length, fresh.length));
      return Buffer.from(have.buffer, have.byteOffset, length);
    }
    const backing = Buffer.alloc(Math.max(64 * 1024, 2 * length));
    this.backings.add(backing.buffer);
    have.copy(backing);
    fresh.copy(backing, have.length);
    return backing.subarray(0, length);
  }
}

/** Matchers for `waitFor`. */
export const is = {
  hello: (m: AgentMessage): boolean => m.msg?.$case === 'hello',
  credit: (m: AgentMessage): boolean => m.msg?.$case === 'credit',
  draining: (m: AgentMessage): boolean => m.msg?.$case === 'credit' && m.msg.value.draining,
  heartbeat: (m: AgentMessage): boolean => m.msg?.$case === 'heartbeat',
  cancelAck: (leaseId: string) => (m: AgentMessage) => m.msg?.$case === 'cancelAck' && m.msg.value.leaseId === leaseId,
  event: (leaseId: string, kind: 'accepted' | 'started' | 'finished') => (m: AgentMessage) =>
    m.msg?.$case === 'jobEvent' && m.msg.value.leaseId === leaseId && m.msg.value.event?.$case === kind,
};
