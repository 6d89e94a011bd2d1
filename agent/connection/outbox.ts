import { randomUUID } from 'node:crypto';
import type { JobEvent } from '../../common/proto/ekaci/agent/v1/agent.js';

export type JobEventBody = NonNullable<JobEvent['event']>;

/**
 * The state-changing events (accepted, started, finished) the coordinator has not yet acknowledged. Each gets the
 * next message id of this agent process; `sessionNonce` (sent in `Hello`) tells the coordinator that ids restarted
 * when the process did. Events stay here until an `Ack` names them and are re-sent in id order after a reconnect.
 */
export class Outbox {
  readonly sessionNonce: string;
  private nextId = 1;
  // A Map iterates in insertion order, which is id order because ids only grow.
  private readonly pending = new Map<number, JobEvent>();

  constructor(sessionNonce: string = randomUUID()) {
    this.sessionNonce = sessionNonce;
  }

  /** Stores a new event under the next message id and returns it for sending. */
  add(leaseId: string, event: JobEventBody): JobEvent {
    const message: JobEvent = { messageId: this.nextId++, leaseId, event };
    this.pending.set(message.messageId, message);
    return message;
  }

  /** Forgets the acknowledged events and returns them; ids it does not hold (repeated acks) are ignored. */
  ack(messageIds: readonly number[]): JobEvent[] {
    const acked: JobEvent[] = [];
    for (const id of messageIds) {
      const message = this.pending.get(id);
      if (message === undefined) continue;
      this.pending.delete(id);
      acked.push(message);
    }
    return acked;
  }

  /** Every unacknowledged event, oldest first: what a new stream must carry again. */
  unacked(): JobEvent[] {
    return [...this.pending.values()];
  }

  /** Drops the events of a lease the coordinator no longer considers ours: re-sending them would be noise. */
  forgetLease(leaseId: string): void {
    for (const [id, message] of this.pending) {
      if (message.leaseId === leaseId) this.pending.delete(id);
    }
  }

  get size(): number {
    return this.pending.size;
  }
}
