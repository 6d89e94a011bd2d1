import { jitter } from '../../common/backoff.js';
import type { Heartbeat, HeartbeatAck } from '../../common/proto/ekaci/agent/v1/agent.js';

// Used when a coordinator's Welcome leaves `heartbeat_interval_ms` at 0: well inside any sensible lease TTL.
export const DEFAULT_HEARTBEAT_INTERVAL_MS = 10_000;

// A coordinator that says nothing for this many intervals is presumed hung even if TCP keepalive still answers
// (a stuck process behind a live socket); the agent reopens the stream rather than wait for its leases to lapse.
const SILENT_INTERVALS_BEFORE_RECONNECT = 3;

export interface HeartbeatHooks {
  /** Sends on the current stream; false if it could not. */
  send(heartbeat: Heartbeat): boolean;
  heldLeaseIds(): string[];
  /** Leases the coordinator did not renew: they are no longer this agent's. */
  notRenewed(leaseIds: string[]): void;
  /** Nothing heard for too long. */
  silent(): void;
}

/**
 * The application heartbeat of one stream: every interval (jittered so a fleet never beats in step) it lists the
 * leases the agent holds; each `HeartbeatAck` is matched, in order, with the heartbeat it answers.
 *
 * States: stopped ⇄ beating (start/stop; start while beating restarts with the new interval).
 */
export class HeartbeatLoop {
  private timer: NodeJS.Timeout | null = null;
  private intervalMs = DEFAULT_HEARTBEAT_INTERVAL_MS;
  private lastHeardAt = 0;
  private readonly unanswered: string[][] = [];

  constructor(private readonly hooks: HeartbeatHooks) {}

  get beating(): boolean {
    return this.timer !== null;
  }

  start(intervalMs: number): void {
    this.stop();
    this.intervalMs = intervalMs > 0 ? intervalMs : DEFAULT_HEARTBEAT_INTERVAL_MS;
    this.lastHeardAt = Date.now();
    this.schedule();
  }

  stop(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.unanswered.length = 0;
  }

  /** Any message from the coordinator proves it alive. */
  heard(): void {
    this.lastHeardAt = Date.now();
  }

  acked(ack: HeartbeatAck): void {
    const listed = this.unanswered.shift();
    if (listed === undefined) return;
    const renewed = new Set(ack.renewedLeaseIds);
    const lost = listed.filter((id) => !renewed.has(id));
    if (lost.length > 0) this.hooks.notRenewed(lost);
  }

  private schedule(): void {
    this.timer = setTimeout(() => this.tick(), jitter(this.intervalMs));
  }

  private tick(): void {
    if (Date.now() - this.lastHeardAt > SILENT_INTERVALS_BEFORE_RECONNECT * this.intervalMs) {
      this.stop();
      this.hooks.silent();
      return;
    }
    const leaseIds = this.hooks.heldLeaseIds();
    if (this.hooks.send({ leaseIds })) this.unanswered.push(leaseIds);
    this.schedule();
  }
}
