import { type ServerDuplexStream, status } from '@grpc/grpc-js';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type {
  AgentMessage,
  CoordinatorMessage,
  Credit,
  Hello,
  JobEvent,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { PROTOCOL_VERSION, formatVersion } from '../../common/protocol-version.js';
import type { AgentCapabilities } from '../scheduler/scheduler.js';

/**
 * The coordinator's side of one `Connect` stream (contract: proto/ekaci/agent/v1/agent.proto).
 *
 * States: `awaiting-hello` → `active` → `closed`, or `awaiting-hello` → `closed` on a refused Hello or when none
 * came within `helloTimeoutMs`. Nothing but a Hello is accepted before `active`. The agent's id is the name of the
 * token the stream was opened with (`tokenName`); a Hello may repeat it, never name another.
 *
 * Job events are handed to their handler as they arrive (the build manager commits them in groups, each lease's
 * writes in arrival order) and acknowledged in arrival order, each only after its handler committed: a handler
 * that fails leaves the event unacknowledged, and the agent sends it again after reconnecting.
 *
 * Flow control: `freeSlots` is what the agent may still be given. A `Credit` reports the agent's free slots
 * counting every `Assign` it has processed; assignments it has not yet answered with `Accepted` were not
 * counted, so they are subtracted. Since the stream is ordered this is exact: the coordinator never assigns
 * more than the agent advertised.
 */
export type SessionState = 'awaiting-hello' | 'active' | 'closed';

export interface SessionHandlers {
  /** Validates the Hello and returns the Welcome contents, or a refusal. */
  hello(session: AgentSession, hello: Hello): { refuse?: { code: string; message: string; status: status } };
  jobEvent(session: AgentSession, event: JobEvent): void | Promise<void>;
  logChunk(session: AgentSession, leaseId: string, offset: number, data: Uint8Array): number;
  heartbeat(session: AgentSession, leaseIds: string[]): { renewed: string[]; expiresAt: number };
  credit(session: AgentSession): void;
  closed(session: AgentSession): void;
  /** A handler failed: logged with its context and counted; the message stays unanswered. */
  fault(session: AgentSession, where: string, err: unknown, context: Record<string, unknown>): void;
}

export class AgentSession {
  state: SessionState = 'awaiting-hello';
  capabilities: AgentCapabilities | undefined;
  hello: Hello | undefined;
  draining = false;
  private free = 0;
  private readonly unaccepted = new Set<string>();
  private readonly outbox: CoordinatorMessage[] = [];
  /** Job events whose acknowledgement is due, not yet sent (`ack`). */
  private acks: number[] = [];
  private writable = true;
  private events: Promise<void> = Promise.resolve();
  private readonly helloTimer: NodeJS.Timeout;

  constructor(
    readonly call: ServerDuplexStream<AgentMessage, CoordinatorMessage>,
    readonly tokenName: string,
    private readonly handlers: SessionHandlers,
    readonly logger: Logger,
    helloTimeoutMs: number,
  ) {
    this.helloTimer = setTimeout(() => {
      if (this.state === 'awaiting-hello') {
        this.refuse(
          'EKACI_ERR_PROTOCOL',
          `no Hello within ${Math.round(helloTimeoutMs / 1000)} s of opening the stream`,
          status.DEADLINE_EXCEEDED,
        );
      }
    }, helloTimeoutMs);
    this.helloTimer.unref();
    call.on('data', (m: AgentMessage) => this.onMessage(m));
    call.on('drain', () => {
      this.writable = true;
      this.flush();
    });
    // The agent half-closed: end our side too, so its graceful stop need not wait for a timeout.
    call.on('end', () => {
      this.flush();
      call.end();
      this.close();
    });
    call.on('error', () => this.close());
    call.on('close', () => this.close());
    call.on('cancelled', () => this.close());
  }

  /** The token's name: an agent is who its token says. */
  get agentId(): string {
    return this.tokenName;
  }

  get freeSlots(): number {
    return this.state === 'active' && !this.draining ? Math.max(0, this.free) : 0;
  }

  send(msg: CoordinatorMessage): void {
    if (this.state === 'closed') return;
    this.outbox.push(msg);
    this.flush();
  }

  /** Sends assignments and counts them against the agent's free slots. */
  assign(msgs: NonNullable<CoordinatorMessage['msg']>[]): void {
    for (const m of msgs) {
      if (m.$case !== 'assign') throw new IllegalStateError('assign() takes Assign messages');
      this.unaccepted.add(m.value.leaseId);
      this.free -= 1;
      this.send({ msg: m });
    }
  }

  /**
   * Acknowledges a job event. The events a group commit settled together are acknowledged in one `Ack`, in the
   * order they arrived: the acknowledgements of one commit become due in one run of the microtask queue, and the
   * `Ack` goes out after it.
   */
  private ack(messageId: number): void {
    this.acks.push(messageId);
    if (this.acks.length > 1) return;
    process.nextTick(() => {
      const messageIds = this.acks;
      this.acks = [];
      this.send({ msg: { $case: 'ack', value: { messageIds } } });
    });
  }

  /** Ends the stream with a status (refusal, revoked token, replaced by a newer stream). */
  terminate(code: status, details: string): void {
    if (this.state === 'closed') return;
    this.flush();
    this.call.emit('error', { code, details });
    this.close();
  }

  private flush(): void {
    while (this.writable && this.outbox.length > 0) {
      const msg = this.outbox.shift()!;
      // grpc-js buffers the message either way; `false` means wait for 'drain' before writing more.
      this.writable = this.call.write(msg);
    }
  }

  private close(): void {
    if (this.state === 'closed') return;
    clearTimeout(this.helloTimer);
    const wasActive = this.state === 'active';
    this.state = 'closed';
    if (wasActive) this.handlers.closed(this);
  }

  /**
   * No error in handling one message ends the coordinator: a message whose handler failed gets no answer (no Ack,
   * LogAck, HeartbeatAck or Welcome), and the stream is ended with UNAVAILABLE, so that the agent reconnects and
   * sends again what was not acknowledged — at once, and until it is recorded (a full disk frees up).
   */
  private onMessage(m: AgentMessage): void {
    try {
      this.handle(m);
    } catch (err) {
      this.failed(`agent message ${m.msg?.$case ?? 'empty'}`, err, {
        ...(m.msg?.value && 'leaseId' in m.msg.value ? { leaseId: m.msg.value.leaseId } : {}),
      });
    }
  }

  private failed(where: string, err: unknown, context: Record<string, unknown>): void {
    this.handlers.fault(this, where, err, { agentId: this.tokenName, ...context });
    this.terminate(
      status.UNAVAILABLE,
      `EKACI_ERR_UNAVAILABLE: the coordinator could not handle a message (${where}); reconnect and send it again`,
    );
  }

  private handle(m: AgentMessage): void {
    const msg = m.msg;
    if (!msg || this.state === 'closed') return;
    if (this.state === 'awaiting-hello') {
      if (msg.$case !== 'hello') {
        this.refuse(
          'EKACI_ERR_PROTOCOL',
          `expected Hello as the first message, got ${msg.$case}`,
          status.FAILED_PRECONDITION,
        );
        return;
      }
      this.onHello(msg.value);
      return;
    }
    switch (msg.$case) {
      case 'hello':
        this.refuse('EKACI_ERR_PROTOCOL', 'Hello sent twice on one stream', status.FAILED_PRECONDITION);
        return;
      case 'heartbeat': {
        const r = this.handlers.heartbeat(this, msg.value.leaseIds);
        this.send({
          msg: { $case: 'heartbeatAck', value: { renewedLeaseIds: r.renewed, leaseExpiresAtMs: r.expiresAt } },
        });
        return;
      }
      case 'credit':
        this.onCredit(msg.value);
        return;
      case 'jobEvent': {
        const event = msg.value;
        // Any answer to an Assign (also a result without an Accepted, for an Assign the agent refused) means
        // the agent counted it in its Credit.
        this.unaccepted.delete(event.leaseId);
        // Handled at once (the manager commits reports in groups and orders their writes as they arrive), and
        // acknowledged in order, each only once its handler has committed; a failed handler leaves the event
        // unacknowledged (the agent resends it after a reconnect).
        const handled = Promise.resolve().then(() => this.handlers.jobEvent(this, event));
        handled.catch(() => undefined); // its failure is dealt with below, in order
        this.events = this.events
          .then(() => handled)
          .then(
            () => this.ack(event.messageId),
            (err: unknown) =>
              this.failed(`job event ${event.event?.$case ?? 'empty'}`, err, {
                leaseId: event.leaseId,
                note: 'left unacknowledged',
              }),
          );
        return;
      }
      case 'logChunk': {
        const { leaseId, offset, data } = msg.value;
        const stored = this.handlers.logChunk(this, leaseId, offset, data);
        this.send({ msg: { $case: 'logAck', value: { leaseId, storedBytes: stored } } });
        return;
      }
      case 'cancelAck':
        this.logger.info({ leaseId: msg.value.leaseId }, 'agent confirmed cancellation');
        return;
    }
  }

  private onHello(claimed: Hello): void {
    clearTimeout(this.helloTimer);
    const theirs = claimed.protocolVersion;
    if (!theirs || theirs.major !== PROTOCOL_VERSION.major) {
      this.refuse(
        'EKACI_ERR_PROTOCOL_MISMATCH',
        `agent ${this.tokenName} speaks protocol ${formatVersion(theirs)}, this coordinator speaks ` +
          `${formatVersion(PROTOCOL_VERSION)}; upgrade the older of the two`,
        status.FAILED_PRECONDITION,
      );
      return;
    }
    if (claimed.agentId !== '' && claimed.agentId !== this.tokenName) {
      this.refuse(
        'EKACI_ERR_AUTH',
        `this stream's token belongs to agent "${this.tokenName}", but its Hello claims to be agent ` +
          `"${claimed.agentId}"; an agent is named by its token (leave --id unset, or set it to "${this.tokenName}")`,
        status.PERMISSION_DENIED,
      );
      return;
    }
    if (claimed.systems.length === 0 || claimed.maxJobs < 1) {
      this.refuse('EKACI_ERR_PROTOCOL', 'Hello needs at least one system and max_jobs ≥ 1', status.INVALID_ARGUMENT);
      return;
    }
    const hello: Hello = { ...claimed, agentId: this.tokenName };
    this.hello = hello;
    this.capabilities = {
      agentId: this.tokenName,
      systems: hello.systems,
      supportedFeatures: hello.supportedFeatures,
      mandatoryFeatures: hello.mandatoryFeatures,
      // Decided by the hub (sandbox, server policy) once the Hello is accepted.
      mayBuildUntrusted: false,
      runsChecks: hello.runsChecks,
    };
    this.state = 'active';
    const r = this.handlers.hello(this, hello);
    if (r.refuse) this.refuse(r.refuse.code, r.refuse.message, r.refuse.status);
  }

  private onCredit(c: Credit): void {
    this.free = c.freeSlots - this.unaccepted.size;
    this.draining = c.draining;
    this.handlers.credit(this);
  }

  private refuse(code: string, message: string, grpcStatus: status): void {
    this.logger.warn({ code, agentId: this.hello?.agentId }, message);
    this.send({ msg: { $case: 'error', value: { code, message } } });
    this.terminate(grpcStatus, `${code}: ${message}`);
  }
}
