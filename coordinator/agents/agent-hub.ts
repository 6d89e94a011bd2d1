import { type ServerDuplexStream, status } from '@grpc/grpc-js';
import type { Statement } from 'better-sqlite3';
import { jitter } from '../../common/backoff.js';
import type { Logger } from '../../common/logging.js';
import type {
  AgentMessage,
  Assign,
  CoordinatorMessage,
  Hello,
  JobEvent,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { PROTOCOL_VERSION } from '../../common/protocol-version.js';
import type { AuditLog } from '../audit-log.js';
import type { Db } from '../db/database.js';
import type { BuildManager } from '../scheduler/build-manager.js';
import type { CheckManager } from '../checks/check-manager.js';
import { type AgentCapabilities, agentMatchesLane } from '../scheduler/scheduler.js';
import { AgentSession, type SessionHandlers } from './agent-session.js';
import type { AccessControl } from '../access/access-control.js';
import type { Health } from '../health.js';
import type { TokenStore } from '../access/token-store.js';

export interface AgentHubOptions {
  leaseTtlMs: number;
  cacheUrl: string;
  cachePublicKey: string;
  /** `Welcome.store_marker`: a path only the coordinator's store holds, or '' (see StorePublisher). */
  storeMarker: string;
  cancelGraceSeconds: number;
  /** A stream that sends no Hello within this time is closed. */
  helloTimeoutMs: number;
  /** `[security] allow_unsandboxed_untrusted_builds`: untrusted code may build on agents without Nix's sandbox. */
  allowUnsandboxedUntrustedBuilds: boolean;
  /** An agent connected, disconnected, or was drained or resumed by an operator (the coordinator's event stream). */
  onAgent?: (e: { id: string; connected: boolean; drained: boolean }) => void;
}

/**
 * At most this many leases are handed out per dispatch round, one group commit each. A round's leases come back as
 * uploads and results together a moment later, so the round sets how much work lands in one later turn of the event
 * loop: a thousand free slots and a layer of work that just became buildable took one round of ≈200 ms, holding
 * every agent's result and every other slot's Assign behind it. bench/fleet at 20,000 (100 agents × 10 slots,
 * immediate results), rounds alternating: event-loop delay p99 87–173 ms with rounds of 100, 69–112 with 50, 63–82
 * with 30, 51–74 with 20, 51–68 with 10; assignments per second the same within the machine's noise (≈800–1,180).
 * At 100,000: 82–99 ms with 20, 152–190 ms with 100. The slots wait as long either way; what changes is where the
 * queue of work waits, in the sockets and one long turn or in the scheduler.
 */
const DISPATCH_ROUND_MAX = 20;

/** A dispatch round's leases, by the agent they go to; sent once the round committed. */
interface DispatchRound {
  outgoing: Map<AgentSession, Assign[]>;
  given: number;
}

// Heartbeats come four times per lease TTL, so a lease survives three lost heartbeats.
const HEARTBEATS_PER_TTL = 4;
// An agent may have this many log bytes unacknowledged: enough to keep a fast build's log flowing over a
// high-latency link, small enough that a stalled coordinator never holds much of any agent's memory.
const LOG_WINDOW_BYTES = 1024 * 1024;
// How often leases, grace periods and token revocations are checked. Lease TTLs are tens of seconds.
const SWEEP_INTERVAL_MS = 1_000;
// Revocations made by the CLI in another process reach a running coordinator within this time.
const TOKEN_REFRESH_INTERVAL_MS = 5_000;

/**
 * Every connected agent: authenticates streams, runs one AgentSession per stream, and connects them to the
 * BuildManager — dispatching buildable work to agents with free slots, passing results, logs and heartbeats.
 */
export class AgentHub {
  /** Welcomed sessions by agent id. */
  private readonly sessions = new Map<string, AgentSession>();
  /** Every open stream, welcomed or still waiting for its Hello (a revoked token ends both). */
  private readonly streams = new Set<AgentSession>();
  private dispatchScheduled = false;
  private dispatchCursor = 0;
  private timers: NodeJS.Timeout[] = [];
  private readonly handlers: SessionHandlers;
  private readonly seen: Statement;
  /** Agents an operator drained: connected or not, they get no new work until resumed (kept in the database). */
  private readonly drained: Set<string>;

  constructor(
    private readonly manager: BuildManager,
    private readonly tokens: TokenStore,
    private readonly access: AccessControl,
    private readonly audit: AuditLog,
    private readonly db: Db,
    private readonly options: AgentHubOptions,
    private readonly logger: Logger,
    private readonly health: Health,
    private readonly checks?: CheckManager,
  ) {
    this.handlers = {
      hello: (s, hello) => this.onHello(s, hello),
      jobEvent: (s, e) => this.onJobEvent(s, e),
      logChunk: (s, leaseId, offset, data) =>
        (this.isCheckLease(leaseId)
          ? this.checks!.appendLog(s.agentId, leaseId, offset, data)
          : this.manager.appendLog(s.agentId, leaseId, offset, data)) ?? offset + data.length,
      heartbeat: (s, leaseIds) => {
        // Only for the status page: a failed write (a full disk) must not cost the agent its leases.
        this.survive('agent last seen', () => this.seen.run(Date.now(), s.agentId));
        const [checkLeases, buildLeases] = this.split(leaseIds, (id) => id);
        const builds = this.manager.renew(s.agentId, buildLeases);
        if (!this.checks || checkLeases.length === 0) return builds;
        return { ...builds, renewed: [...builds.renewed, ...this.checks.renew(s.agentId, checkLeases).renewed] };
      },
      credit: () => this.scheduleDispatch(),
      closed: (s) => this.onClosed(s),
      fault: (_s, where, err, context) => this.health.fault(where, err, context),
    };
    this.seen = db.prepare('UPDATE agents SET last_seen = ? WHERE agent_id = ?');
    this.drained = new Set(
      (db.prepare('SELECT agent_id FROM agents WHERE drained_at IS NOT NULL').all() as Array<{ agent_id: string }>).map(
        (r) => r.agent_id,
      ),
    );
    health.onResume(() => this.scheduleDispatch());
    manager.on('refused', (agentId: string, leaseId: string, reason: string) => {
      this.audit.record(`agent:${agentId}`, 'agent.result-refused', { leaseId, reason });
      this.logger.warn({ agentId, leaseId, reason }, 'refused a result that did not check out');
    });
    manager.on('work', () => this.scheduleDispatch());
    const cancelLease = (leaseId: string, agentId: string, reason: string): void => {
      this.sessions.get(agentId)?.send({
        msg: { $case: 'cancel', value: { leaseId, graceSeconds: this.options.cancelGraceSeconds, reason } },
      });
    };
    manager.on('cancel-lease', cancelLease);
    checks?.on('cancel-lease', cancelLease);
    checks?.on('work', () => this.scheduleDispatch());
  }

  /** Splits lease-bearing items into the checks' and the builds'. */
  private split<T>(items: readonly T[], leaseOf: (item: T) => string): [T[], T[]] {
    if (!this.checks) return [[], [...items]];
    const checks: T[] = [];
    const builds: T[] = [];
    for (const item of items) (this.isCheckLease(leaseOf(item)) ? checks : builds).push(item);
    return [checks, builds];
  }

  /**
   * Whether a lease is a check's. Open leases are told apart in memory (this is asked for every log chunk); only a
   * lease neither manager holds open (a late chunk or result after a restart) is looked up in the checks' table.
   */
  private isCheckLease(leaseId: string): boolean {
    if (!this.checks) return false;
    if (this.checks.holds(leaseId)) return true;
    return !this.manager.holds(leaseId) && this.checks.owns(leaseId);
  }

  /** The gRPC service implementation (`AgentServiceServer`). */
  readonly service = {
    connect: (call: ServerDuplexStream<AgentMessage, CoordinatorMessage>): void => this.connect(call),
  };

  start(): void {
    const sweep = (): void => {
      this.survive('lease sweep', () => {
        this.manager.expireLeases();
        this.checks?.expireLeases();
        this.manager.markUnbuildable(this.connectedCapabilities());
      });
      this.timers[0] = setTimeout(sweep, jitter(SWEEP_INTERVAL_MS));
    };
    const refresh = (): void => {
      this.survive('token refresh', () => {
        for (const name of this.tokens.refresh()) this.revoked(name);
      });
      this.timers[1] = setTimeout(refresh, jitter(TOKEN_REFRESH_INTERVAL_MS));
    };
    this.timers = [
      setTimeout(sweep, jitter(SWEEP_INTERVAL_MS)),
      setTimeout(refresh, jitter(TOKEN_REFRESH_INTERVAL_MS)),
    ];
  }

  stop(): void {
    for (const t of this.timers) clearTimeout(t);
    for (const s of [...this.sessions.values()]) s.terminate(status.UNAVAILABLE, 'coordinator shutting down');
  }

  connectedCapabilities(): AgentCapabilities[] {
    return [...this.sessions.values()].flatMap((s) => (s.capabilities ? [s.capabilities] : []));
  }

  /**
   * Build slots for a system: the `max_jobs` each connected, undrained agent that builds it said in its Hello (a
   * run's ETA divides the work left by them). Derivations of system `builtin` run on any agent.
   */
  slotsFor(system: string): number {
    let slots = 0;
    for (const s of this.sessions.values()) {
      // A drained agent (by an operator, or of its own accord) takes no new work: its slots do not shorten an ETA.
      if (!s.hello || s.draining || this.drained.has(s.agentId)) continue;
      if (system === 'builtin' || s.hello.systems.includes(system)) slots += s.hello.maxJobs;
    }
    return slots;
  }

  /** The connected agents as the API shows them: free slots and whether they drain (of their own accord). */
  connected(): Array<{ agentId: string; freeSlots: number; draining: boolean }> {
    return [...this.sessions.values()].map((s) => ({
      agentId: s.agentId,
      freeSlots: this.freeSlotsOf(s),
      draining: s.draining,
    }));
  }

  /** The slots an agent offers that may be given work: none while an operator has drained it. */
  private freeSlotsOf(s: AgentSession): number {
    return this.drained.has(s.agentId) ? 0 : s.freeSlots;
  }

  /**
   * An operator's drain: the agent gets no new work (what it runs finishes) until `resume`, across reconnects and
   * restarts. False for an agent that never connected.
   */
  drainAgent(agentId: string, actor: string, reason: string): boolean {
    const r = this.db
      .prepare('UPDATE agents SET drained_at = ?, drained_by = ?, drain_reason = ? WHERE agent_id = ?')
      .run(Date.now(), actor, reason, agentId);
    if (r.changes === 0) return false;
    this.drained.add(agentId);
    this.audit.record(actor, 'agent.drained', { agentId, reason });
    this.options.onAgent?.({ id: agentId, connected: this.sessions.has(agentId), drained: true });
    return true;
  }

  /** Ends an operator's drain: the agent takes work again. False for an agent that never connected. */
  resumeAgent(agentId: string, actor: string): boolean {
    const r = this.db
      .prepare('UPDATE agents SET drained_at = NULL, drained_by = NULL, drain_reason = NULL WHERE agent_id = ?')
      .run(agentId);
    if (r.changes === 0) return false;
    const was = this.drained.delete(agentId);
    if (was) this.audit.record(actor, 'agent.resumed', { agentId });
    this.options.onAgent?.({ id: agentId, connected: this.sessions.has(agentId), drained: false });
    this.scheduleDispatch();
    return true;
  }

  get agentCount(): number {
    return this.sessions.size;
  }

  /** Resolves once `count` agents are connected and welcomed. */
  waitForAgents(count: number): Promise<void> {
    return new Promise((resolve) => {
      const check = (): void => {
        if (this.sessions.size < count) return;
        clearInterval(timer);
        resolve();
      };
      const timer = setInterval(check, 20);
      check();
    });
  }

  /** Tells connected agents to take no new work. */
  drain(reason: string): void {
    for (const s of this.sessions.values()) s.send({ msg: { $case: 'drain', value: { reason } } });
  }

  /** A token was revoked: its streams end with UNAUTHENTICATED, welcomed or not. */
  revoked(tokenName: string): void {
    for (const s of [...this.streams]) {
      if (s.tokenName !== tokenName) continue;
      s.terminate(status.UNAUTHENTICATED, `EKACI_ERR_AUTH: token "${tokenName}" was revoked`);
    }
  }

  private connect(call: ServerDuplexStream<AgentMessage, CoordinatorMessage>): void {
    // The token is checked before a single message is read.
    const header = call.metadata.get('authorization')[0];
    const token = typeof header === 'string' && header.startsWith('Bearer ') ? header.slice(7) : undefined;
    const agentId = this.access.agentOf(token);
    if (agentId === undefined) {
      this.audit.record(call.getPeer(), 'agent.refused', { reason: token ? 'unknown or revoked token' : 'no token' });
      call.emit('error', {
        code: status.UNAUTHENTICATED,
        details:
          'EKACI_ERR_AUTH: agent token unknown or revoked (create one with `ekaci-coordinator agent-token create NAME`)',
      });
      return;
    }
    const session = new AgentSession(
      call,
      agentId,
      this.handlers,
      this.logger.child({ peer: call.getPeer(), agentId }),
      this.options.helloTimeoutMs,
    );
    this.streams.add(session);
    call.on('close', () => this.streams.delete(session));
    call.on('error', () => this.streams.delete(session));
  }

  private onHello(session: AgentSession, hello: Hello): ReturnType<SessionHandlers['hello']> {
    const previous = this.sessions.get(hello.agentId);
    if (previous && previous !== session) {
      // The agent reconnected before its old stream was noticed dead; the newer stream wins.
      this.sessions.delete(hello.agentId);
      previous.terminate(status.ABORTED, 'replaced by a newer stream from the same agent');
    }
    this.sessions.set(hello.agentId, session);
    if (session.capabilities) {
      session.capabilities.mayBuildUntrusted = hello.sandboxed || this.options.allowUnsandboxedUntrustedBuilds;
    }
    this.db
      .prepare(
        `INSERT INTO agents (agent_id, token_name, hostname, os, systems, features, mandatory, max_jobs, nix_version, last_seen, sandboxed)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(agent_id) DO UPDATE SET token_name = excluded.token_name,
         hostname = excluded.hostname, os = excluded.os, systems = excluded.systems, features = excluded.features,
         mandatory = excluded.mandatory, max_jobs = excluded.max_jobs, nix_version = excluded.nix_version,
         last_seen = excluded.last_seen, sandboxed = excluded.sandboxed`,
      )
      .run(
        hello.agentId,
        session.tokenName,
        hello.hostname,
        hello.os,
        JSON.stringify(hello.systems),
        JSON.stringify(hello.supportedFeatures),
        JSON.stringify(hello.mandatoryFeatures),
        hello.maxJobs,
        hello.nixVersion,
        Date.now(),
        hello.sandboxed ? 1 : 0,
      );
    const [checkLeases, buildLeases] = this.split(hello.runningLeases, (r) => r.leaseId);
    const leaseDecisions = [
      ...this.manager.reconcile(hello.agentId, buildLeases),
      ...(this.checks?.reconcile(hello.agentId, checkLeases) ?? []),
    ];
    session.send({
      msg: {
        $case: 'welcome',
        value: {
          protocolVersion: PROTOCOL_VERSION,
          heartbeatIntervalMs: Math.round(this.options.leaseTtlMs / HEARTBEATS_PER_TTL),
          leaseTtlMs: this.options.leaseTtlMs,
          logWindowBytes: LOG_WINDOW_BYTES,
          cacheUrl: this.options.cacheUrl,
          cachePublicKey: this.options.cachePublicKey,
          storeMarker: this.options.storeMarker,
          leaseDecisions,
        },
      },
    });
    this.options.onAgent?.({ id: hello.agentId, connected: true, drained: this.drained.has(hello.agentId) });
    this.logger.info(
      { agentId: hello.agentId, systems: hello.systems, features: hello.supportedFeatures, maxJobs: hello.maxJobs },
      hello.sandboxed ? 'agent connected' : 'agent connected (builds outside a sandbox: no untrusted code)',
    );
    return {};
  }

  private onJobEvent(session: AgentSession, e: JobEvent): void | Promise<void> {
    const agentId = session.agentId;
    if (this.isCheckLease(e.leaseId)) return this.onCheckEvent(this.checks!, agentId, e);
    switch (e.event?.$case) {
      case 'accepted':
        return this.manager.accepted(agentId, e.leaseId);
      case 'started':
        return this.manager.started(agentId, e.leaseId, e.event.value.startedAtMs);
      case 'finished':
        return this.manager.finished(agentId, e.leaseId, e.event.value);
      case undefined:
        return;
    }
  }

  private onCheckEvent(checks: CheckManager, agentId: string, e: JobEvent): void {
    switch (e.event?.$case) {
      case 'accepted':
        return checks.accepted(agentId, e.leaseId);
      case 'started':
        return checks.started(agentId, e.leaseId, e.event.value.startedAtMs);
      case 'finished':
        return checks.finished(agentId, e.leaseId, e.event.value);
      case undefined:
        return;
    }
  }

  private onClosed(session: AgentSession): void {
    if (this.sessions.get(session.agentId) !== session) return;
    this.sessions.delete(session.agentId);
    this.options.onAgent?.({ id: session.agentId, connected: false, drained: this.drained.has(session.agentId) });
    // Its leases stay until their TTL runs out: the agent may reconnect and keep them.
    this.logger.info({ agentId: session.agentId }, 'agent disconnected');
  }

  /** A dispatch round runs last in the next group commit of agents' reports (`BuildManager.batch`). */
  private scheduleDispatch(): void {
    if (this.dispatchScheduled) return;
    this.dispatchScheduled = true;
    let round: DispatchRound = { outgoing: new Map(), given: 0 };
    this.manager
      .batch(() => {
        this.dispatchScheduled = false;
        round = this.dispatch();
      })
      .then(
        () => this.send(round),
        (err: unknown) => this.health.fault('dispatch', err),
      );
  }

  /** Runs work a timer started: an error in it is logged and counted, and the coordinator goes on. */
  private survive(where: string, fn: () => void): void {
    try {
      fn();
    } catch (err) {
      this.health.fault(where, err);
    }
  }

  /**
   * Gives buildable work to agents with free slots, one build per agent per round so work spreads evenly. Runs in
   * the round's transaction; nothing is sent before it committed (`send`).
   */
  private dispatch(): DispatchRound {
    const othersCanTake = (self: string) => (lane: string, excluded: ReadonlySet<string>) =>
      [...this.sessions.values()].some(
        (s) =>
          s.agentId !== self && s.capabilities && !excluded.has(s.agentId) && agentMatchesLane(s.capabilities, lane),
      );
    const outgoing = new Map<AgentSession, Assign[]>();
    let given = 0;
    // Each round starts where the last one stopped, so that with more agents than a round serves none waits.
    const sessions = [...this.sessions.values()];
    const start = sessions.length === 0 ? 0 : this.dispatchCursor % sessions.length;
    const order = [...sessions.slice(start), ...sessions.slice(0, start)];
    const free = new Map(order.map((s) => [s, this.freeSlotsOf(s)]));
    let progress = true;
    while (progress && given < DISPATCH_ROUND_MAX) {
      progress = false;
      for (const [s, slots] of free) {
        if (given >= DISPATCH_ROUND_MAX) break;
        if (!s.capabilities || slots === 0) continue;
        // A check first: checks are short and what a pull request's author waits for.
        const checks = this.checks?.assign(s.capabilities, 1) ?? [];
        const assigns = checks.length > 0 ? checks : this.manager.assign(s.capabilities, 1, othersCanTake(s.agentId));
        if (assigns.length === 0) continue;
        free.set(s, slots - assigns.length);
        outgoing.set(s, [...(outgoing.get(s) ?? []), ...assigns]);
        given += assigns.length;
        progress = true;
      }
    }
    return { outgoing, given };
  }

  /** Sends a committed round's leases. */
  private send(round: DispatchRound): void {
    this.dispatchCursor += round.given;
    for (const [s, assigns] of round.outgoing) s.assign(assigns.map((value) => ({ $case: 'assign' as const, value })));
    // A full round may have left free slots and work: the next one comes after what arrived meanwhile.
    if (round.given >= DISPATCH_ROUND_MAX) this.scheduleDispatch();
  }
}
