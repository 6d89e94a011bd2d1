import { timeOrderedId } from '../../common/time-ordered-id.js';
import { EventEmitter } from 'node:events';
import type { Logger } from '../../common/logging.js';
import { NixCommandError } from '../../common/errors.js';
import { argBatches, lastLines, runNix } from '../../common/nix/cli.js';
import {
  type Assign,
  type CachePush,
  type Finished,
  type LeaseDecision,
  Outcome,
  type RunningLease,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { outcomeDisposition } from '../../common/retry.js';
import type { DerivationGraph } from '../graph/derivation-graph.js';
import type { Health } from '../health.js';
import { readClosure } from '../graph/ingest.js';
import type { LogStore } from '../logs/log-store.js';
import { type HeldLease, LeaseTable } from '../agents/lease-table.js';
import { type BuildState, FAILURE_STATES, SUCCESS_STATES, isTerminal } from './build-state.js';
import type { AttemptState, BuildStore, DerivationRow, NewDerivation } from './build-store.js';
import { BuildDurations, buildSeconds } from './build-durations.js';
import { RunEtas } from './eta.js';
import { type AgentCapabilities, Scheduler, agentMatchesLane, isUntrustedLane } from './scheduler.js';

/** What the build pipeline needs from the binary cache. */
export interface OutputCache {
  hasPaths(storePaths: string[]): Set<string> | Promise<Set<string>>;
  /** The narinfo the cache holds for a path (its NAR checked on arrival), or undefined. */
  narInfo(storePath: string): Promise<{ narHash: string; narSize: number } | undefined>;
  /** `storeReady`: see BinaryCache.pushFromLocalStore. */
  pushFromLocalStore(paths: string[], options?: { derivation?: boolean; storeReady?: Promise<unknown> }): Promise<void>;
  /** NAR and closure sizes of paths the cache holds (with their closures). */
  sizes(storePaths: readonly string[]): Promise<Map<string, { narSize: number; closureSize: number }>>;
  /**
   * Puts `.drv` closures that only the evaluation store holds into the Nix store (see EvalStore): before they are
   * pushed or built. Absent where evaluations write the Nix store.
   */
  importDerivations?(drvPaths: readonly string[], gcRootsDir?: string): Promise<unknown>;
  /**
   * Copies outputs an agent left in the coordinator's own store (`Finished.outputs_in_coordinator_store`) into the
   * cache; rejects naming a path that store does not hold as valid. Absent where the coordinator has no store.
   */
  publishFromStore?(paths: readonly string[]): Promise<void>;
}

export interface BuildManagerOptions {
  leaseTtlMs: number;
  maxAttempts: number;
  unbuildableGraceMs: number;
  noOutputTimeoutSeconds: number;
  maxDurationSeconds: number;
  /** `build_max_log_bytes`: log bytes stored per attempt; a build whose log outgrows it fails. 0: no limit. */
  maxLogBytes: number;
}

interface Lease extends HeldLease {
  drvPath: string;
  attempt: number;
  /** The derivation's outputs, by name: what an Assign names and the only paths the lease may publish. */
  outputs: ReadonlyMap<string, string>;
  /** A fixed-output derivation: its uploaded output is checked against the hash it declares. */
  fixedOutput: boolean;
  /** The derivation's system, and when the attempt was assigned and started: what its duration is recorded by. */
  system: string;
  assignedAt: number;
  startedAt: number | null;
  /** Why the lease was cancelled (recorded on its attempt before the agent is told), if it was. */
  cancelled?: string;
  /** The log reached `maxLogBytes`: the build is stopped and fails. */
  overLimit?: boolean;
}

/** A lane of the queues as operators read them (`GET /api/v1/queues`, `ekaci status`). */
export interface QueueLane {
  kind: 'build' | 'fixed-output';
  system: string;
  features: string[];
  untrusted: boolean;
  buildable: number;
  waitingSince: number;
  agents: string[];
  why?: string;
}

export interface BuildResult {
  attr: string;
  drvPath: string;
  state: BuildState;
  attempts: number;
  agent: string | null;
  error: string | null;
  rootCause: string | null;
  outputs: Array<{ name: string; path: string; narSize: number | null; closureSize: number | null }>;
}

/**
 * How many dependents one write records as buildable or dependency-failed (`recordSome`), however many of its
 * reports settled derivations: ≈10–80 ms of the event loop.
 */
const FOLLOW_UP_SLICE = 1_000;

/** A write waiting for the next group commit, and how its caller learns the outcome. */
interface QueuedWrite {
  fn: () => void;
  settle: (err?: Error) => void;
}

/**
 * The build pipeline: takes derivations in, persists every transition, feeds the scheduler, hands out leases
 * and turns agents' results into states. Events: `work` (something became buildable), `cancel-lease`
 * (leaseId, agentId, reason), `settled` (a derivation reached a terminal state), `refused` (agentId, leaseId,
 * reason: a result that did not check out), `pushed` (drvPath, CachePushResult[]: how the agent's cache pushes went).
 */
export class BuildManager extends EventEmitter {
  private scheduler: Scheduler;
  private readonly leases: LeaseTable<Lease>;
  /** The open lease of each derivation being built. */
  private readonly leaseOf = new Map<string, Lease>();
  /** Derivations that reached a terminal state since the last `announceSettled()`; announced after the commit. */
  private settledNow: string[] = [];
  /** Who waits for which derivation to settle (`waitFor`). */
  private readonly waiters = new Map<string, Set<() => void>>();
  /** Agents' reports waiting for the next group commit (`writeSoon`), and the writes that run after them (`batch`). */
  private queuedWrites: QueuedWrite[] = [];
  private queuedLast: QueuedWrite[] = [];
  private flushScheduled = false;
  /**
   * Dependents whose state a settled derivation decided, to be recorded a slice at a time (`recordSome`): made ready
   * by a success (no root cause), or dependency-failed by a failure (its root cause).
   */
  private following: Array<{ drvPath: string; rootCause?: string }> = [];
  private followed = 0;
  private followUpScheduled = false;
  /** How many more dependents the running write may record (`recordSome`). */
  private followBudget = FOLLOW_UP_SLICE;
  /** Dependents a failure took out of the scheduler that are not yet recorded dependency-failed: their root cause. */
  private readonly doomed = new Map<string, string>();
  /** Whether a `write` is running; and the state changes it made, told when it commits. */
  private writing = false;
  private stateChanges: Array<{ drvPath: string; state: BuildState; attempt: number; agentId: string | null }> = [];
  /** The binary caches a derivation's outputs go to from the agent that builds it (see CachePushService). */
  pushPlanner: (drvPath: string) => CachePush[] = () => [];
  /** Build slots of the connected agents for a system (the coordinator sets it); 0: not known. */
  slotsFor: (system: string) => number = () => 0;
  /** How long builds of each package took: what ETAs are estimated from. */
  readonly durations: BuildDurations;
  /** ETAs of runs: the critical path of what they still need (eta.ts). */
  readonly etas: RunEtas;

  constructor(
    private readonly store: BuildStore,
    private readonly cache: OutputCache,
    private readonly logs: LogStore,
    private readonly options: BuildManagerOptions,
    private readonly logger: Logger,
    readonly graph: DerivationGraph,
    private readonly health: Health,
    private readonly now: () => number = Date.now,
  ) {
    super();
    this.scheduler = new Scheduler(now);
    this.leases = new LeaseTable<Lease>(options.leaseTtlMs, logs, now);
    this.durations = new BuildDurations(store.db, now);
    this.etas = new RunEtas(
      {
        pending: (drvPath) => {
          const v = this.scheduler.view(drvPath);
          if (!v) return undefined;
          const { system, fixedOutput } = v.spec;
          return { system, fixedOutput, status: v.status, inputs: v.spec.pendingInputs };
        },
        runningSince: () => new Map(store.openAttempts().map((a) => [a.drv_path, a.started_at ?? a.assigned_at])),
        slots: (system) => this.slotsFor(system),
      },
      this.durations,
      now,
    );
  }

  get pendingCount(): number {
    return this.scheduler.size;
  }

  /** Rebuilds the in-memory graph and the open leases from the database after a start or a crash. */
  recover(): void {
    // Agents get one lease TTL from now to reconnect and claim their leases.
    const expiresAt = this.now() + this.options.leaseTtlMs;
    const active = this.load(() => expiresAt);
    if (active > 0) {
      this.logger.info({ derivations: active, leases: this.leases.size }, 'recovered unfinished builds');
      this.emit('work');
    }
  }

  /**
   * Throws away what is in memory and loads it again from the database, the truth: after a write that failed (a
   * full disk, a busy database) left memory ahead of it, and when a paused coordinator resumes. Open leases keep
   * their expiry.
   */
  resync(): void {
    const expiry = new Map(this.leases.values().map((l) => [l.leaseId, l.expiresAt]));
    const fallback = this.now() + this.options.leaseTtlMs;
    this.scheduler = new Scheduler(this.now);
    this.leases.clear();
    this.leaseOf.clear();
    this.settledNow = [];
    // Loading makes every ready derivation buildable and every one with a failed input dependency-failed, in the
    // database too.
    this.following = [];
    this.followed = 0;
    this.doomed.clear();
    this.load((leaseId) => expiry.get(leaseId) ?? fallback);
    this.logger.warn(
      { derivations: this.scheduler.size, leases: this.leases.size },
      'reloaded builds from the database',
    );
    this.emit('work');
  }

  /** Fills the scheduler and the leases from the database; returns how many unfinished derivations there are. */
  private load(expiry: (leaseId: string) => number): number {
    const active = this.store.activeDerivations();
    const activeSet = new Map(active.map((d) => [d.drv_path, d]));
    const specs = active.map((d) => ({
      drvPath: d.drv_path,
      system: d.system,
      requiredFeatures: JSON.parse(d.required_features) as string[],
      fixedOutput: d.is_fod === 1,
      pendingInputs: this.store.inputsOf(d.drv_path).filter((i) => activeSet.has(i)),
      priority: 0,
      untrusted: d.untrusted === 1,
    }));
    const ready = new Set(this.scheduler.add(specs));
    // An input that failed, where the failure's dependents were not all recorded before a crash (`recordSome`): the
    // derivation and what depends on it fail now, not build.
    const failedInput = this.store.unfinishedWithFailedInput(FAILURE_STATES);
    for (const a of this.store.openAttempts()) {
      if (!this.scheduler.has(a.drv_path)) continue;
      const row = activeSet.get(a.drv_path)!;
      this.scheduler.markBuilding(a.drv_path);
      ready.delete(a.drv_path);
      this.track({
        leaseId: a.lease_id,
        drvPath: a.drv_path,
        attempt: a.attempt,
        agentId: a.agent_id,
        expiresAt: expiry(a.lease_id),
        logPath: a.log_path,
        outputs: this.outputMap(a.drv_path),
        fixedOutput: row.is_fod === 1,
        system: row.system,
        assignedAt: a.assigned_at,
        startedAt: a.started_at,
        ...(a.cancel_reason !== null ? { cancelled: a.cancel_reason } : {}),
        ...(a.log_truncated === 1 ? { overLimit: true } : {}),
      });
    }
    const now = this.now();
    try {
      this.store.transaction(() => {
        for (const [drvPath, rootCause] of failedInput) {
          const status = this.scheduler.status(drvPath);
          if (status === undefined || status === 'building') continue;
          for (const doomed of [drvPath, ...this.scheduler.failed(drvPath)]) {
            ready.delete(doomed);
            const row = activeSet.get(doomed)!;
            this.transition(doomed, 'dependency-failed', row.attempts, now, { rootCause });
            this.settledNow.push(doomed);
          }
        }
        for (const d of active) {
          if (!this.scheduler.has(d.drv_path)) continue; // dependency-failed above
          if (d.state === 'building' && !this.leaseOf.has(d.drv_path)) {
            // Recorded as building without an open attempt: the attempt was lost in the crash; build it again.
            this.scheduler.retry(d.drv_path, d.agent_id ?? '');
            this.transition(d.drv_path, 'buildable', d.attempts, now, { detail: 'retrying: its attempt was lost' });
          } else if (d.state === 'queued' && ready.has(d.drv_path)) {
            // Its inputs finished, but the crash came before it was recorded as buildable.
            this.transition(d.drv_path, 'buildable', d.attempts, now);
          }
        }
      });
    } catch (err) {
      // Memory is right; the database catches up on the next load (a full disk pauses work until then).
      this.settledNow = [];
      this.health.fault('recover', err);
    }
    this.announceSettled();
    return active.length;
  }

  /**
   * Takes a build request: the closure of the roots is read, what is already built or in a cache is settled at
   * once, the rest is queued. Returns the request id.
   *
   * `untrusted`: the request runs code of someone without write access (a pull request's head): what only such
   * requests want is built by agents with Nix's sandbox on. A trusted request for the same derivations lifts that.
   * `private`: the request is for a private repository: what only such requests want is served only with a
   * credential.
   */
  async submit(
    roots: ReadonlyArray<{ attr: string; drvPath: string }>,
    source: string,
    options: { rebuildFailed?: boolean; untrusted?: boolean; private?: boolean; gcRootsDir?: string } = {},
  ): Promise<number> {
    const origin = { untrusted: options.untrusted ?? false, private: options.private ?? false };
    const rootPaths = [...new Set(roots.map((r) => r.drvPath))];
    // A build failure is final unless someone asks for a rebuild (a "Rebuild failed" button, `@eka-ci rebuild`).
    const retryable = new Set<BuildState>([
      'cancelled',
      'unbuildable',
      'dependency-failed',
      ...(options.rebuildFailed ? (['failed', 'timed-out'] as const) : []),
    ]);
    const known = (p: string): boolean => {
      if (this.scheduler.has(p)) return true;
      const row = this.store.derivation(p);
      return row !== undefined && !retryable.has(row.state);
    };
    const fresh = await readClosure(rootPaths, known);
    const freshSet = new Set(fresh.map((d) => d.drvPath));
    const settled = await this.findSettled(fresh);
    const toBuild = fresh.filter((d) => !settled.has(d.drvPath));
    // Outputs found already built still get their sizes recorded: a review compares them like built ones.
    const settledOutputs = fresh.filter((d) => settled.has(d.drvPath)).flatMap((d) => Object.values(d.outputs));
    const sizes = settledOutputs.length > 0 ? await this.cache.sizes(settledOutputs) : new Map<string, never>();
    if (toBuild.length > 0) {
      // Agents with their own stores fetch the .drv closure from the cache; it may be only in the evaluation store.
      const drvPaths = toBuild.map((d) => d.drvPath);
      // The cache takes the .drv files from the evaluation store while the Nix store imports them (a second or two
      // of bench/dispatch's 1,000 derivations apiece); sources go to the cache once the import is done.
      const imported = this.cache.importDerivations?.(drvPaths, options.gcRootsDir) ?? Promise.resolve();
      await Promise.all([
        imported,
        this.cache.pushFromLocalStore(drvPaths, { derivation: true, storeReady: imported }),
      ]);
    }

    const now = this.now();
    const inputStates = this.store.states([...new Set(fresh.flatMap((d) => d.inputs.filter((i) => !freshSet.has(i))))]);
    const specs: Parameters<Scheduler['add']>[0][number][] = [];
    const depFailed = new Map<string, string>(); // drv -> root cause
    const requestId = this.write(() => {
      // While the closure was read and the caches asked, another request may have queued or finished some of these
      // derivations: those are not this request's to reset, and count as inputs like any known derivation.
      const taken = new Set(fresh.filter((d) => known(d.drvPath)).map((d) => d.drvPath));
      this.store.insertDerivations(fresh, now, origin);
      this.widen(rootPaths, origin);
      for (const d of fresh) {
        if (taken.has(d.drvPath)) continue;
        const prior = this.store.derivation(d.drvPath)!;
        if (prior.state !== 'queued')
          this.transition(d.drvPath, 'queued', prior.attempts, now, { detail: 'requested again' });
        if (settled.has(d.drvPath)) {
          for (const [name, path] of Object.entries(d.outputs)) {
            const size = sizes.get(path);
            if (size) this.store.recordOutput(d.drvPath, name, path, size.narSize, size.closureSize);
          }
          this.transition(d.drvPath, 'substituted', prior.attempts, now);
          this.settledNow.push(d.drvPath);
          continue;
        }
        const pending: string[] = [];
        let rootCause: string | undefined;
        for (const input of d.inputs) {
          const cause = depFailed.get(input) ?? this.doomed.get(input);
          if (cause) rootCause ??= cause;
          else if (freshSet.has(input) && !taken.has(input)) {
            if (!settled.has(input)) pending.push(input);
          } else if (this.scheduler.has(input)) pending.push(input);
          else {
            const row = taken.has(input) ? this.store.derivation(input) : inputStates.get(input);
            if (row && FAILURE_STATES.has(row.state)) rootCause ??= row.root_cause ?? input;
          }
        }
        if (rootCause) {
          depFailed.set(d.drvPath, rootCause);
          this.transition(d.drvPath, 'dependency-failed', prior.attempts, now, { rootCause });
          this.settledNow.push(d.drvPath);
          continue;
        }
        specs.push({
          drvPath: d.drvPath,
          system: d.system,
          requiredFeatures: d.requiredFeatures,
          fixedOutput: d.fixedOutput,
          pendingInputs: pending,
          priority: 0,
          untrusted: prior.untrusted === 1,
        });
      }
      const ready = this.scheduler.add(specs);
      this.graph.add(fresh, (p) => this.scheduler.has(p));
      for (const r of ready) this.transition(r, 'buildable', 0, now);
      return this.store.createRequest(source, roots, now);
    });
    this.logger.info(
      { requestId, roots: rootPaths.length, new: fresh.length, substituted: settled.size, queued: specs.length },
      'build request accepted',
    );
    if (specs.length > 0) this.emit('work');
    this.announceSettled();
    return requestId;
  }

  /**
   * A trusted request makes the unfinished derivations it needs trusted; a public one makes the derivations it
   * names public. Walks the database only when something could change.
   */
  private widen(rootPaths: readonly string[], origin: { untrusted: boolean; private: boolean }): void {
    if (!origin.untrusted && this.scheduler.untrustedCount > 0) {
      for (const drv of this.unfinishedClosure(rootPaths)) {
        this.scheduler.trust(drv);
        this.store.trust(drv);
      }
    }
    if (!origin.private) for (const drv of rootPaths) this.store.publish(drv);
  }

  /**
   * Hands up to `slots` buildable derivations to an agent as leases. The attempts are committed before the
   * caller sends the assignments, so a crash never leaves a build running that the database does not know. Hands
   * out nothing while new work is paused (a full disk).
   */
  assign(
    agent: AgentCapabilities,
    slots: number,
    othersCanTake: (lane: string, excluded: ReadonlySet<string>) => boolean,
  ): Assign[] {
    const out: Assign[] = [];
    if (!this.health.accepting) return out;
    const now = this.now();
    this.write(() => {
      while (out.length < slots) {
        const drvPath = this.scheduler.take(agent, othersCanTake);
        if (!drvPath) break;
        const row = this.store.derivation(drvPath)!;
        const attempt = row.attempts + 1;
        const lease: Lease = {
          leaseId: timeOrderedId(now),
          drvPath,
          attempt,
          agentId: agent.agentId,
          expiresAt: now + this.options.leaseTtlMs,
          logPath: this.logs.pathFor(drvPath, attempt),
          outputs: this.outputMap(drvPath),
          fixedOutput: row.is_fod === 1,
          system: row.system,
          assignedAt: now,
          startedAt: null,
        };
        this.store.insertAttempt({ ...lease, now });
        this.transition(drvPath, 'building', attempt, now, { agentId: agent.agentId });
        this.track(lease);
        out.push({
          leaseId: lease.leaseId,
          drvPath,
          attempt,
          maxSilentSeconds: this.options.noOutputTimeoutSeconds,
          timeoutSeconds: this.options.maxDurationSeconds,
          outputNames: [...lease.outputs.keys()],
          maxLogBytes: this.options.maxLogBytes,
          inputOutputs: this.store.inputOutputsOf(drvPath),
          check: undefined,
          pushes: this.pushPlanner(drvPath),
        });
      }
    });
    return out;
  }

  /**
   * Runs `fn` (a dispatch round: calls of `assign`) in the next group commit, after the reports that arrived with it,
   * so that it sees what they freed and made buildable and shares their commit (a commit of its own was a fifth of a
   * busy coordinator's time). Resolves once committed; rejects if `fn` failed (what it did is rolled back and memory
   * reloaded) or the commit did.
   */
  batch(fn: () => void): Promise<void> {
    return this.writeSoon(fn, true);
  }

  /** Records that an agent took a lease; committed with the next group of reports (`writeSoon`). */
  accepted(agentId: string, leaseId: string): Promise<void> {
    return this.writeSoon(() => {
      if (this.ownLease(agentId, leaseId)) this.store.acceptAttempt(leaseId);
    });
  }

  /** Records when an agent started a lease's build; committed with the next group of reports. */
  started(agentId: string, leaseId: string, at: number): Promise<void> {
    return this.writeSoon(() => {
      const lease = this.ownLease(agentId, leaseId);
      if (!lease) return;
      lease.startedAt = at || this.now();
      this.store.startAttempt(leaseId, lease.startedAt);
    });
  }

  /**
   * Records a finished attempt. Idempotent: a result for a lease that is already closed changes nothing. A success
   * counts only if its outputs are exactly the derivation's and each is in the cache (its NAR checked there);
   * otherwise the attempt is this agent's infrastructure failure, retried elsewhere, and `refused` is emitted.
   */
  async finished(agentId: string, leaseId: string, f: Finished): Promise<void> {
    const held = this.ownLease(agentId, leaseId);
    if (!held) return;
    if (f.outcome === Outcome.OUTCOME_SUCCEEDED) {
      const problem = await this.outputProblem(held, f);
      if (problem !== undefined) {
        this.emit('refused', agentId, leaseId, problem);
        f = { ...f, outcome: Outcome.OUTCOME_INFRA_ERROR, error: `result refused: ${problem}`, outputs: [] };
      }
    }
    // Pushes count only with a result that checked out: a refused one's "pushed" is not believed.
    if (f.pushes.length > 0 && f.outcome === Outcome.OUTCOME_SUCCEEDED) this.emit('pushed', held.drvPath, f.pushes);
    await this.writeSoon(() => this.recordFinished(agentId, leaseId, f));
  }

  /**
   * The write of `finished`, run in a group commit's savepoint: the lease is looked up again, it may have ended
   * meanwhile.
   */
  private recordFinished(agentId: string, leaseId: string, f: Finished): void {
    const lease = this.ownLease(agentId, leaseId);
    if (!lease) return;
    const now = this.now();
    if (lease.overLimit && f.outcome !== Outcome.OUTCOME_SUCCEEDED) {
      // Stopped by us (or by Nix's max-build-log-size) for its log: that is the build's failure, not a cancellation.
      f = { ...f, outcome: Outcome.OUTCOME_FAILED, error: this.overLimitReason() };
    }
    const attemptState = ATTEMPT_STATE[f.outcome] ?? 'infra-error';
    const error = f.error || null;
    this.closeAttempt(lease, attemptState, error, now);
    if (lease.cancelled !== undefined && f.outcome !== Outcome.OUTCOME_SUCCEEDED) {
      // Whatever stopped it, a cancelled build is never retried.
      this.settle(lease.drvPath, 'cancelled', lease.attempt, now, { agentId, error: lease.cancelled });
    } else if (f.outcome === Outcome.OUTCOME_SUCCEEDED) {
      for (const o of f.outputs) this.store.recordOutput(lease.drvPath, o.name, o.path, o.narSize, o.closureSize);
      const seconds = buildSeconds(lease, f.finishedAtMs, now);
      if (seconds !== undefined)
        this.durations.record(
          { drvPath: lease.drvPath, system: lease.system, fixedOutput: lease.fixedOutput },
          seconds,
        );
      this.settle(lease.drvPath, 'succeeded', lease.attempt, now, { agentId });
    } else if (outcomeDisposition(f.outcome) === 'retry') {
      this.retryOrFail(lease, error ?? 'infrastructure failure', now);
    } else {
      const state: BuildState =
        f.outcome === Outcome.OUTCOME_TIMED_OUT
          ? 'timed-out'
          : f.outcome === Outcome.OUTCOME_CANCELLED
            ? 'cancelled'
            : 'failed';
      this.settle(lease.drvPath, state, lease.attempt, now, { agentId, error: error ?? undefined });
    }
    this.untrack(lease);
  }

  /**
   * Group commit: `fn` runs with the other reports that arrive before the event loop turns, in one transaction (a
   * commit per report was most of the cost of a busy fleet), each in a savepoint of its own. The promise resolves
   * once the transaction committed — an agent's result is acknowledged only then — and rejects if `fn` failed
   * (its savepoint is rolled back and memory reloaded) or the commit did.
   */
  private writeSoon(fn: () => void, last = false): Promise<void> {
    return new Promise((resolve, reject) => {
      (last ? this.queuedLast : this.queuedWrites).push({
        fn,
        settle: (err) => (err === undefined ? resolve() : reject(err)),
      });
      if (this.flushScheduled) return;
      this.flushScheduled = true;
      setImmediate(() => this.flushWrites());
    });
  }

  private flushWrites(): void {
    this.flushScheduled = false;
    const reports = this.queuedWrites.length;
    const queued = [...this.queuedWrites, ...this.queuedLast];
    this.queuedWrites = [];
    this.queuedLast = [];
    let failed: ReadonlyMap<number, Error>;
    try {
      // Reports rarely fail, so they first run together without savepoints (a savepoint per report cost as much as
      // the report); a failure rolls them all back, and `write` reloads memory.
      this.write(() => {
        for (const q of queued) q.fn();
      });
      failed = new Map();
    } catch {
      failed = this.flushEach(queued);
    }
    queued.forEach((q, i) => q.settle(failed.get(i)));
    // A dispatch round that ran last in this commit already saw what the reports changed.
    if (reports > 0 && reports === queued.length) this.emit('work');
    this.announceSettled();
  }

  /**
   * The reports of a group commit that failed, again, each in a savepoint of its own: the failing one is rolled back
   * and told why, the others are committed. Returns the errors by report; all of them fail if the commit does.
   */
  private flushEach(queued: readonly QueuedWrite[]): ReadonlyMap<number, Error> {
    const failed = new Map<number, Error>();
    try {
      this.write(() => {
        queued.forEach((q, i) => {
          const [settled, changed] = [this.settledNow.length, this.stateChanges.length];
          try {
            this.store.transaction(q.fn);
          } catch (err) {
            this.settledNow.length = settled;
            this.stateChanges.length = changed;
            failed.set(i, asError(err));
          }
        });
      });
    } catch (err) {
      return new Map(queued.map((_, i) => [i, asError(err)]));
    }
    if (failed.size > 0) {
      // What the failed reports did to memory was not rolled back with their savepoints.
      const committed = this.settledNow;
      try {
        this.resync();
      } catch (again) {
        this.health.fault('resync', again);
      }
      this.settledNow = committed;
    }
    return failed;
  }

  /** The open leases, oldest first: what runs where. */
  openLeases(): Array<{ leaseId: string; agentId: string; drvPath: string; attempt: number; expiresAt: number }> {
    return this.leases.values().map((l) => ({
      leaseId: l.leaseId,
      agentId: l.agentId,
      drvPath: l.drvPath,
      attempt: l.attempt,
      expiresAt: l.expiresAt,
    }));
  }

  /** Whether a lease is an open build lease (memory only: asked for every log chunk an agent sends). */
  holds(leaseId: string): boolean {
    return this.leases.get(leaseId) !== undefined;
  }

  /** An open lease: who holds it, its derivation and the output paths it may publish; undefined if not open. */
  openLease(
    leaseId: string,
  ): { agentId: string; drvPath: string; outputPaths: string[]; fixedOutput: boolean } | undefined {
    const lease = this.leases.get(leaseId);
    if (!lease) return undefined;
    return {
      agentId: lease.agentId,
      drvPath: lease.drvPath,
      outputPaths: [...lease.outputs.values()],
      fixedOutput: lease.fixedOutput,
    };
  }

  private outputMap(drvPath: string): ReadonlyMap<string, string> {
    return new Map(this.store.outputsOf(drvPath).map((o) => [o.name, o.path]));
  }

  /** Why a reported success cannot be believed, or undefined when its outputs check out. */
  private async outputProblem(lease: Lease, f: Finished): Promise<string | undefined> {
    const declared = lease.outputs;
    const reported = new Map(f.outputs.map((o) => [o.name, o.path]));
    const same = declared.size === reported.size && [...declared].every(([name, path]) => reported.get(name) === path);
    if (!same) {
      const list = (m: ReadonlyMap<string, string>): string => [...m].map(([n, p]) => `${n}=${p}`).join(', ') || 'none';
      return `reported outputs (${list(reported)}) are not the outputs of ${lease.drvPath} (${list(declared)})`;
    }
    if (f.outputsInCoordinatorStore && this.cache.publishFromStore) {
      try {
        await this.cache.publishFromStore([...declared.values()]);
      } catch (err) {
        return `its outputs were to be in the coordinator's store, but: ${asError(err).message}`;
      }
    }
    for (const path of declared.values()) {
      if ((await this.cache.narInfo(path)) === undefined) return `output ${path} was not uploaded to the cache`;
    }
    return undefined;
  }

  /**
   * Stores a log chunk; returns the bytes stored for the lease, or undefined for a lease this agent never held.
   * Chunks of this agent's attempts that already finished are still stored: after a reconnect an agent sends the
   * result and the rest of its log in any order, and the log must end complete. A log that reaches
   * `build_max_log_bytes` stops there; its build is stopped and fails.
   */
  appendLog(agentId: string, leaseId: string, offset: number, data: Uint8Array): number | undefined {
    const limit = this.options.maxLogBytes > 0 ? this.options.maxLogBytes : Infinity;
    const lease = this.ownLease(agentId, leaseId);
    if (!lease) return this.appendLate(agentId, leaseId, offset, data, limit);
    const stored = this.logs.append(lease.logPath, offset, data, limit);
    if (stored < offset + data.length && stored >= limit && !lease.overLimit) this.logOverLimit(lease);
    return lease.overLimit ? Math.max(stored, offset + data.length) : stored;
  }

  /** A chunk for an attempt that finished: stored at its place in the attempt's log, which stays closed. */
  private appendLate(
    agentId: string,
    leaseId: string,
    offset: number,
    data: Uint8Array,
    limit: number,
  ): number | undefined {
    const attempt = this.store.attempt(leaseId);
    if (!attempt || attempt.agent_id !== agentId) return undefined;
    const stored = this.logs.append(attempt.log_path, offset, data, limit);
    this.logs.close(attempt.log_path);
    if (stored !== attempt.log_bytes) this.store.setLogBytes(leaseId, stored);
    // Bytes past the limit were dropped on purpose: acknowledged, so the agent stops sending them.
    return attempt.log_truncated === 1 || stored >= limit ? Math.max(stored, offset + data.length) : stored;
  }

  private overLimitReason(): string {
    return `the build log exceeded build_max_log_bytes (${this.options.maxLogBytes} bytes); the rest was dropped`;
  }

  /** The log is full: recorded on the attempt, then the agent is told to stop the build, which fails. */
  private logOverLimit(lease: Lease): void {
    lease.overLimit = true;
    this.write(() => this.store.markLogTruncated(lease.leaseId));
    this.logger.warn({ leaseId: lease.leaseId, drvPath: lease.drvPath }, this.overLimitReason());
    this.emit('cancel-lease', lease.leaseId, lease.agentId, this.overLimitReason());
  }

  /** Heartbeat: extends the agent's leases it still holds. Returns those renewed. */
  renew(agentId: string, leaseIds: readonly string[]): { renewed: string[]; expiresAt: number } {
    return this.leases.renew(agentId, leaseIds);
  }

  /**
   * An agent (re)connected and listed what it runs: each listed lease is kept if it is still this agent's, with
   * the log length the coordinator has; this agent's leases it did not list died with it and are retried.
   */
  reconcile(agentId: string, running: readonly RunningLease[]): LeaseDecision[] {
    const stopped = (lease: Lease): string | undefined => {
      const stop = lease.cancelled ?? (lease.overLimit ? this.overLimitReason() : undefined);
      // Cancelled (or over its log limit) while the agent was away: it learns now, and the build ends here.
      if (stop !== undefined) this.end(lease, lease.cancelled !== undefined ? 'cancelled' : 'failed', stop);
      return stop;
    };
    return this.leases.reconcile(agentId, running, stopped, (lease) =>
      this.lose(lease, 'the agent restarted without it'),
    );
  }

  /** Leases whose agents stopped renewing them are lost: the derivation is retried (elsewhere if possible). */
  expireLeases(): void {
    for (const lease of this.leases.expired()) {
      this.lose(lease, `lease expired: agent ${lease.agentId} stopped renewing it`);
    }
  }

  /**
   * The queues as an operator reads them: per lane (system, features, fixed-output or not, untrusted or not) what
   * is buildable, since when, which connected agents serve it, and — when none does — why it waits.
   */
  queues(agents: readonly AgentCapabilities[]): { pending: number; lanes: QueueLane[] } {
    const lanes = this.scheduler.lanesWaiting().map(({ lane, buildable, since }) => {
      const [kind = '', system = '', features = ''] = lane.split('|');
      const serving = agents.filter((a) => agentMatchesLane(a, lane)).map((a) => a.agentId);
      const why = serving.length === 0 ? this.noAgentFor(lane) : undefined;
      return {
        kind: kind === 'fod' ? ('fixed-output' as const) : ('build' as const),
        system,
        features: features === '' ? [] : features.split(','),
        untrusted: isUntrustedLane(lane),
        buildable,
        waitingSince: since,
        agents: serving,
        ...(why ? { why } : {}),
      };
    });
    return { pending: this.scheduler.size, lanes };
  }

  /** Why a lane no connected agent serves waits (and ends unbuildable after the grace period). */
  private noAgentFor(lane: string): string {
    const [, system, features] = lane.split('|');
    const what = `${system}${features ? ` with features ${features}` : ''}`;
    return isUntrustedLane(lane)
      ? `no connected agent with Nix's sandbox on builds ${what}: this is code from someone without write access, ` +
          'which builds only in a sandbox (unless [security] allow_unsandboxed_untrusted_builds = true)'
      : `no connected agent builds ${what}`;
  }

  /**
   * Buildable derivations that no connected agent can build, past the grace period, become `unbuildable` and
   * their dependents `dependency-failed`.
   */
  markUnbuildable(agents: readonly AgentCapabilities[]): void {
    const now = this.now();
    let changed = false;
    for (const [lane, since] of this.scheduler.waitingLanes()) {
      if (agents.some((a) => agentMatchesLane(a, lane))) continue;
      if (now - since < this.options.unbuildableGraceMs) continue;
      const why = this.noAgentFor(lane);
      this.write(() => {
        for (const drvPath of this.scheduler.buildableIn(lane)) {
          const row = this.store.derivation(drvPath)!;
          this.settle(drvPath, 'unbuildable', row.attempts, now, { error: why });
        }
      });
      changed = true;
    }
    if (changed) this.announceSettled();
  }

  /** Cancels derivations: queued ones at once, running ones through their agents (`cancel-lease`). */
  cancel(drvPaths: readonly string[], reason: string): void {
    const now = this.now();
    const toTell: Lease[] = [];
    this.write(() => {
      for (const drvPath of drvPaths) {
        const status = this.scheduler.status(drvPath);
        if (status === undefined) continue;
        if (status === 'building') {
          const lease = this.leaseOf.get(drvPath);
          if (lease && lease.cancelled === undefined) {
            // Recorded before it is sent: a restart or a reconnect still delivers it, and expiry does not retry it.
            this.store.cancelAttempt(lease.leaseId, reason);
            lease.cancelled = reason;
            toTell.push(lease);
          }
          continue;
        }
        const row = this.store.derivation(drvPath)!;
        this.settle(drvPath, 'cancelled', row.attempts, now, { error: reason });
      }
    });
    for (const lease of toTell) this.emit('cancel-lease', lease.leaseId, lease.agentId, reason);
    this.announceSettled();
  }

  /** The unfinished derivations in the closures of `roots` (what cancelling a request would stop). */
  unfinishedClosure(roots: readonly string[]): Set<string> {
    const out = new Set<string>();
    const seen = new Set<string>();
    const todo = [...roots];
    while (todo.length > 0) {
      const drv = todo.pop()!;
      if (seen.has(drv)) continue;
      seen.add(drv);
      const row = this.store.derivation(drv);
      if (!row || isTerminal(row.state)) continue;
      out.add(drv);
      todo.push(...this.store.inputsOf(drv));
    }
    return out;
  }

  /** Every derivation that is not finished, for shutdown: cancel the running ones. */
  activeDerivations(): string[] {
    return this.store.activeDerivations().map((d) => d.drv_path);
  }

  results(requestId: number): BuildResult[] {
    return this.store.requestRoots(requestId).map((r) => {
      const row = this.store.derivation(r.drvPath);
      return {
        attr: r.attr,
        drvPath: r.drvPath,
        state: row?.state ?? 'queued',
        attempts: row?.attempts ?? 0,
        agent: row?.agent_id ?? null,
        error: row?.error ?? null,
        rootCause: row?.root_cause ?? null,
        outputs: this.store.outputsOf(r.drvPath).map((o) => ({
          name: o.name,
          path: o.path,
          narSize: o.nar_size,
          closureSize: o.closure_size,
        })),
      };
    });
  }

  isSettled(requestId: number): boolean {
    return this.store.requestRoots(requestId).every((r) => {
      const row = this.store.derivation(r.drvPath);
      return row !== undefined && isTerminal(row.state);
    });
  }

  /** Resolves when every root of the request has reached a terminal state. */
  waitFor(requestId: number): Promise<BuildResult[]> {
    const pending = new Set(
      this.store
        .requestRoots(requestId)
        .map((r) => r.drvPath)
        .filter((p) => {
          const row = this.store.derivation(p);
          return row === undefined || !isTerminal(row.state);
        }),
    );
    return new Promise((resolve) => {
      if (pending.size === 0) {
        resolve(this.results(requestId));
        return;
      }
      for (const drvPath of pending) {
        const done = (): void => {
          pending.delete(drvPath);
          if (pending.size === 0) resolve(this.results(requestId));
        };
        let set = this.waiters.get(drvPath);
        if (!set) this.waiters.set(drvPath, (set = new Set()));
        set.add(done);
      }
    });
  }

  /** Emits `settled` for each derivation that reached a terminal state, once their transaction committed. */
  private announceSettled(): void {
    const done = this.settledNow;
    this.settledNow = [];
    for (const drvPath of done) {
      this.graph.unpin(drvPath);
      const waiting = this.waiters.get(drvPath);
      this.waiters.delete(drvPath);
      for (const w of waiting ?? []) w();
      this.emit('settled', drvPath);
    }
  }

  private ownLease(agentId: string, leaseId: string): Lease | undefined {
    return this.leases.own(agentId, leaseId);
  }

  private lose(lease: Lease, reason: string): void {
    if (lease.cancelled !== undefined || lease.overLimit) {
      // A cancelled build is never requeued, and one over its log limit has failed, however its agent went away.
      this.end(
        lease,
        lease.cancelled !== undefined ? 'cancelled' : 'failed',
        lease.cancelled ?? this.overLimitReason(),
      );
      this.emit('cancel-lease', lease.leaseId, lease.agentId, reason);
      return;
    }
    const now = this.now();
    this.logger.warn({ leaseId: lease.leaseId, drvPath: lease.drvPath, agentId: lease.agentId }, reason);
    this.write(() => {
      this.closeAttempt(lease, 'lost', reason, now);
      this.retryOrFail(lease, reason, now);
    });
    this.untrack(lease);
    this.emit('cancel-lease', lease.leaseId, lease.agentId, reason);
    this.emit('work');
    this.announceSettled();
  }

  /** Ends a lease without a result from its agent: cancelled, or failed for its log. */
  private end(lease: Lease, state: 'cancelled' | 'failed', reason: string): void {
    const now = this.now();
    this.write(() => {
      this.closeAttempt(lease, state, reason, now);
      this.settle(lease.drvPath, state, lease.attempt, now, { agentId: lease.agentId, error: reason });
    });
    this.untrack(lease);
    this.emit('work');
    this.announceSettled();
  }

  /** Records how a lease's attempt ended, with the bytes of its log stored by then. */
  private closeAttempt(lease: Lease, state: AttemptState, error: string | null, now: number): void {
    this.store.finishAttempt(lease.leaseId, state, error, now, this.logs.storedBytes(lease.logPath));
  }

  private track(lease: Lease): void {
    this.leases.add(lease);
    this.leaseOf.set(lease.drvPath, lease);
  }

  private untrack(lease: Lease): void {
    this.leases.delete(lease.leaseId);
    if (this.leaseOf.get(lease.drvPath) === lease) this.leaseOf.delete(lease.drvPath);
    this.logs.close(lease.logPath);
  }

  /**
   * A write transaction. When it fails, what it did to memory (the scheduler, leases) may be ahead of the
   * database: memory is reloaded from the database before the error goes on to the caller. A write inside another
   * is part of it, without a savepoint of its own (one per lease cost as much as the lease): its error is the outer
   * one's to handle.
   */
  private write<T>(fn: () => T): T {
    if (this.writing) return fn();
    const unannounced = this.stateChanges.length;
    this.writing = true;
    this.followBudget = FOLLOW_UP_SLICE;
    let result: T;
    try {
      result = this.store.transaction(fn);
    } catch (err) {
      this.writing = false;
      this.stateChanges.length = unannounced;
      this.settledNow = [];
      try {
        this.resync();
      } catch (again) {
        this.health.fault('resync', again);
      }
      throw err;
    }
    this.writing = false;
    this.announceStates();
    return result;
  }

  /** Emits `state` for the transitions of a write, once it committed: a rolled-back change is never told. */
  private announceStates(): void {
    const changes = this.stateChanges;
    this.stateChanges = [];
    for (const c of changes) this.emit('state', c.drvPath, c.state, c.attempt, c.agentId);
  }

  /** The one way the build pipeline changes a derivation's state: an illegal move is logged and counted, not made. */
  private transition(
    drvPath: string,
    state: BuildState,
    attempt: number,
    now: number,
    extra: { rootCause?: string; error?: string; agentId?: string; detail?: string } = {},
  ): boolean {
    if (this.store.setState(drvPath, state, attempt, now, extra)) {
      const change = { drvPath, state, attempt, agentId: extra.agentId ?? null };
      if (this.writing) this.stateChanges.push(change);
      else this.emit('state', change.drvPath, change.state, change.attempt, change.agentId);
      return true;
    }
    const from = this.store.derivation(drvPath)?.state ?? 'unknown';
    this.health.illegalTransition();
    this.logger.error({ drvPath, from, to: state, attempt }, `illegal transition ${from} → ${state} refused`);
    return false;
  }

  private retryOrFail(lease: Lease, reason: string, now: number): void {
    if (lease.attempt >= this.options.maxAttempts) {
      this.settle(lease.drvPath, 'failed', lease.attempt, now, {
        error: `gave up after ${lease.attempt} attempts; last: ${reason}`,
      });
      return;
    }
    this.scheduler.retry(lease.drvPath, lease.agentId);
    this.transition(lease.drvPath, 'buildable', lease.attempt, now, { detail: `retrying: ${reason}` });
  }

  /** A derivation reached a terminal state; dependents follow (buildable on success, dependency-failed else). */
  private settle(
    drvPath: string,
    state: BuildState,
    attempt: number,
    now: number,
    extra: { agentId?: string; error?: string },
  ): void {
    if (!this.transition(drvPath, state, attempt, now, extra)) return;
    this.settledNow.push(drvPath);
    if (SUCCESS_STATES.has(state)) {
      for (const ready of this.scheduler.succeeded(drvPath, true)) this.following.push({ drvPath: ready });
    } else {
      for (const dependent of this.scheduler.failed(drvPath)) {
        this.following.push({ drvPath: dependent, rootCause: drvPath });
        this.doomed.set(dependent, drvPath);
      }
    }
    this.recordSome(now);
  }

  /**
   * Records up to `FOLLOW_UP_SLICE` of the dependents that settled derivations decided — made ready by a success
   * (buildable), or taken out by a failure (dependency-failed) — and the rest in the next group commits. One write
   * for the tens of thousands of dependents of a bootstrap derivation held the event loop for most of a second
   * (bench/fleet at 100k), and a failed one for seconds. Until recorded, a dependent is `queued` in the database:
   * recovery reads it as buildable, or as dependency-failed when an input failed (`load`).
   */
  private recordSome(now: number): void {
    // A budget per write, not per call: each report of a group commit that settles a derivation calls this, and with
    // a long queue of dependents every one of them took a slice (group commits of up to 400 ms at 100k).
    const end = Math.min(this.following.length, this.followed + Math.max(0, this.followBudget));
    this.followBudget -= end - this.followed;
    for (; this.followed < end; this.followed++) {
      const { drvPath, rootCause } = this.following[this.followed]!;
      if (rootCause === undefined) {
        if (!this.scheduler.isHeld(drvPath)) continue; // cancelled meanwhile
        this.transition(drvPath, 'buildable', 0, now);
        this.scheduler.release(drvPath);
        continue;
      }
      if (!this.doomed.delete(drvPath)) continue;
      const row = this.store.derivation(drvPath);
      if (!row || isTerminal(row.state)) continue;
      this.transition(drvPath, 'dependency-failed', row.attempts, now, { rootCause });
      this.settledNow.push(drvPath);
    }
    if (this.followed < this.following.length) {
      if (this.followUpScheduled) return;
      this.followUpScheduled = true;
      this.writeSoon(() => {
        this.followUpScheduled = false;
        this.recordSome(this.now());
      }).catch((err: unknown) => this.health.fault('follow-up', err));
      return;
    }
    this.following = [];
    this.followed = 0;
  }

  /** Derivations whose outputs are all in the cache already, or valid in the local store (then pushed). */
  private async findSettled(drvs: readonly NewDerivation[]): Promise<Set<string>> {
    const allOutputs = drvs.flatMap((d) => Object.values(d.outputs));
    if (allOutputs.length === 0) return new Set();
    const inCache = await this.cache.hasPaths(allOutputs);
    const missing = allOutputs.filter((p) => !inCache.has(p));
    const locallyValid = await validPaths(missing);
    if (locallyValid.size > 0) await this.cache.pushFromLocalStore([...locallyValid]);
    const available = (p: string): boolean => inCache.has(p) || locallyValid.has(p);
    return new Set(
      drvs
        .filter((d) => Object.keys(d.outputs).length > 0 && Object.values(d.outputs).every(available))
        .map((d) => d.drvPath),
    );
  }
}

const ATTEMPT_STATE: Partial<Record<Outcome, AttemptState>> = {
  [Outcome.OUTCOME_SUCCEEDED]: 'succeeded',
  [Outcome.OUTCOME_FAILED]: 'failed',
  [Outcome.OUTCOME_TIMED_OUT]: 'timed-out',
  [Outcome.OUTCOME_INFRA_ERROR]: 'infra-error',
  [Outcome.OUTCOME_CANCELLED]: 'cancelled',
};

/** Which store paths are valid in the local Nix store, asked in batches (not one process per path). */
async function validPaths(paths: readonly string[]): Promise<Set<string>> {
  const valid = new Set<string>();
  for (const batch of argBatches(paths)) {
    const r = await runNix('nix-store', ['--check-validity', '--print-invalid', ...batch]);
    if (r.code !== 0)
      throw new NixCommandError(`nix-store --check-validity failed: ${lastLines(r.stderr, 3)}`, r.code, r.stderr);
    const invalid = new Set(r.stdout.split('\n').filter(Boolean));
    for (const p of batch) if (!invalid.has(p)) valid.add(p);
  }
  return valid;
}

export type { DerivationRow };

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(`non-Error thrown: ${JSON.stringify(err)}`);
}
