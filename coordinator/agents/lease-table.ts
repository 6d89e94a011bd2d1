import type { LeaseDecision, RunningLease } from '../../common/proto/ekaci/agent/v1/agent.js';
import type { LogStore } from '../logs/log-store.js';

/** What every lease handed to an agent has, a build's or a check's. */
export interface HeldLease {
  leaseId: string;
  agentId: string;
  expiresAt: number;
  logPath: string;
}

/**
 * The open leases of one kind of job (builds, checks), and the rules of agent.proto every lease follows alike: an
 * agent acts only on the leases it holds now (`own`); a heartbeat renews them for one TTL (`renew`); an agent that
 * comes back keeps the leases it lists, resuming their logs where the coordinator's copy ends, and loses the ones it
 * does not list (`reconcile`); a lease nobody renewed within its TTL has expired (`expired`). What losing or stopping
 * a lease means is the owner's business.
 */
export class LeaseTable<L extends HeldLease> {
  private readonly byId = new Map<string, L>();

  constructor(
    private readonly ttlMs: number,
    private readonly logs: LogStore,
    private readonly now: () => number,
  ) {}

  get size(): number {
    return this.byId.size;
  }

  get(leaseId: string): L | undefined {
    return this.byId.get(leaseId);
  }

  values(): L[] {
    return [...this.byId.values()];
  }

  add(lease: L): void {
    this.byId.set(lease.leaseId, lease);
  }

  delete(leaseId: string): void {
    this.byId.delete(leaseId);
  }

  clear(): void {
    this.byId.clear();
  }

  /** The lease if `agentId` holds it now. */
  own(agentId: string, leaseId: string): L | undefined {
    const lease = this.byId.get(leaseId);
    return lease?.agentId === agentId ? lease : undefined;
  }

  /** A heartbeat: extends the listed leases the agent still holds; answers those renewed. */
  renew(agentId: string, leaseIds: readonly string[]): { renewed: string[]; expiresAt: number } {
    const expiresAt = this.now() + this.ttlMs;
    const renewed = leaseIds.filter((id) => {
      const lease = this.own(agentId, id);
      if (lease) lease.expiresAt = expiresAt;
      return lease !== undefined;
    });
    return { renewed, expiresAt };
  }

  /**
   * An agent (re)connected and listed what it runs. A listed lease it still holds is kept, unless `stopped` gives a
   * reason it must end (cancelled while the agent was away; `stopped` ends it); the agent's leases it did not list
   * died with it and go to `lose`.
   */
  reconcile(
    agentId: string,
    running: readonly RunningLease[],
    stopped: (lease: L) => string | undefined,
    lose: (lease: L) => void,
  ): LeaseDecision[] {
    const decisions = running.map((r): LeaseDecision => {
      const lease = this.own(agentId, r.leaseId);
      if (!lease) return { leaseId: r.leaseId, keep: false, logOffset: 0, reason: 'lease is no longer valid' };
      const stop = stopped(lease);
      if (stop !== undefined) return { leaseId: r.leaseId, keep: false, logOffset: 0, reason: stop };
      lease.expiresAt = this.now() + this.ttlMs;
      return { leaseId: r.leaseId, keep: true, logOffset: this.logs.storedBytes(lease.logPath), reason: '' };
    });
    const listed = new Set(running.map((r) => r.leaseId));
    for (const lease of this.values()) if (lease.agentId === agentId && !listed.has(lease.leaseId)) lose(lease);
    return decisions;
  }

  /** The leases whose agents stopped renewing them. */
  expired(): L[] {
    const now = this.now();
    return this.values().filter((l) => l.expiresAt <= now);
  }
}
