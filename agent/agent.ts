import { registerSecret } from '../common/redaction.js';
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { credentials as grpcCredentials, type ChannelCredentials } from '@grpc/grpc-js';
import { Backoff } from '../common/backoff.js';
import { ConfigError, EkaciError, IllegalStateError } from '../common/errors.js';
import { ONE_REQUEST_UPLOADS_SINCE, PROTOCOL_VERSION } from '../common/protocol-version.js';
import { SandboxCgroups } from '../common/sandbox/cgroup.js';
import { sandboxAvailable } from '../common/sandbox/sandbox.js';
import type { CoordinatorMessage, Hello, Outcome, Welcome } from '../common/proto/ekaci/agent/v1/agent.js';
import { DEFAULT_HEARTBEAT_INTERVAL_MS, HeartbeatLoop } from './connection/heartbeat.js';
import { Outbox } from './connection/outbox.js';
import { Session, type SessionHandler } from './connection/session.js';
import { AgentStoppedError } from './errors.js';
import { Workload } from './jobs/workload.js';
import { LogShipper } from './logs/shipper.js';
import { LogSpool } from './logs/spool.js';
import { warmUpCache } from './nix/cache-warmup.js';
import { CacheUploader } from './nix/cache-upload.js';
import { StorePool } from './nix/store-pool.js';
import { detectNix, type NixCapabilities } from './nix/detect.js';
import { probeSandbox } from './nix/sandbox-probe.js';
import { checkCacheTrust, detectStoreAccess } from './nix/store-access.js';
import { compileAgentOptions, coordinatorHost, type AgentOptions, type AgentOptionsInput } from './options.js';

export type { AgentOptions, AgentOptionsInput } from './options.js';

/**
 * The agent's lifecycle:
 *
 *   created → starting          start(): detect Nix, prepare the spool, connect
 *   starting → running          the first Welcome arrived
 *   starting|running → draining stopGracefully(): no new work; running builds finish and report
 *   draining → stopped          nothing is left to report; the stream was closed
 *   draining → stopping         the builds ended but no coordinator is connected to take their results (its acks
 *                               cannot come), or the drain grace (`drainGraceMs`) ran out
 *   starting|running|draining → stopping   stopNow(), or a fatal error: builds are killed
 *   stopping → stopped | failed
 *   created → stopped           stopped before it started
 */
export type AgentState = 'created' | 'starting' | 'running' | 'draining' | 'stopping' | 'stopped' | 'failed';

const TRANSITIONS: Record<AgentState, readonly AgentState[]> = {
  created: ['starting', 'stopped'],
  starting: ['running', 'draining', 'stopping'],
  running: ['draining', 'stopping'],
  draining: ['stopping', 'stopped'],
  stopping: ['stopped', 'failed'],
  stopped: [],
  failed: [],
};

export interface AgentEvents {
  state: [state: AgentState];
  welcome: [welcome: Welcome];
  assigned: [leaseId: string];
  started: [leaseId: string];
  /** The Finished event went out (its log is fully acknowledged). */
  finished: [leaseId: string, outcome: Outcome];
  /** The coordinator acknowledged Finished; the lease's spool is gone. */
  settled: [leaseId: string];
  disconnected: [reason: string];
  /** The agent stops because retrying cannot help (token refused, protocol mismatch). */
  fatal: [error: EkaciError];
}

/** A builder agent: dials the coordinator, takes builds as its slots allow, runs them with Nix, reports back. */
export class Agent extends EventEmitter<AgentEvents> {
  private state: AgentState = 'created';
  private readonly outbox = new Outbox();
  private readonly spool: LogSpool;
  private readonly shipper: LogShipper;
  private workload: Workload | null = null;
  private session: Session | null = null;
  private readonly heartbeat: HeartbeatLoop;
  /** The last coordinator's heartbeat interval, a quarter of its lease TTL (0 before the first Welcome). */
  private heartbeatIntervalMs = 0;
  private readonly pool: StorePool;
  private readonly uploader: CacheUploader;
  private capabilities: NixCapabilities | null = null;
  /** Whether builds here run in Nix's sandbox, measured at start-up (see sandbox-probe.ts). */
  private sandboxed = false;
  /** Why checks cannot run here (the check sandbox does not start), measured at start-up; null when they can. */
  private checksUnavailable: string | null = 'not measured yet';
  /** Where checks get their memory and process limits, measured at start-up. */
  private checkCgroups: SandboxCgroups | null = null;
  private lastWelcome: Welcome | null = null;
  /** The coordinator's store marker last checked, and whether this agent's store holds it. */
  private sharedStore = { marker: '', shared: false };
  private warmedCacheUrl = '';
  private warmUp: Promise<void> = Promise.resolve();
  // While a Welcome is applied, events are re-sent from the outbox in one ordered pass, not one by one.
  private welcoming = false;
  private drainRequested = false;
  private drainTimer: NodeJS.Timeout | null = null;
  private fatalError: EkaciError | null = null;
  private readonly welcomed = deferred();
  private readonly stopped = deferred();

  /** The compiled options: defaults filled in and validated once, here. */
  readonly options: AgentOptions;

  /** Takes raw or compiled options (compiling is idempotent); a bad value throws a ConfigError. */
  constructor(options: AgentOptionsInput) {
    super();
    this.options = compileAgentOptions(options);
    this.spool = new LogSpool(this.options.spoolDir);
    this.shipper = new LogShipper(this.options.logChunkBytes, this.options.logger.child({ component: 'logs' }));
    this.pool = new StorePool(this.options.logger.child({ component: 'store' }), () => ({
      // Nix must agree to build what the features this agent announced allow.
      'system-features': this.capabilities
        ? [...this.capabilities.features, ...this.capabilities.mandatoryFeatures].join(' ')
        : '',
      ...(this.options.nixSandbox ? { sandbox: 'true', 'sandbox-paths': this.options.nixSandboxPaths.join(' ') } : {}),
    }));
    this.uploader = new CacheUploader(this.options.token, this.options.cacheWaitMs, this.spool.uploadsDir);
    this.heartbeat = new HeartbeatLoop({
      send: (value) => this.session?.send({ msg: { $case: 'heartbeat', value } }) ?? false,
      heldLeaseIds: () => this.workload?.heldLeaseIds() ?? [],
      notRenewed: (ids) => ids.forEach((id) => this.workload?.drop(id, 'the coordinator did not renew it')),
      silent: () => this.session?.restart('no message from the coordinator for three heartbeat intervals'),
    });
  }

  get status(): AgentState {
    return this.state;
  }

  get sessionNonce(): string {
    return this.outbox.sessionNonce;
  }

  /** What the current stream holds for the coordinator (see Session.backlog); zero before the first stream. */
  get streamBacklog(): { messages: number; peak: number } {
    return this.session?.backlog ?? { messages: 0, peak: 0 };
  }

  /**
   * Connects; resolves at the first Welcome. Rejects, once the agent has stopped, with the fatal error (token
   * refused, protocol refused) or AgentStoppedError if a stop came first. Retryable failures are retried meanwhile.
   */
  async start(): Promise<void> {
    this.transition('starting');
    let credentials: ChannelCredentials;
    try {
      const o = this.options;
      // First, while the agent has no child process: on cgroup v2 it moves into a leaf of its cgroup (cgroup-v2.ts).
      this.checkCgroups = await this.probeCheckCgroups();
      this.pool.use(await detectStoreAccess(o.store, o.daemonSocket));
      if (this.pool.access.kind === 'host-daemon' && o.nixSandbox) {
        o.logger.warn("--nix-sandbox has no effect on the host's nix-daemon: its nix.conf decides");
      }
      this.capabilities = await detectNix(o);
      const probe = await probeSandbox(this.pool, this.capabilities.systems[0] ?? '', o.logger);
      this.sandboxed = probe.sandboxed;
      o.logger.info({ sandboxed: probe.sandboxed, why: probe.reason }, 'sandbox probe');
      this.checksUnavailable = await sandboxAvailable().then(
        () => null,
        (err: unknown) => (err instanceof Error ? err.message : String(err)),
      );
      if (this.checksUnavailable === null) o.logger.info('checks run here: the check sandbox starts');
      else o.logger.warn({ why: this.checksUnavailable }, 'this agent takes no checks');
      credentials =
        o.tlsCaPath === null
          ? grpcCredentials.createInsecure()
          : grpcCredentials.createSsl(
              readPem(o.tlsCaPath, 'TLS root certificate'),
              o.tlsKeyPath === null ? null : readPem(o.tlsKeyPath, 'TLS client key'),
              o.tlsCertPath === null ? null : readPem(o.tlsCertPath, 'TLS client certificate'),
            );
      this.spool.prepare();
      this.spool.writeNetrc(coordinatorHost(o.coordinator), o.token);
    } catch (err) {
      this.fail(err instanceof EkaciError ? err : new ConfigError(`cannot start the agent: ${String(err)}`));
      return this.welcomed.promise;
    }
    if (this.state !== 'starting') throw new AgentStoppedError();
    this.workload = this.createWorkload(this.capabilities.maxJobs);
    this.session = new Session({
      address: this.options.coordinator,
      credentials,
      token: this.options.token,
      // While it holds leases, the agent tries again at least once per heartbeat interval: a restarted coordinator
      // gives agents one lease TTL to claim their leases back, and a delay from the far end of the backoff (up to
      // half a minute) outlasted it, so that builds done here were built again elsewhere.
      backoff: new Backoff(this.options.backoffBaseMs, this.options.backoffCapMs, Math.random, () =>
        this.heartbeatIntervalMs > 0 && (this.workload?.heldLeaseIds().length ?? 0) > 0
          ? this.heartbeatIntervalMs
          : undefined,
      ),
      logger: this.options.logger.child({ component: 'session' }),
      handler: this.sessionHandler(),
    });
    this.session.on('writable', () => this.shipper.pump());
    this.session.open();
    return this.welcomed.promise;
  }

  /**
   * Takes no new work, lets running builds finish and report, then closes the stream. Bounded: after
   * `drainGraceMs` it stops now; and results wait for the coordinator's acknowledgement only while one is
   * connected. Results left unacknowledged are not lost work: their leases lapse and the coordinator builds them
   * again (an agent process keeps nothing across a restart, see LogSpool.prepare).
   */
  stopGracefully(): Promise<void> {
    if (this.state === 'created') this.finish('stopped');
    if (this.state !== 'starting' && this.state !== 'running') return this.stopped.promise;
    this.transition('draining');
    this.sendCredit();
    this.drainTimer = setTimeout(() => this.drainExpired(), this.options.drainGraceMs);
    void this.drain();
    return this.stopped.promise;
  }

  /** Cancels every build (SIGTERM, SIGKILL after the stop grace) and closes the stream without waiting for acks. */
  stopNow(): Promise<void> {
    if (this.state === 'created') this.finish('stopped');
    if (this.state === 'stopping' || this.state === 'stopped' || this.state === 'failed') return this.stopped.promise;
    this.transition('stopping');
    this.tearDown('stopped', 'the agent is stopping now');
    return this.stopped.promise;
  }

  /** Resolves when the agent has stopped; rejects with the fatal error if it failed. */
  async whenStopped(): Promise<void> {
    await this.stopped.promise;
    if (this.fatalError !== null) throw this.fatalError;
  }

  private async drain(): Promise<void> {
    const workload = this.workload;
    if (workload !== null) await Promise.race([workload.whenIdle(), this.whenUnreportable(workload)]);
    if (this.state !== 'draining') return;
    this.clearDrainTimer();
    const unreported = workload?.heldLeaseIds() ?? [];
    if (unreported.length > 0) {
      this.options.logger.warn(
        { leases: unreported },
        'draining: no coordinator is connected to acknowledge these results; stopping without them ' +
          '(their leases lapse and are built again)',
      );
      this.transition('stopping');
      this.tearDown('stopped', 'no coordinator to report to');
      return;
    }
    this.heartbeat.stop();
    await this.session?.close(this.options.closeTimeoutMs);
    if (this.state === 'draining') this.finish('stopped');
  }

  /**
   * Resolves once no build runs and no coordinator is connected: what is left (Finished events, log bytes) waits
   * for acknowledgements that only a coordinator can send. While one is connected, they are worth waiting for.
   */
  private async whenUnreportable(workload: Workload): Promise<void> {
    for (;;) {
      await workload.whenBuildsEnded();
      if (this.session?.status !== 'ready') return;
      await new Promise<void>((resolve) => this.once('disconnected', () => resolve()));
    }
  }

  private drainExpired(): void {
    this.drainTimer = null;
    if (this.state !== 'draining') return;
    this.options.logger.warn(
      { graceMs: this.options.drainGraceMs, leases: this.workload?.heldLeaseIds() ?? [] },
      'the drain outlasted its grace; stopping now',
    );
    void this.stopNow();
  }

  private clearDrainTimer(): void {
    if (this.drainTimer !== null) clearTimeout(this.drainTimer);
    this.drainTimer = null;
  }

  private sessionHandler(): SessionHandler {
    return {
      hello: () => this.hello(),
      welcome: (welcome) => this.onWelcome(welcome),
      message: (message) => this.onMessage(message),
      disconnected: (reason) => {
        this.heartbeat.stop();
        this.shipper.detach();
        this.emit('disconnected', reason);
      },
      failed: (error) => this.fail(error),
    };
  }

  private hello(): Hello {
    const caps = this.capabilities as NixCapabilities;
    return {
      agentId: this.options.agentId,
      protocolVersion: PROTOCOL_VERSION,
      nixVersion: caps.nixVersion,
      hostname: hostname(),
      os: caps.os,
      systems: caps.systems,
      supportedFeatures: caps.features,
      mandatoryFeatures: caps.mandatoryFeatures,
      maxJobs: caps.maxJobs,
      runningLeases: this.workload?.runningLeases() ?? [],
      sessionNonce: this.outbox.sessionNonce,
      sandboxed: this.sandboxed,
      runsChecks: this.checksUnavailable === null,
    };
  }

  private onWelcome(welcome: Welcome): void {
    this.lastWelcome = welcome;
    // A coordinator's Drain holds for one stream: after a reconnect it says again if it still wants it.
    this.drainRequested = false;
    if (this.state === 'starting') this.transition('running');
    const workload = this.workload as Workload;
    if (welcome.cacheUrl !== '' && welcome.cacheUrl !== this.warmedCacheUrl) {
      this.warmedCacheUrl = welcome.cacheUrl;
      // The cache may be served under another name than the gRPC endpoint (public_url): credentials follow it.
      const host = cacheHost(welcome.cacheUrl);
      if (host !== undefined) this.spool.writeNetrc(host, this.options.token);
      workload.pause();
      // On the host's daemon as an untrusted user, builds would fail one by one for want of the cache: say so once.
      this.warmUp = checkCacheTrust(this.pool, welcome.cacheUrl, welcome.cachePublicKey).then(
        () => warmUpCache(welcome.cacheUrl, this.spool.netrcPath, this.options.logger).then(() => workload.resume()),
        (err: unknown) => this.fail(err instanceof EkaciError ? err : new ConfigError(String(err))),
      );
    }
    if (welcome.storeMarker !== this.sharedStore.marker) this.checkSharedStore(welcome.storeMarker);
    this.welcoming = true;
    try {
      workload.applyDecisions(welcome.leaseDecisions);
      this.sendCredit();
      for (const event of workload.resendable()) this.session?.send({ msg: { $case: 'jobEvent', value: event } });
    } finally {
      this.welcoming = false;
    }
    this.shipper.attach(this.session as Session, welcome.logWindowBytes);
    this.heartbeatIntervalMs = welcome.heartbeatIntervalMs || DEFAULT_HEARTBEAT_INTERVAL_MS;
    this.heartbeat.start(this.heartbeatIntervalMs);
    this.welcomed.resolve();
    this.emit('welcome', welcome);
  }

  /**
   * Whether this agent's store holds the coordinator's marker, i.e. is the coordinator's store: then outputs stay in
   * it and are not uploaded. Builds wait for the answer (one query); on an error they upload as usual.
   */
  private checkSharedStore(marker: string): void {
    const check = { marker, shared: false };
    this.sharedStore = check;
    if (marker === '') return;
    const workload = this.workload as Workload;
    workload.pause();
    void (async () => {
      const conn = await this.pool.acquire();
      try {
        check.shared = (await conn.queryValidPaths([marker])).has(marker);
      } finally {
        this.pool.release(conn);
      }
      if (check.shared) {
        this.options.logger.info("this agent shares the coordinator's Nix store: outputs stay there, not uploaded");
      }
    })()
      .catch((err: unknown) =>
        this.options.logger.warn({ err }, "cannot tell whether this agent shares the coordinator's Nix store"),
      )
      .finally(() => workload.resume());
  }

  private onMessage(message: CoordinatorMessage): void {
    this.heartbeat.heard();
    const workload = this.workload as Workload;
    const msg = message.msg;
    switch (msg?.$case) {
      case 'assign':
        // A cache push's credentials: never in this agent's log lines, whatever mentions them.
        for (const push of msg.value.pushes) registerSecret(push.secretKey, ...Object.values(push.env));
        return workload.assign(msg.value);
      case 'ack':
        return workload.acknowledged(msg.value.messageIds);
      case 'logAck':
        return this.shipper.ack(msg.value.leaseId, msg.value.storedBytes);
      case 'cancel':
        workload.cancel(msg.value).catch((err: unknown) => this.options.logger.error({ err }, 'cancel failed'));
        return;
      case 'drain':
        this.options.logger.info({ reason: msg.value.reason }, 'coordinator asked to drain');
        this.drainRequested = true;
        return this.sendCredit();
      case 'heartbeatAck':
        return this.heartbeat.acked(msg.value);
      default:
        return;
    }
  }

  /** The cgroups of checks' limits; says once why checks run without limits. */
  private async probeCheckCgroups(): Promise<SandboxCgroups> {
    const o = this.options;
    const cgroups = await SandboxCgroups.probe({
      memoryBytes: o.checkMemoryMib * 2 ** 20,
      maxProcesses: o.checkMaxProcesses,
    });
    if (cgroups.unavailable === null) {
      o.logger.info({ limits: cgroups.describe(), staleCgroupsRemoved: cgroups.swept }, 'checks run with limits');
    } else if (o.checkMemoryMib === 0 && o.checkMaxProcesses === 0) o.logger.info('checks run without limits, as set');
    else o.logger.warn({ why: cgroups.unavailable }, 'checks run without memory or process limits');
    return cgroups;
  }

  private createWorkload(maxJobs: number): Workload {
    const workload = new Workload({
      maxJobs,
      pool: this.pool,
      uploader: this.uploader,
      spool: this.spool,
      shipper: this.shipper,
      outbox: this.outbox,
      logger: this.options.logger,
      localCancelGraceMs: this.options.localCancelGraceMs,
      checks: { token: this.options.token, unavailable: this.checksUnavailable, cgroups: this.checkCgroups },
      host: {
        sendEvent: (value) => {
          if (!this.welcoming) this.session?.send({ msg: { $case: 'jobEvent', value } });
        },
        sendCancelAck: (leaseId) => this.session?.send({ msg: { $case: 'cancelAck', value: { leaseId } } }),
        slotsFreed: () => this.sendCredit(),
        cache: () => ({
          cacheUrl: this.lastWelcome?.cacheUrl ?? '',
          cachePublicKey: this.lastWelcome?.cachePublicKey ?? '',
          oneRequestUploads: (this.lastWelcome?.protocolVersion?.minor ?? 0) >= ONE_REQUEST_UPLOADS_SINCE.minor,
          coordinatorStore: this.sharedStore.shared,
          systemFeatures: this.capabilities
            ? [...this.capabilities.features, ...this.capabilities.mandatoryFeatures]
            : [],
        }),
      },
    });
    workload.on('assigned', (id) => this.emit('assigned', id));
    workload.on('started', (id) => this.emit('started', id));
    workload.on('finished', (id, outcome) => this.emit('finished', id, outcome));
    workload.on('settled', (id) => this.emit('settled', id));
    return workload;
  }

  private sendCredit(): void {
    const draining = this.state !== 'running' || this.drainRequested;
    const freeSlots = draining ? 0 : (this.workload?.freeSlots() ?? 0);
    this.session?.send({ msg: { $case: 'credit', value: { freeSlots, draining } } });
  }

  private fail(error: EkaciError): void {
    if (this.state === 'stopping' || this.state === 'stopped' || this.state === 'failed') return;
    this.options.logger.error({ code: error.code }, error.message);
    this.fatalError = error;
    this.transition('stopping');
    this.emit('fatal', error);
    this.tearDown('failed', `the agent failed: ${error.message}`);
  }

  private tearDown(final: 'stopped' | 'failed', reason: string): void {
    this.clearDrainTimer();
    this.heartbeat.stop();
    this.shipper.detach();
    this.session?.abort();
    const workload = this.workload;
    const done = workload ? workload.stopAll(reason, this.options.stopNowGraceMs) : Promise.resolve();
    void done.finally(() => this.finish(final));
  }

  private finish(final: 'stopped' | 'failed'): void {
    // Nix processes the agent started (store connections, a cache warm-up) end before the agent says it stopped.
    void Promise.all([this.pool.closeAll(), this.warmUp]).finally(() => this.settle(final));
  }

  private settle(final: 'stopped' | 'failed'): void {
    this.transition(final);
    this.welcomed.reject(this.fatalError ?? new AgentStoppedError());
    this.stopped.resolve();
  }

  private transition(to: AgentState): void {
    if (!TRANSITIONS[this.state].includes(to))
      throw new IllegalStateError(`agent: illegal transition ${this.state} → ${to}`);
    this.state = to;
    this.emit('state', to);
  }
}

function readPem(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new ConfigError(`cannot read the ${what} ${path}: ${(err as Error).message}`, { cause: err });
  }
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (err: Error) => void;
}

/** A promise settled from outside; only its first settlement counts, and an unobserved rejection is not reported. */
function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  promise.catch(() => {});
  return { promise, resolve, reject };
}

/** The host of an http(s) cache URL; undefined for local caches (`file://`), which need no credentials. */
function cacheHost(url: string): string | undefined {
  try {
    const u = new URL(url);
    return u.protocol === 'http:' || u.protocol === 'https:' ? u.hostname.replace(/^\[|\]$/g, '') : undefined;
  } catch {
    return undefined;
  }
}
