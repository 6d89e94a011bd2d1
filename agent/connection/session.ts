import { EventEmitter } from 'node:events';
import {
  Metadata,
  status as grpcStatus,
  type ChannelCredentials,
  type ClientDuplexStream,
  type StatusObject,
} from '@grpc/grpc-js';
import type { Backoff } from '../../common/backoff.js';
import { AuthError, IllegalStateError, ProtocolMismatchError, type EkaciError } from '../../common/errors.js';
import { clientChannelOptions } from '../../common/grpc-options.js';
import type { Logger } from '../../common/logging.js';
import { formatVersion, PROTOCOL_VERSION } from '../../common/protocol-version.js';
import {
  AgentServiceClient,
  type AgentMessage,
  type CoordinatorMessage,
  type ErrorReply,
  type Hello,
  type Welcome,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { errorReplyDisposition, grpcStatusDisposition, isTokenRefusal } from '../../common/retry.js';
import { CoordinatorRefusedError, StreamRejectedError } from '../errors.js';
import type { LogSink } from '../logs/shipper.js';

/**
 * States of the connection to the coordinator:
 *
 *   idle → handshaking      open(): the stream is opened and Hello written
 *   handshaking → ready     Welcome arrived
 *   handshaking|ready → backoff → handshaking   the stream ended and retrying can help
 *   handshaking|ready → failed                  the stream ended and retrying cannot help (token, protocol)
 *   handshaking|ready → closing → closed        close(): half-close and wait for the coordinator's status
 *   any but failed → closed                     abort(), or close() while no stream is open
 */
export type SessionState = 'idle' | 'handshaking' | 'ready' | 'backoff' | 'closing' | 'closed' | 'failed';

const TRANSITIONS: Record<SessionState, readonly SessionState[]> = {
  idle: ['handshaking', 'closed'],
  handshaking: ['ready', 'backoff', 'closing', 'closed', 'failed'],
  ready: ['backoff', 'closing', 'closed', 'failed'],
  backoff: ['handshaking', 'closed'],
  closing: ['closed'],
  closed: [],
  failed: [],
};

// How long after the call's status the last buffered message may still be on its way to the 'data' handler.
const END_AFTER_STATUS_MS = 1000;

/** What the agent does with the stream's traffic. */
export interface SessionHandler {
  /** Built afresh for every stream: it lists the leases still running. */
  hello(): Hello;
  welcome(welcome: Welcome): void;
  /** Every message after Welcome, except ErrorReply (which the session handles). */
  message(message: CoordinatorMessage): void;
  /** The stream ended; the session reconnects with backoff. */
  disconnected(reason: string): void;
  /** The stream ended for good; the session will not reconnect. */
  failed(error: EkaciError): void;
}

export interface SessionOptions {
  address: string;
  credentials: ChannelCredentials;
  token: string;
  backoff: Backoff;
  logger: Logger;
  handler: SessionHandler;
}

type Call = ClientDuplexStream<AgentMessage, CoordinatorMessage>;

interface SessionEvents {
  /** The stream is ready and its write buffer has room again. */
  writable: [];
}

/**
 * The `Connect` stream, reopened with jittered backoff until it fails for good or is closed. Outgoing messages
 * queue behind `write()` returning false and go out on 'drain'; nothing but Hello is written before Welcome.
 */
export class Session extends EventEmitter<SessionEvents> implements LogSink {
  private state: SessionState = 'idle';
  private readonly client: AgentServiceClient;
  private call: Call | null = null;
  private queue: AgentMessage[] = [];
  private blocked = false;
  private refusal: ErrorReply | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private closeWaiters: (() => void)[] = [];
  private peakBuffered = 0;

  constructor(private readonly options: SessionOptions) {
    super();
    this.client = new AgentServiceClient(options.address, options.credentials, clientChannelOptions);
  }

  get status(): SessionState {
    return this.state;
  }

  get writable(): boolean {
    return this.state === 'ready' && !this.blocked && this.queue.length === 0;
  }

  /**
   * Messages the agent holds for the coordinator: handed to gRPC but not yet on the wire (HTTP/2 flow control holds
   * them while the coordinator does not read), plus those waiting here for the stream's 'drain'. `peak` is the
   * most there ever were; respecting `write()`'s back-pressure keeps it near gRPC's write buffer of 16 messages.
   */
  get backlog(): { messages: number; peak: number } {
    return { messages: this.buffered(), peak: this.peakBuffered };
  }

  open(): void {
    this.connect();
  }

  /** Queues a message for the current stream; false (and dropped) when no stream is ready. */
  send(message: AgentMessage): boolean {
    if (this.state !== 'ready') return false;
    this.queue.push(message);
    this.flush();
    return true;
  }

  /** Abandons the current stream and reconnects (a coordinator that stopped answering). */
  restart(reason: string): void {
    if (this.call === null) return;
    this.options.logger.warn({ reason }, 'reopening the stream');
    this.call.cancel();
  }

  /** Graceful: writes what is queued, half-closes, and waits up to `timeoutMs` for the coordinator to end the call. */
  async close(timeoutMs: number): Promise<void> {
    switch (this.state) {
      case 'closed':
      case 'failed':
        return;
      case 'idle':
      case 'backoff':
        return this.finishClose();
      case 'handshaking':
      case 'ready': {
        const call = this.call as Call;
        this.transition('closing');
        for (const message of this.queue.splice(0)) call.write(message);
        call.end();
        break;
      }
      case 'closing':
        break;
    }
    const done = new Promise<void>((resolve) => this.closeWaiters.push(resolve));
    const timer = setTimeout(() => this.call?.cancel(), timeoutMs);
    await done;
    clearTimeout(timer);
  }

  /** Forced: cancels the stream at once and never reconnects. */
  abort(): void {
    if (this.state === 'closed' || this.state === 'failed') return;
    const call = this.call;
    this.call = null;
    call?.cancel();
    this.finishClose();
  }

  private connect(): void {
    this.transition('handshaking');
    this.retryTimer = null;
    this.refusal = null;
    this.queue = [];
    this.blocked = false;
    const metadata = new Metadata();
    metadata.set('authorization', `Bearer ${this.options.token}`);
    const call = this.client.connect(metadata);
    this.call = call;
    let status: StatusObject | null = null;
    let ended = false;
    // A status can overtake messages still buffered in the stream; act on it only after the last one was read.
    const settle = (): void => {
      if (status !== null && ended) this.ended(call, status);
    };
    call.on('data', (message: CoordinatorMessage) => this.received(call, message));
    call.on('error', () => {}); // the 'status' event carries the same information
    call.on('status', (s: StatusObject) => {
      status = s;
      settle();
      // 'end' follows as soon as the buffered messages are read; never let a missing one stall the reconnect.
      setTimeout(() => {
        ended = true;
        settle();
      }, END_AFTER_STATUS_MS).unref();
    });
    call.on('end', () => {
      ended = true;
      settle();
    });
    call.write({ msg: { $case: 'hello', value: this.options.handler.hello() } });
  }

  private received(call: Call, message: CoordinatorMessage): void {
    if (call !== this.call) return;
    const log = this.options.logger;
    const msg = message.msg;
    if (msg === undefined) return;
    if (msg.$case === 'error') {
      this.refusal = msg.value;
      log.warn({ code: msg.value.code }, `coordinator refused: ${msg.value.message}`);
    } else if (msg.$case === 'welcome') {
      this.welcomed(msg.value);
    } else if (this.state === 'ready') {
      this.options.handler.message(message);
    } else {
      log.warn({ message: msg.$case, state: this.state }, 'ignoring a message the protocol does not allow here');
    }
  }

  private welcomed(welcome: Welcome): void {
    if (this.state !== 'handshaking') {
      this.options.logger.warn({ state: this.state }, 'ignoring a repeated Welcome');
      return;
    }
    if (welcome.protocolVersion?.major !== PROTOCOL_VERSION.major) {
      const theirs = formatVersion(welcome.protocolVersion);
      this.fail(
        new ProtocolMismatchError(
          `coordinator speaks protocol ${theirs}, this agent ${formatVersion(PROTOCOL_VERSION)}; upgrade the older side`,
        ),
      );
      return;
    }
    this.transition('ready');
    this.options.backoff.reset();
    this.options.handler.welcome(welcome);
    if (this.writable) this.emit('writable');
  }

  private ended(call: Call, status: StatusObject): void {
    if (call !== this.call) return;
    this.call = null;
    this.queue = [];
    this.blocked = false;
    if (this.state === 'closing') return this.finishClose();
    const refusal = this.refusal;
    const disposition = refusal ? errorReplyDisposition(refusal.code) : grpcStatusDisposition(status.code);
    if (disposition === 'fatal') {
      return this.fail(
        refusal
          ? new CoordinatorRefusedError(refusal.code, refusal.message)
          : isTokenRefusal(status.code)
            ? new AuthError(
                `token refused by coordinator (${grpcStatus[status.code]}: ${status.details}); check --token-file or ` +
                  'EKACI_AGENT_TOKEN, or create a new token with `ekaci-coordinator agent-token create NAME`',
              )
            : new StreamRejectedError(status.code, status.details),
      );
    }
    const reason = refusal ? `${refusal.code}: ${refusal.message}` : `${grpcStatus[status.code]}: ${status.details}`;
    this.transition('backoff');
    const delay = this.options.backoff.next();
    this.options.logger.warn({ reason, retryInMs: delay }, 'stream to the coordinator ended; reconnecting');
    this.options.handler.disconnected(reason);
    if (this.status !== 'backoff') return; // the handler closed the session
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  private buffered(): number {
    return this.queue.length + (this.call?.writableLength ?? 0);
  }

  private flush(): void {
    const call = this.call;
    this.peakBuffered = Math.max(this.peakBuffered, this.buffered());
    if (call === null) return;
    while (!this.blocked && this.queue.length > 0) {
      const message = this.queue.shift() as AgentMessage;
      const more = call.write(message);
      this.peakBuffered = Math.max(this.peakBuffered, this.buffered());
      if (!more) {
        this.blocked = true;
        call.once('drain', () => {
          if (call !== this.call) return;
          this.blocked = false;
          this.flush();
          if (this.writable) this.emit('writable');
        });
      }
    }
  }

  private fail(error: EkaciError): void {
    const call = this.call;
    this.call = null;
    call?.cancel();
    this.clearRetry();
    this.transition('failed');
    this.client.close();
    this.options.handler.failed(error);
  }

  private finishClose(): void {
    this.clearRetry();
    if (this.state !== 'closed') this.transition('closed');
    this.client.close();
    for (const resolve of this.closeWaiters.splice(0)) resolve();
  }

  private clearRetry(): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private transition(to: SessionState): void {
    if (!TRANSITIONS[this.state].includes(to)) {
      throw new IllegalStateError(`session: illegal transition ${this.state} → ${to}`);
    }
    this.state = to;
  }
}
