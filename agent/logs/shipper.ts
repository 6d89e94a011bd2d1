import { EventEmitter } from 'node:events';
import type { Logger } from '../../common/logging.js';
import type { AgentMessage } from '../../common/proto/ekaci/agent/v1/agent.js';
import type { LeaseLog } from './spool.js';

// Used when a coordinator's Welcome leaves `log_window_bytes` at 0: eight maximal chunks keep a high-latency link
// busy while bounding what a reconnect has to send again.
export const DEFAULT_LOG_WINDOW_BYTES = 1024 * 1024;

/** Where log chunks go: the current stream, when there is one. */
export interface LogSink {
  /** False while the stream is not ready or its write buffer is full. */
  readonly writable: boolean;
  send(message: AgentMessage): boolean;
}

interface Cursor {
  log: LeaseLog;
  /** Next offset to send on this stream. */
  sent: number;
  /** What the coordinator says it has stored. */
  acked: number;
  completeAnnounced: boolean;
  detach: () => void;
}

interface ShipperEvents {
  /** Every byte of a closed log is acknowledged: the lease may report `Finished`. */
  complete: [leaseId: string];
}

/**
 * Sends spooled logs as `LogChunk`s. Never has more than the window unacknowledged (summed over all leases, which
 * also satisfies a per-lease reading of the contract), takes turns between leases so one chatty build cannot
 * starve the others, and after a reconnect resumes each lease at the offset the coordinator names.
 */
export class LogShipper extends EventEmitter<ShipperEvents> {
  private readonly cursors = new Map<string, Cursor>();
  private sink: LogSink | null = null;
  private windowBytes = DEFAULT_LOG_WINDOW_BYTES;
  // Bumped whenever sink or offsets change, so a read that was in flight across the change is discarded.
  private epoch = 0;
  private pumping = false;
  private again = false;
  private turn = 0;
  private pumpedWaiters: (() => void)[] = [];

  constructor(
    private readonly chunkBytes: number,
    private readonly logger: Logger,
  ) {
    super();
  }

  track(leaseId: string, log: LeaseLog): void {
    this.untrack(leaseId);
    const onGrow = (): void => this.pump();
    const onClosed = (): void => this.checkComplete(leaseId);
    log.on('grow', onGrow);
    log.on('closed', onClosed);
    const detach = (): void => {
      log.off('grow', onGrow);
      log.off('closed', onClosed);
    };
    this.cursors.set(leaseId, { log, sent: 0, acked: 0, completeAnnounced: false, detach });
  }

  untrack(leaseId: string): void {
    const cursor = this.cursors.get(leaseId);
    if (cursor === undefined) return;
    cursor.detach();
    this.cursors.delete(leaseId);
    this.epoch++;
  }

  /** Starts sending on a fresh stream; call after `resume` for every kept lease. */
  attach(sink: LogSink, windowBytes: number): void {
    this.sink = sink;
    this.windowBytes = windowBytes > 0 ? windowBytes : DEFAULT_LOG_WINDOW_BYTES;
    this.epoch++;
    this.pump();
  }

  /** The stream is gone: bytes in flight are unacknowledged and will be resent from the next offset. */
  detach(): void {
    this.sink = null;
    this.epoch++;
  }

  /** Continues a lease from what the coordinator already stored (`LeaseDecision.log_offset`). */
  resume(leaseId: string, offset: number): void {
    const cursor = this.cursors.get(leaseId);
    if (cursor === undefined) return;
    if (offset > cursor.log.size) {
      this.logger.warn({ leaseId, offset, spooled: cursor.log.size }, 'coordinator claims more log than spooled');
    }
    cursor.sent = cursor.acked = Math.min(offset, cursor.log.size);
    cursor.completeAnnounced = false;
    this.epoch++;
    this.checkComplete(leaseId);
  }

  ack(leaseId: string, storedBytes: number): void {
    const cursor = this.cursors.get(leaseId);
    if (cursor === undefined || storedBytes <= cursor.acked) return;
    if (storedBytes > cursor.sent) {
      this.logger.warn({ leaseId, storedBytes, sent: cursor.sent }, 'LogAck beyond the bytes sent');
    }
    cursor.acked = Math.min(storedBytes, cursor.log.size);
    cursor.sent = Math.max(cursor.sent, cursor.acked);
    this.checkComplete(leaseId);
    this.pump();
  }

  /** Whether the coordinator holds every byte of this lease's finished log. */
  fullyAcked(leaseId: string): boolean {
    const cursor = this.cursors.get(leaseId);
    return cursor !== undefined && cursor.log.closed && cursor.acked >= cursor.log.size;
  }

  /** Sends what the window and the stream allow; safe to call at any time, runs one loop at a time. */
  pump(): void {
    if (this.pumping) {
      this.again = true;
      return;
    }
    this.pumping = true;
    this.pumpLoop()
      .catch((err: unknown) => this.logger.error({ err }, 'log shipping failed'))
      .finally(() => {
        this.pumping = false;
        if (this.again) {
          this.again = false;
          this.pump();
        } else {
          for (const resolve of this.pumpedWaiters.splice(0)) resolve();
        }
      });
  }

  /** Resolves once no sending loop runs: everything the window, the stream and the spool allowed has been sent. */
  whenPumped(): Promise<void> {
    if (!this.pumping) return Promise.resolve();
    return new Promise((resolve) => this.pumpedWaiters.push(resolve));
  }

  private async pumpLoop(): Promise<void> {
    for (;;) {
      this.again = false;
      const sink = this.sink;
      if (sink === null || !sink.writable) return;
      const budget = this.windowBytes - this.inFlight();
      const next = this.nextSendable();
      if (budget <= 0 || next === undefined) return;
      const [leaseId, cursor] = next;
      const offset = cursor.sent;
      const epoch = this.epoch;
      const data = await cursor.log.read(offset, Math.min(this.chunkBytes, budget));
      if (epoch !== this.epoch || this.cursors.get(leaseId) !== cursor || cursor.sent !== offset) continue;
      if (data.length === 0) return;
      cursor.sent += data.length;
      sink.send({ msg: { $case: 'logChunk', value: { leaseId, offset, data } } });
    }
  }

  private inFlight(): number {
    let total = 0;
    for (const cursor of this.cursors.values()) total += cursor.sent - cursor.acked;
    return total;
  }

  private nextSendable(): [string, Cursor] | undefined {
    const entries = [...this.cursors.entries()];
    for (let i = 0; i < entries.length; i++) {
      const index = (this.turn + i) % entries.length;
      const entry = entries[index];
      if (entry !== undefined && entry[1].sent < entry[1].log.size) {
        this.turn = index + 1;
        return entry;
      }
    }
    return undefined;
  }

  private checkComplete(leaseId: string): void {
    const cursor = this.cursors.get(leaseId);
    if (cursor === undefined || cursor.completeAnnounced || !this.fullyAcked(leaseId)) return;
    cursor.completeAnnounced = true;
    this.emit('complete', leaseId);
  }
}
