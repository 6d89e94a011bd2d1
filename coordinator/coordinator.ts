import { CachePushService } from './caches/push-service.js';
import { s3PushRouter } from './caches/s3-push-routes.js';
import { HookService } from './hooks/hook-service.js';
import type { CachePushResult } from '../common/proto/ekaci/agent/v1/agent.js';
import { Server, ServerCredentials } from '@grpc/grpc-js';
import type { Server as HttpServer } from 'node:http';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { CacheError, IllegalStateError } from '../common/errors.js';
import { serverChannelOptions } from '../common/grpc-options.js';
import type { Logger } from '../common/logging.js';
import { AgentServiceService } from '../common/proto/ekaci/agent/v1/agent.js';
import { AgentHub } from './agents/agent-hub.js';
import { AccessControl } from './access/access-control.js';
import { TokenStore } from './access/token-store.js';
import { AuditLog } from './audit-log.js';
import { BinaryCache } from './cache/binary-cache.js';
import { StorePublisher } from './cache/store-publisher.js';
import { checkFixedOutput } from './cache/fixed-output.js';
import { checkContentAddressed } from './cache/content-addressed.js';
import { cacheRouter } from './cache/http-routes.js';
import { loadOrCreateSigningKey, signingKeyFromSecret } from './cache/signing-key.js';
import { DerivationGraph } from './graph/derivation-graph.js';
import { DiffStore } from './graph/diff-store.js';
import { EvalEnvironment } from './eval/eval-environment.js';
import { EvaluationStore } from './eval/evaluation-store.js';
import { type CoordinatorOptions, resolveGitHubAppCredentials, resolveOAuthSecrets } from './config.js';
import { type Db, openDatabase } from './db/database.js';
import { Checkpointer } from './db/checkpointer.js';
import { apiRouter } from './http/api.js';
import { createHttpApp, listen, routeList } from './http/server.js';
import { defaultWebDir, webRouter } from './http/web-routes.js';
import { LogStore } from './logs/log-store.js';
import { Health } from './health.js';
import { createMetrics } from './metrics.js';
import { BuildManager } from './scheduler/build-manager.js';
import { CheckManager, type CheckRow } from './checks/check-manager.js';
import { checkSourcePath, checkSourceRouter } from './checks/source-route.js';
import { BuildStore } from './scheduler/build-store.js';
import { ReviewService } from './review/review-service.js';
import { SizeHistory } from './review/size-history.js';
import { GitMirrors, mirrorDirFor } from './git/git-mirrors.js';
import { GitHubService } from './github/github-service.js';
import { RunStore } from './github/run-store.js';
import { EventBus } from './events.js';
import { Sessions } from './access/sessions.js';
import { authRouter } from './http/auth-routes.js';

/**
 * Lifecycle: `created` → `running` (start) → `stopped` (stopGracefully / stopNow). Graceful stop drains agents
 * and lets running builds keep their leases for the next start; stopNow closes everything at once.
 */
export type CoordinatorState = 'created' | 'starting' | 'running' | 'stopping' | 'stopped';

// Agents get this long to stop a cancelled build (SIGTERM) before it is killed (SIGKILL).
const CANCEL_GRACE_SECONDS = 10;

export class Coordinator {
  state: CoordinatorState = 'created';
  readonly db: Db;
  readonly manager: BuildManager;
  readonly store: BuildStore;
  readonly logs: LogStore;
  /** Faults survived, and whether new work is paused for a full disk. */
  readonly health: Health;
  /** Checkpoints the database's WAL off the event loop. */
  private readonly checkpointer: Checkpointer;
  readonly audit: AuditLog;
  /** Agent tokens: an agent's identity. */
  readonly tokens: TokenStore;
  /** API tokens: for reading (and, later, acting) through the HTTP API. */
  readonly apiTokens: TokenStore;
  /** Who may read and upload what: every credential check goes through here. */
  readonly access: AccessControl;
  readonly evaluations: EvaluationStore;
  readonly reviews: ReviewService;
  /** Branches' output sizes over time (size_check.base_branch, /api/v1/sizes). */
  readonly sizes: SizeHistory;
  /** Repository checks, run on agents that run checks. */
  readonly checks: CheckManager;
  /** The operator's binary caches (`[[caches]]`): which builds push where, and how it went. */
  readonly cachePushes: CachePushService;
  /** Post-build hooks (`[[hooks]]`): run after build results are recorded, out of the build path. */
  readonly hooks: HookService;
  /** The GitHub App side, when `[[github_apps]]` are configured. */
  readonly github: GitHubService | undefined;
  /** State changes of builds, runs and agents, for `GET /api/v1/events`. */
  readonly events: EventBus;
  private hub: AgentHub | undefined;
  private cache: BinaryCache | undefined;
  /** The coordinator's Nix store as a source for the cache, when it can reach one. */
  private storePublisher: StorePublisher | undefined;
  private evalEnv: EvalEnvironment | undefined;
  /** Every HTTP route served, once started (tests check that each one follows the access rules). */
  routes: Array<{ method: string; path: string }> = [];
  private grpcServer: Server | undefined;
  private httpServer: HttpServer | undefined;
  grpcPort = 0;
  httpPort = 0;

  constructor(
    readonly options: CoordinatorOptions,
    readonly logger: Logger,
  ) {
    this.db = openDatabase(join(options.dataDir, 'ekaci.sqlite'));
    this.store = new BuildStore(this.db);
    this.logs = new LogStore(join(options.dataDir, 'logs'));
    this.health = new Health(options.dataDir, logger.child({ component: 'health' }));
    this.checkpointer = new Checkpointer(this.db, (err) => this.health.fault('WAL checkpoint', err));
    this.audit = new AuditLog(this.db);
    this.tokens = new TokenStore(this.db, this.audit, options.agentTokens, 'agent');
    this.apiTokens = new TokenStore(this.db, this.audit, options.apiTokens, 'api');
    this.access = new AccessControl(this.tokens, this.apiTokens, {
      publicReads: options.web.public,
      admins: options.web.admins,
      ...(options.oauth
        ? {
            userAdmins: options.oauth.admins,
            sessions: new Sessions(() => options.oauth?.jwtSecret ?? '', options.oauth.sessionSeconds),
            repoPermission: (repo: string, login: string) =>
              this.github?.permissionOf(repo, login) ?? Promise.resolve(undefined),
          }
        : {}),
    });
    const lazyCache = {
      hasPaths: (paths: string[]) => this.requireCache().hasPaths(paths),
      narInfo: (path: string) => this.requireCache().narInfo(path),
      pushFromLocalStore: (paths: string[], o?: { derivation?: boolean; storeReady?: Promise<unknown> }) =>
        this.requireCache().pushFromLocalStore(paths, o),
      sizes: (paths: readonly string[]) => this.requireCache().sizes(paths),
      publishFromStore: (paths: readonly string[]) =>
        this.storePublisher
          ? this.storePublisher.publish(paths)
          : Promise.reject(new CacheError('the coordinator has no Nix store to copy from')),
      importDerivations: (drvPaths: readonly string[], gcRootsDir?: string) =>
        this.evalEnvironment.importDerivations(drvPaths, gcRootsDir),
    };
    this.manager = new BuildManager(
      this.store,
      lazyCache,
      this.logs,
      {
        leaseTtlMs: options.leaseTtlMs,
        maxAttempts: options.maxAttempts,
        unbuildableGraceMs: options.unbuildableGraceSeconds * 1000,
        noOutputTimeoutSeconds: options.noOutputTimeoutSeconds,
        maxDurationSeconds: options.maxDurationSeconds,
        maxLogBytes: options.maxLogBytes,
      },
      logger.child({ component: 'builds' }),
      new DerivationGraph(this.store, options.graphLruCapacity),
      this.health,
    );
    this.checks = new CheckManager(
      this.db,
      this.manager,
      this.store,
      lazyCache,
      this.logs,
      {
        leaseTtlMs: options.leaseTtlMs,
        maxAttempts: options.maxAttempts,
        maxLogBytes: options.checks.maxLogBytes,
        sourceUrl: (leaseId) => `${this.publicUrl}${checkSourcePath(leaseId)}`,
      },
      logger.child({ component: 'checks' }),
      this.health,
    );
    this.cachePushes = new CachePushService(
      this.db,
      {
        caches: options.caches,
        untrustedPushRepos: options.security.untrustedCachePushRepos,
        allowPrivateHosts: options.security.allowPrivateCacheHosts,
      },
      logger.child({ component: 'caches' }),
    );
    this.manager.pushPlanner = (drvPath) => this.cachePushes.pushesFor(drvPath, this.publicUrl);
    this.manager.slotsFor = (system) => this.hub?.slotsFor(system) ?? 0;
    this.manager.on('pushed', (drvPath: string, results: CachePushResult[]) =>
      this.cachePushes.record(drvPath, results),
    );
    this.hooks = new HookService({
      db: this.db,
      store: this.store,
      logs: this.logs,
      audit: this.audit,
      hooks: options.hooks,
      logDir: join(options.dataDir, 'hook-logs'),
      logger: logger.child({ component: 'hooks' }),
    });
    this.events = new EventBus((e) => {
      if (e.type === 'build') return this.store.isPrivate(e.drvPath) ? 'private' : 'public';
      if (e.type === 'run' || e.type === 'check') return this.repoVisibility(e.repo);
      return 'private'; // what builds where is operators' information, like GET /agents
    });
    this.manager.on('state', (drvPath: string, state: string, attempt: number, agentId: string | null) =>
      this.events.publish({ type: 'build', drvPath, state, attempt, agentId }),
    );
    this.checks.on('state', (row: CheckRow) =>
      this.events.publish({
        type: 'check',
        repo: row.repo,
        commit: row.commit_sha,
        name: row.name,
        system: row.system,
        state: row.state,
      }),
    );
    // What a write that failed for want of space left undone is reloaded from the database before work goes on.
    this.health.onResume(() => this.manager.resync());
    this.evaluations = new EvaluationStore(this.db);
    this.sizes = new SizeHistory(this.db, { keepPoints: options.evaluation.keepSizePoints });
    this.reviews = new ReviewService({
      store: this.store,
      logs: this.logs,
      evaluations: this.evaluations,
      diffs: new DiffStore(this.db),
      references: (path) => this.references(path),
      checks: (repo, commit) => this.checks.resultsOf(repo, commit),
      sizes: this.sizes,
    });
    this.github =
      options.githubApps.length > 0
        ? new GitHubService({
            options,
            db: this.db,
            audit: this.audit,
            evaluations: this.evaluations,
            reviews: this.reviews,
            manager: this.manager,
            store: this.store,
            mirrors: new GitMirrors({ dir: join(options.dataDir, 'git'), logger: logger.child({ component: 'git' }) }),
            checks: this.checks,
            cachePushes: this.cachePushes,
            publicUrl: () => this.publicUrl,
            evalEnvironment: () => this.evalEnvironment,
            onRun: (run) =>
              this.events.publish({
                type: 'run',
                id: run.id,
                repo: run.repo,
                kind: run.kind,
                prNumber: run.pr_number,
                headSha: run.head_sha,
                state: run.state,
              }),
            logger,
          })
        : undefined;
  }

  /**
   * A token for an agent this process starts (the embedded system), named `name`: the agent's identity. It lives in
   * memory only and is never written anywhere.
   */
  localAgentToken(name: string): string {
    return this.tokens.ephemeral(name);
  }

  /** Where users and GitHub reach this coordinator's HTTP server. */
  get publicUrl(): string {
    return this.options.web.publicUrl ?? `http://${hostFor(this.options.web.address)}:${this.httpPort}`;
  }

  get cacheUrl(): string {
    return `${this.publicUrl}/cache`;
  }

  /**
   * Whether a repository's data is public: only a repository GitHub told us is public is. Local repositories
   * (`ekaci review --repo PATH`) and repositories the coordinator knows nothing about are private.
   */
  repoVisibility(repo: string): 'public' | 'private' {
    const row = this.db.prepare('SELECT private FROM github_repositories WHERE full_name = ?').get(repo) as
      { private: number } | undefined;
    return row?.private === 0 ? 'public' : 'private';
  }

  /** A store path's references as the built-in cache knows them; [] for a path it does not have. */
  async references(path: string): Promise<string[]> {
    return (await this.requireCache().narInfo(path))?.references ?? [];
  }

  get cachePublicKey(): string {
    return this.requireCache().publicKey;
  }

  get grpcTarget(): string {
    return `${hostFor(this.options.grpc.address)}:${this.grpcPort}`;
  }

  /** Where repository code is evaluated (sandbox, store, limits); open while the coordinator runs. */
  get evalEnvironment(): EvalEnvironment {
    if (!this.evalEnv) throw new IllegalStateError('the coordinator is not running');
    return this.evalEnv;
  }

  get agentHub(): AgentHub {
    if (!this.hub) throw new IllegalStateError('the coordinator is not running');
    return this.hub;
  }

  async start(): Promise<void> {
    if (this.state !== 'created') throw new IllegalStateError(`cannot start a coordinator that is ${this.state}`);
    this.state = 'starting';
    // Every cache's and hook's credentials (and every cache's host) are checked before anything listens: a wrong
    // token fails the start, naming the cache or hook and the source, not the first build that needed it.
    await this.cachePushes.start();
    for (const hook of this.options.hooks.hooks) await hook.credentials?.values();
    // GitHub App and OAuth credentials from Vault, AWS or instance metadata are read now: a wrong one fails the start.
    await resolveGitHubAppCredentials(this.options.githubApps);
    await resolveOAuthSecrets(this.options.oauth);
    // Before anything listens: a coordinator that cannot confine repository code must not accept any.
    this.evalEnv = await EvalEnvironment.open(this.options.evaluation, this.logger.child({ component: 'eval' }), {
      evalStoreDir: join(this.options.dataDir, 'eval-store'),
    });
    const configured = this.options.cache.secretKey;
    const key = configured
      ? signingKeyFromSecret(configured, 'cache.secret_key')
      : await loadOrCreateSigningKey(join(this.options.dataDir, 'cache-key.sec'), this.options.cache.keyName);
    this.cache = new BinaryCache({
      dir: join(this.options.dataDir, 'cache'),
      secretKey: key.secretKey,
      logger: this.logger.child({ component: 'cache' }),
    });
    this.storePublisher = await StorePublisher.open(this.cache, this.logger.child({ component: 'cache' }));
    this.cachePushes.attachBuiltIn(this.cache, join(this.options.dataDir, 'tmp', 'cache-pushes'), (drvPath) => {
      const attempt = this.store.derivation(drvPath)?.attempts ?? 0;
      const path = attempt > 0 ? this.store.logPathOf(drvPath, attempt) : undefined;
      return path !== undefined && existsSync(path) ? this.logs.read(path) : undefined;
    });
    const metrics = createMetrics({
      db: this.db,
      agentCount: () => this.hub?.agentCount ?? 0,
      pending: () => this.manager.pendingCount,
      checks: this.checks,
      cachePushes: this.cachePushes,
      hooks: this.hooks,
    });
    this.github?.metrics.register(metrics);
    this.health.register(metrics);
    const app = createHttpApp(
      {
        cache: cacheRouter(this.cache, {
          limits: {
            nar: this.options.cache.maxNarUploadBytes,
            ...(this.options.maxLogBytes > 0 ? { log: this.options.maxLogBytes } : {}),
          },
          access: this.access,
          lease: (id) => this.manager.openLease(id),
          visibility: (path) => (this.store.isPrivate(path) ? 'private' : 'public'),
          checkUpload: (lease, storePath, url, compression) =>
            checkFixedOutput(lease, storePath, this.requireCache().dir, url, compression),
          checkContentAddressed: (info) => checkContentAddressed(info, this.requireCache().dir),
        }),
        api: apiRouter({
          store: this.store,
          logs: this.logs,
          manager: this.manager,
          checks: this.checks,
          reviews: this.reviews,
          sizes: this.sizes,
          evaluations: this.evaluations,
          access: this.access,
          audit: this.audit,
          repoVisibility: (repo) => this.repoVisibility(repo),
          connectedAgents: () => this.hub?.connected() ?? [],
          capabilities: () => this.hub?.connectedCapabilities() ?? [],
          cachedPaths: (paths) => this.requireCache().hasPaths([...paths]),
          importDerivations: (drvs) => this.requireCache().importDerivations(drvs),
          drainAgent: (id, actor, reason) => this.agentHub.drainAgent(id, actor, reason),
          resumeAgent: (id, actor) => this.agentHub.resumeAgent(id, actor),
          runs: this.github?.runs ?? new RunStore(this.db),
          runCommand: (repo, number, login, command) =>
            this.github ? this.github.commands.runFromWeb(repo, number, login, command) : Promise.resolve(undefined),
          rebuildFailed: (repo, sha, actor) =>
            this.github ? this.github.events.rerun(repo, sha, 'web', actor) : Promise.resolve(false),
          events: this.events,
          hooks: this.hooks,
        }),
        access: this.access,
        corsOrigins: this.options.web.corsOrigins,
        ...(this.options.oauth && this.access.sessions
          ? {
              auth: authRouter({
                oauth: this.options.oauth,
                sessions: this.access.sessions,
                audit: this.audit,
                logger: this.logger.child({ component: 'auth' }),
              }),
            }
          : {}),
        agent: [
          checkSourceRouter({
            access: this.access,
            checks: this.checks,
            audit: this.audit,
            mirrorDir: (url) => mirrorDirFor(join(this.options.dataDir, 'git'), url),
          }),
          s3PushRouter({
            access: this.access,
            audit: this.audit,
            lease: (id) => this.manager.openLease(id),
            cacheFor: (leaseId, cacheId) => {
              const lease = this.manager.openLease(leaseId);
              if (!lease) return Promise.resolve(undefined);
              const outputs = this.store.outputsOf(lease.drvPath).map((o) => o.path);
              return this.cachePushes.s3Grant(
                leaseId,
                cacheId,
                { drvPath: lease.drvPath, outputs },
                this.requireCache(),
              );
            },
            builtIn: this.requireCache(),
          }),
        ],
        metrics,
        ...(this.github ? { github: this.github.router() } : {}),
        web: webRouter(defaultWebDir()),
        ready: () => (this.state !== 'running' ? `the coordinator is ${this.state}` : this.health.reason),
      },
      this.logger.child({ component: 'http' }),
    );
    this.routes = routeList(app);
    const http = await listen(app, this.options.web.address, this.options.web.port);
    this.httpServer = http.server;
    this.httpPort = http.port;

    this.hub = new AgentHub(
      this.manager,
      this.tokens,
      this.access,
      this.audit,
      this.db,
      {
        leaseTtlMs: this.options.leaseTtlMs,
        cacheUrl: this.cacheUrl,
        cachePublicKey: this.cache.publicKey,
        storeMarker: this.storePublisher?.marker ?? '',
        cancelGraceSeconds: CANCEL_GRACE_SECONDS,
        helloTimeoutMs: this.options.helloTimeoutMs,
        allowUnsandboxedUntrustedBuilds: this.options.security.allowUnsandboxedUntrustedBuilds,
        onAgent: (e) => this.events.publish({ type: 'agent', ...e }),
      },
      this.logger.child({ component: 'agents' }),
      this.health,
      this.checks,
    );
    this.grpcServer = new Server(serverChannelOptions);
    this.grpcServer.addService(AgentServiceService, this.hub.service);
    const tls = this.options.grpc.tls;
    // With client_ca_file, a client certificate signed by that CA is required before any call (mutual TLS).
    const credentials = tls
      ? ServerCredentials.createSsl(
          tls.clientCaFile ? readFileSync(tls.clientCaFile) : null,
          [{ cert_chain: readFileSync(tls.certFile), private_key: readFileSync(tls.keyFile) }],
          tls.clientCaFile !== undefined,
        )
      : ServerCredentials.createInsecure();
    this.grpcPort = await new Promise<number>((resolve, reject) =>
      this.grpcServer!.bindAsync(`${this.options.grpc.address}:${this.options.grpc.port}`, credentials, (err, port) =>
        err ? reject(err) : resolve(port),
      ),
    );
    // Before builds recover: no result is announced before hooks listen.
    this.hooks.start(this.manager);
    this.manager.recover();
    this.checks.recover();
    this.hub.start();
    this.github?.start();
    this.state = 'running';
    this.logger.info(
      { grpcPort: this.grpcPort, httpPort: this.httpPort, dataDir: this.options.dataDir },
      'coordinator running',
    );
  }

  /** Tells agents to drain, closes the ports; leases stay in the database for the next start. */
  async stopGracefully(): Promise<void> {
    if (this.state !== 'running') return this.stopNow();
    this.state = 'stopping';
    this.hub?.drain('coordinator shutting down');
    this.hub?.stop();
    await new Promise<void>((resolve) => this.grpcServer?.tryShutdown(() => resolve()) ?? resolve());
    await this.github?.stopGracefully();
    await this.hooks.stopGracefully();
    await this.closeRest();
  }

  async stopNow(): Promise<void> {
    if (this.state === 'stopped') return;
    this.state = 'stopping';
    this.grpcServer?.forceShutdown();
    await this.closeRest();
  }

  private async closeRest(): Promise<void> {
    this.hub?.stop();
    this.cachePushes.stop();
    this.hooks.stopNow();
    this.github?.stopNow();
    for (const app of this.options.githubApps) app.credentialSource?.close();
    await closeHttp(this.httpServer);
    this.logs.closeAll();
    this.health.stop();
    this.evalEnv?.close();
    await this.storePublisher?.close();
    await this.checkpointer.stop();
    this.db.close();
    this.state = 'stopped';
  }

  private requireCache(): BinaryCache {
    if (!this.cache) throw new IllegalStateError('the binary cache is not open before start()');
    return this.cache;
  }
}

/** An address to dial for one we listen on: a wildcard listener is reached on loopback. */
function hostFor(address: string): string {
  if (address === '0.0.0.0' || address === '::' || address === '') return '127.0.0.1';
  return address.includes(':') ? `[${address}]` : address;
}

// Requests under way get this long to finish when the coordinator stops; then every connection is cut.
const HTTP_CLOSE_GRACE_MS = 2_000;

/**
 * Stops the HTTP server: no new connections, idle ones closed, requests under way given a moment, then the rest cut
 * — live streams (logs followed, events) never end by themselves; their clients reconnect with Last-Event-ID.
 */
async function closeHttp(server: HttpServer | undefined): Promise<void> {
  if (!server) return;
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeIdleConnections();
  const cut = setTimeout(() => server.closeAllConnections(), HTTP_CLOSE_GRACE_MS);
  await closed;
  clearTimeout(cut);
}
