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
 * States: `awaiting-hello` → `active` → `closed`, or `awaiting-hello` → `closed` on a refused Hello. Nothing but
 * a Hello is accepted before `active`.
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
  jobEvent(session: AgentSession, event: JobEvent): void;
  logChunk(session: AgentSession, leaseId: string, offset: number, data: Uint8Array): number;
  heartbeat(session: AgentSession, leaseIds: string[]): { renewed: string[]; expiresAt: number };
  credit(session: AgentSession): void;
  closed(session: AgentSession): void;
}

export class AgentSession {
  state: SessionState = 'awaiting-hello';
  capabilities: AgentCapabilities | undefined;
  hello: Hello | undefined;
  draining = false;
  private free = 0;
  private readonly unaccepted = new Set<string>();
  private readonly outbox: CoordinatorMessage[] = [];
  private writable = true;

  constructor(
    readonly call: ServerDuplexStream<AgentMessage, CoordinatorMessage>,
    readonly tokenName: string,
    private readonly handlers: SessionHandlers,
    readonly logger: Logger,
  ) {
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

  get agentId(): string {
    return this.hello?.agentId ?? '(before hello)';
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
    const wasActive = this.state === 'active';
    this.state = 'closed';
    if (wasActive) this.handlers.closed(this);
  }

  private onMessage(m: AgentMessage): void {
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
      case 'jobEvent':
        if (msg.value.event?.$case === 'accepted') this.unaccepted.delete(msg.value.leaseId);
        this.handlers.jobEvent(this, msg.value);
        // Handlers commit synchronously, so the acknowledgement follows the database commit.
        this.send({ msg: { $case: 'ack', value: { messageIds: [msg.value.messageId] } } });
        return;
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

  private onHello(hello: Hello): void {
    const theirs = hello.protocolVersion;
    if (!theirs || theirs.major !== PROTOCOL_VERSION.major) {
      this.refuse(
        'EKACI_ERR_PROTOCOL_MISMATCH',
        `agent ${hello.agentId || '?'} speaks protocol ${formatVersion(theirs)}, this coordinator speaks ` +
          `${formatVersion(PROTOCOL_VERSION)}; upgrade the older of the two`,
        status.FAILED_PRECONDITION,
      );
      return;
    }
    if (!hello.agentId || hello.systems.length === 0 || hello.maxJobs < 1) {
      this.refuse(
        'EKACI_ERR_PROTOCOL',
        'Hello needs agent_id, at least one system and max_jobs ≥ 1',
        status.INVALID_ARGUMENT,
      );
      return;
    }
    this.hello = hello;
    this.capabilities = {
      agentId: hello.agentId,
      systems: hello.systems,
      supportedFeatures: hello.supportedFeatures,
      mandatoryFeatures: hello.mandatoryFeatures,
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
