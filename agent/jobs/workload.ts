import { EventEmitter } from 'node:events';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type {
  Assign,
  Cancel,
  JobEvent,
  LeaseDecision,
  Outcome,
  RunningLease,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { Outcome as Outcomes } from '../../common/proto/ekaci/agent/v1/agent.js';
import type { Outbox } from '../connection/outbox.js';
import type { LogShipper } from '../logs/shipper.js';
import type { LeaseLog, LogSpool } from '../logs/spool.js';
import type { CacheUploader } from '../nix/cache-upload.js';
import type { StorePool } from '../nix/store-pool.js';
import { Build, type BuildContext } from './build.js';
import { Check, type CheckContext } from './check.js';
import type { Job, JobResult } from './job.js';

/**
 * The life of a lease on this agent:
 *
 *   queued → building          a slot is free
 *   queued → awaiting-logs     cancelled before it started
 *   building → awaiting-logs   the build and its upload ended, whatever the outcome (the slot may have gone to
 *                              the next build once the builder ended)
 *   awaiting-logs → reporting  every log byte is acknowledged: Finished goes out
 *   reporting → settled        the coordinator acknowledged Finished; spool and GC roots are removed
 *   any but settled → dropped  the coordinator gave the lease up (lease decision, missed renewal) or stopNow()
 */
export type LeaseState = 'queued' | 'building' | 'awaiting-logs' | 'reporting' | 'settled' | 'dropped';

const TRANSITIONS: Record<LeaseState, readonly LeaseState[]> = {
  queued: ['building', 'awaiting-logs', 'dropped'],
  building: ['awaiting-logs', 'dropped'],
  'awaiting-logs': ['reporting', 'dropped'],
  reporting: ['settled', 'dropped'],
  settled: [],
  dropped: [],
};

class Lease {
  state: LeaseState = 'queued';
  job: Job | null = null;
  result: JobResult | null = null;
  finished: JobEvent | null = null;
  cancelAckDue = false;

  constructor(
    readonly assign: Assign,
    readonly log: LeaseLog,
  ) {}

  get id(): string {
    return this.assign.leaseId;
  }

  transition(to: LeaseState): void {
    if (!TRANSITIONS[this.state].includes(to)) {
      throw new IllegalStateError(`lease ${this.id}: illegal transition ${this.state} → ${to}`);
    }
    this.state = to;
  }
}

/** What the workload needs from the agent around it. */
export interface WorkloadHost {
  /** Sends a job event if a stream is ready; the outbox keeps it either way. */
  sendEvent(event: JobEvent): void;
  sendCancelAck(leaseId: string): void;
  /** A build slot became free: advertise credit again. */
  slotsFreed(): void;
  /** Cache settings from the latest Welcome. */
  cache(): Pick<BuildContext, 'cacheUrl' | 'cachePublicKey' | 'oneRequestUploads' | 'coordinatorStore'>;
}

export interface WorkloadOptions {
  maxJobs: number;
  pool: StorePool;
  uploader: CacheUploader;
  spool: LogSpool;
  shipper: LogShipper;
  outbox: Outbox;
  host: WorkloadHost;
  logger: Logger;
  /** SIGTERM → SIGKILL grace for cancels the agent decides itself (dropped or unrenewed leases). */
  localCancelGraceMs: number;
  /**
   * What check leases need besides the build context: the agent's token, whether its sandbox starts, and the
   * cgroups of their limits.
   */
  checks: Pick<CheckContext, 'token' | 'unavailable' | 'timeoutGraceMs' | 'cgroups'>;
}

interface WorkloadEvents {
  assigned: [leaseId: string];
  started: [leaseId: string];
  finished: [leaseId: string, outcome: Outcome];
  settled: [leaseId: string];
}

/**
 * The leases this agent holds and the jobs running for them: a `Build` for an `Assign` of a derivation, a `Check`
 * for one with `check` set ("build" below means either). At most `maxJobs` run at once; an `Assign` beyond that (a
 * coordinator that raced a Credit) waits in a local queue instead of being refused. A build whose builder ended
 * gives its slot back while its outputs upload, with at most `maxJobs` such uploads at once.
 */
export class Workload extends EventEmitter<WorkloadEvents> {
  private readonly leases = new Map<string, Lease>();
  private readonly queue: Lease[] = [];
  private readonly builds = new Set<Promise<void>>();
  private readonly cleanups = new Set<Promise<void>>();
  /** Jobs holding a build slot. */
  private running = 0;
  /** Builds whose builder ended and whose outputs are still uploading: they gave their slot back (`builderEnded`). */
  private uploading = 0;
  private halted = false;
  /** Holders of `pause` not yet resumed. */
  private pauses = 0;
  private idleWaiters: (() => void)[] = [];
  private buildsEndedWaiters: (() => void)[] = [];

  constructor(private readonly options: WorkloadOptions) {
    super();
    options.shipper.on('complete', (leaseId) => {
      const lease = this.leases.get(leaseId);
      if (lease !== undefined) this.report(lease);
    });
  }

  /** Holds queued builds back (they stay accepted and keep their slots) until each `pause` had its `resume`. */
  pause(): void {
    this.pauses++;
  }

  resume(): void {
    this.pauses = Math.max(0, this.pauses - 1);
    this.startQueued();
  }

  /** Builds that could start now: what `Credit.free_slots` advertises. */
  freeSlots(): number {
    return Math.max(0, this.options.maxJobs - this.running - this.queue.length);
  }

  heldLeaseIds(): string[] {
    return [...this.leases.keys()];
  }

  /** For `Hello.running_leases`: every lease whose result the coordinator has not yet acknowledged. */
  runningLeases(): RunningLease[] {
    return [...this.leases.values()].map((lease) => ({ leaseId: lease.id, logBytes: lease.log.size }));
  }

  /** Unacknowledged events that may go out on a new stream; a Finished waits until its log is acknowledged again. */
  resendable(): JobEvent[] {
    const shipper = this.options.shipper;
    return this.options.outbox.unacked().filter((e) => e.event?.$case !== 'finished' || shipper.fullyAcked(e.leaseId));
  }

  assign(assign: Assign): void {
    const { outbox, host, shipper, logger } = this.options;
    if (this.leases.has(assign.leaseId)) {
      logger.warn({ leaseId: assign.leaseId }, 'ignoring a repeated Assign');
      return;
    }
    let log: LeaseLog;
    try {
      log = this.options.spool.open(assign.leaseId);
    } catch (err) {
      // Without a spool there is no log to stand behind a result. Not holding the lease lets it lapse at its
      // first unanswered renewal, and the coordinator queues it again elsewhere as an infrastructure failure.
      logger.error({ err, leaseId: assign.leaseId }, 'cannot create the spool file; not taking the lease');
      return;
    }
    const lease = new Lease(assign, log);
    this.leases.set(lease.id, lease);
    shipper.track(lease.id, lease.log);
    host.sendEvent(outbox.add(lease.id, { $case: 'accepted', value: {} }));
    this.emit('assigned', lease.id);
    this.queue.push(lease);
    this.startQueued();
  }

  async cancel(cancel: Cancel): Promise<void> {
    const lease = this.leases.get(cancel.leaseId);
    const reason = cancel.reason || 'cancelled by the coordinator';
    if (lease?.state === 'queued') {
      this.unqueue(lease);
      this.checkIdle();
      lease.result = cancelledResult(reason);
      lease.transition('awaiting-logs');
      // Closing the (empty) log completes it; the shipper's 'complete' then reports Finished.
      void lease.log.close();
    } else if (lease?.state === 'building' && lease.job !== null) {
      // CancelAck goes out from buildEnded, once the processes are gone and before Finished.
      lease.cancelAckDue = true;
      await lease.job.cancel(reason, cancel.graceSeconds * 1000);
      return;
    }
    // Unknown or already finished leases are acknowledged too: Cancel is idempotent and the result stands.
    this.options.host.sendCancelAck(cancel.leaseId);
  }

  /** Applies `Welcome.lease_decisions`; a lease the coordinator did not mention is no longer ours. */
  applyDecisions(decisions: readonly LeaseDecision[]): void {
    const byId = new Map(decisions.map((d) => [d.leaseId, d]));
    for (const lease of [...this.leases.values()]) {
      const decision = byId.get(lease.id);
      if (decision?.keep) this.options.shipper.resume(lease.id, decision.logOffset);
      else this.drop(lease.id, decision ? decision.reason || 'dropped by the coordinator' : 'not named in Welcome');
    }
  }

  /** Forgets a lease that is no longer ours, stopping its build. */
  drop(leaseId: string, reason: string, graceMs = this.options.localCancelGraceMs): void {
    const lease = this.leases.get(leaseId);
    if (lease === undefined) return;
    this.options.logger.warn({ leaseId, reason }, 'dropping lease');
    const wasQueued = lease.state === 'queued';
    lease.transition('dropped');
    this.leases.delete(leaseId);
    this.options.outbox.forgetLease(leaseId);
    this.options.shipper.untrack(leaseId);
    if (wasQueued) this.unqueue(lease);
    // A running build cleans up when its process is gone (buildEnded); anything else can go now.
    if (lease.job !== null && lease.job.status !== 'done') void lease.job.cancel(reason, graceMs);
    else void this.cleanUp(lease);
    this.checkIdle();
  }

  /** Handles `Ack`: a settled lease leaves the spool. */
  acknowledged(messageIds: readonly number[]): void {
    for (const event of this.options.outbox.ack(messageIds)) {
      const lease = this.leases.get(event.leaseId);
      if (lease?.state !== 'reporting' || lease.finished?.messageId !== event.messageId) continue;
      lease.transition('settled');
      this.leases.delete(lease.id);
      this.options.shipper.untrack(lease.id);
      void this.cleanUp(lease).then(() => this.emit('settled', lease.id));
      this.checkIdle();
    }
  }

  /** Resolves once no lease is held and no build process is left. */
  whenIdle(): Promise<void> {
    if (this.idle()) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Resolves once no build runs or waits for a slot; leases may still wait for their results' acknowledgement. */
  whenBuildsEnded(): Promise<void> {
    if (this.buildsEnded()) return Promise.resolve();
    return new Promise((resolve) => this.buildsEndedWaiters.push(resolve));
  }

  /** Drops every lease, stopping builds with SIGTERM and SIGKILL after `graceMs`, and waits for the processes. */
  async stopAll(reason: string, graceMs: number): Promise<void> {
    this.halted = true;
    for (const leaseId of [...this.leases.keys()]) this.drop(leaseId, reason, graceMs);
    await Promise.allSettled([...this.builds]);
    await Promise.allSettled([...this.cleanups]);
  }

  private startQueued(): void {
    while (!this.halted && this.pauses === 0 && this.running < this.options.maxJobs) {
      const lease = this.queue.shift();
      if (lease === undefined) return;
      this.startBuild(lease);
    }
  }

  private startBuild(lease: Lease): void {
    const { host, outbox, spool, logger } = this.options;
    lease.transition('building');
    this.running++;
    let released = false;
    const context = {
      ...host.cache(),
      // The builder is done and only the upload is left: the slot goes to the next build while it runs, as long as
      // no more than `maxJobs` uploads run at once. A build and an upload barely compete (CPU against network), and
      // the slot no longer idles through every upload (bench/dispatch).
      builderEnded: () => {
        if (released || this.uploading >= this.options.maxJobs) return;
        released = true;
        this.running--;
        this.uploading++;
        this.startQueued();
        host.slotsFreed();
      },
      netrcPath: spool.netrcPath,
      pool: this.options.pool,
      uploader: this.options.uploader,
      spool,
      token: this.options.checks.token,
    };
    const jobLogger = logger.child({ leaseId: lease.id });
    const check = lease.assign.check;
    const job: Job =
      check === undefined
        ? new Build(lease.assign, context, lease.log, jobLogger)
        : new Check(lease.assign, check, { ...context, ...this.options.checks }, lease.log, jobLogger);
    lease.job = job;
    host.sendEvent(outbox.add(lease.id, { $case: 'started', value: { startedAtMs: Date.now() } }));
    this.emit('started', lease.id);
    const done = job.run().then((result) => {
      if (released) this.uploading--;
      else this.running--;
      this.buildEnded(lease, result);
      if (released) return;
      this.startQueued();
      host.slotsFreed();
    });
    this.builds.add(done);
    void done.finally(() => this.builds.delete(done));
  }

  private buildEnded(lease: Lease, result: JobResult): void {
    if (lease.state === 'dropped') {
      void this.cleanUp(lease);
    } else {
      if (lease.cancelAckDue) this.options.host.sendCancelAck(lease.id);
      lease.result = result;
      lease.transition('awaiting-logs');
      this.report(lease);
    }
    this.checkIdle();
  }

  /** Sends Finished once the log is fully acknowledged, or re-sends it when a new stream re-acknowledged the log. */
  private report(lease: Lease): void {
    const { outbox, host, shipper } = this.options;
    if (!shipper.fullyAcked(lease.id)) return;
    if (lease.state === 'reporting' && lease.finished !== null) {
      host.sendEvent(lease.finished);
      return;
    }
    if (lease.state !== 'awaiting-logs' || lease.result === null) return;
    const r = lease.result;
    const finished = {
      ...r,
      pushes: r.pushes ?? [],
      outputsInCoordinatorStore: r.outputsInCoordinatorStore ?? false,
      logBytes: lease.log.size,
    };
    lease.finished = outbox.add(lease.id, { $case: 'finished', value: finished });
    lease.transition('reporting');
    host.sendEvent(lease.finished);
    this.emit('finished', lease.id, r.outcome);
  }

  private unqueue(lease: Lease): void {
    const index = this.queue.indexOf(lease);
    if (index >= 0) this.queue.splice(index, 1);
  }

  private cleanUp(lease: Lease): Promise<void> {
    const { spool, logger } = this.options;
    const done = (async () => {
      try {
        spool.removeGcRoots(lease.id);
        await spool.removeWorkDir(lease.id);
        await lease.log.remove();
      } catch (err) {
        logger.warn({ err, leaseId: lease.id }, 'cannot remove the spool of a lease');
      }
    })();
    this.cleanups.add(done);
    void done.then(() => this.cleanups.delete(done));
    return done;
  }

  private idle(): boolean {
    return this.leases.size === 0 && this.running === 0 && this.uploading === 0;
  }

  private buildsEnded(): boolean {
    return this.running === 0 && this.uploading === 0 && this.queue.length === 0;
  }

  private checkIdle(): void {
    if (this.buildsEnded()) for (const resolve of this.buildsEndedWaiters.splice(0)) resolve();
    if (!this.idle()) return;
    for (const resolve of this.idleWaiters.splice(0)) resolve();
  }
}

function cancelledResult(reason: string): JobResult {
  return { outcome: Outcomes.OUTCOME_CANCELLED, error: `cancelled: ${reason}`, outputs: [], finishedAtMs: Date.now() };
}
