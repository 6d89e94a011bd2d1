import { readFileSync } from 'node:fs';
import { readFile, rm, symlink } from 'node:fs/promises';
import { IllegalStateError, NixCommandError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { BuildOutcome, NixDaemonConnection } from '../../common/nix/daemon-client.js';
import { type Derivation, outputPaths, parseDerivation } from '../../common/nix/derivation.js';
import {
  Outcome,
  type Assign,
  type BuiltOutput,
  type CachePushResult,
} from '../../common/proto/ekaci/agent/v1/agent.js';
import { nixBuildOutcome } from '../../common/retry.js';
import type { LeaseLog, LogSpool } from '../logs/spool.js';
import type { CacheUploader } from '../nix/cache-upload.js';
import { pushToCaches } from '../nix/cache-push.js';
import { readCachedDerivation } from '../nix/cached-derivation.js';
import type { StorePool } from '../nix/store-pool.js';
import { ERROR_TEXT_MAX_CHARS, type Job, type JobResult } from './job.js';

// How much of the end of the output is kept in memory: Nix prints its verdict (and the machine problems
// nixBuildOutcome looks for) in the last lines; 16 KiB holds them even after a verbose builder.
const LOG_TAIL_BYTES = 16 * 1024;

/** What a build needs from the agent besides its `Assign`. */
export interface BuildContext {
  /** The coordinator's cache: substituter for inputs and `.drv`s, destination for outputs; '' for none. */
  cacheUrl: string;
  cachePublicKey: string;
  /** The coordinator takes a path's narinfo and NAR in one request (protocol 1.6). */
  oneRequestUploads?: boolean;
  /**
   * The agent's store is the coordinator's (`Welcome.store_marker` is valid in it): outputs stay there, and the
   * coordinator copies them into its cache, instead of their being uploaded (protocol 1.7).
   */
  coordinatorStore?: boolean;
  netrcPath: string;
  /** Connections to the agent's store (one per running build). */
  pool: StorePool;
  uploader: CacheUploader;
  /** Where the lease's GC roots go: its outputs stay in the store until the coordinator acknowledged the result. */
  spool: LogSpool;
  /** The agent's token: for the coordinator's presigning routes of s3 cache pushes. */
  token: string;
  /** Called once the builder succeeded and only the outputs' upload is left: the build slot may go to the next. */
  builderEnded?: () => void;
}

/** A build's result never carries an exit code: Nix's verdict is in `error`. */
export type BuildResult = Omit<JobResult, 'exitCode'>;

/**
 * States: created → building → uploading → done; building/uploading → stopping → done (cancel); created → done
 * (cancelled before it began).
 */
export type BuildState = 'created' | 'building' | 'uploading' | 'stopping' | 'done';

const TRANSITIONS: Record<BuildState, readonly BuildState[]> = {
  created: ['building', 'done'],
  building: ['uploading', 'stopping', 'done'],
  uploading: ['stopping', 'done'],
  stopping: ['done'],
  done: [],
};

/**
 * One `Assign` carried out over a long-lived connection to the agent's Nix store (`nix-daemon --stdio`): the
 * derivation is realised — its inputs substituted from the coordinator's cache (see `realise` for the `.drv`) —
 * with its log spooled to the lease's file line by line, then its outputs are made GC roots (released by the
 * workload once the coordinator acknowledged the result), uploaded to the cache and measured. `run()` never rejects:
 * every failure is an outcome.
 *
 * The log is read from the daemon no faster than the spool writes it: while the lease log's buffer is over its
 * high-water mark, the build stops reading, and the daemon (and through it the builder) waits.
 */
export class Build implements Job {
  private state: BuildState = 'created';
  private conn: NixDaemonConnection | null = null;
  /** The last lines of the log, at least LOG_TAIL_BYTES of them when the log is that long. */
  private readonly tail: Buffer[] = [];
  private tailBytes = 0;
  private cancelReason: string | null = null;
  private result: Promise<BuildResult> | null = null;
  /** The derivation, when it was fetched on its own rather than made valid in the store with its closure. */
  private derivation: Derivation | null = null;

  constructor(
    private readonly assign: Assign,
    private readonly context: BuildContext,
    private readonly log: LeaseLog,
    private readonly logger: Logger,
  ) {}

  get status(): BuildState {
    return this.state;
  }

  run(): Promise<BuildResult> {
    this.result ??= this.execute();
    return this.result;
  }

  /**
   * Graceful: the connection is interrupted (SIGTERM to an own daemon's and its builders' groups; a closed
   * connection for the host's daemon, which then stops the build), and killed after `graceMs`.
   */
  async cancel(reason: string, graceMs: number): Promise<void> {
    if (this.state === 'done') return;
    this.cancelReason ??= reason;
    if (this.state === 'created') return;
    if (this.state !== 'stopping') this.transition('stopping');
    this.conn?.interrupt();
    const timer = setTimeout(() => this.killTree(), graceMs);
    try {
      await this.run();
    } finally {
      clearTimeout(timer);
    }
  }

  /** Forced: SIGKILL to the process group and every builder group below it, at once. */
  async kill(reason: string): Promise<void> {
    if (this.state === 'done') return;
    this.cancelReason ??= reason;
    if (this.state === 'created') return;
    if (this.state !== 'stopping') this.transition('stopping');
    this.killTree();
    await this.run();
  }

  private async execute(): Promise<BuildResult> {
    if (this.cancelReason !== null) return this.finishCancelled();
    this.transition('building');
    let conn: NixDaemonConnection;
    try {
      conn = await this.context.pool.acquire();
    } catch (err) {
      await this.log.close();
      return this.finish(Outcome.OUTCOME_INFRA_ERROR, `cannot start nix-daemon: ${message(err)}`);
    }
    this.conn = conn;
    try {
      return await this.buildWith(conn);
    } finally {
      this.conn = null;
      this.context.pool.release(conn);
    }
  }

  private async buildWith(conn: NixDaemonConnection): Promise<BuildResult> {
    const a = this.assign;
    const c = this.context;
    let built;
    try {
      await conn.setOptions({
        maxSilentTime: a.maxSilentSeconds,
        buildTimeout: a.timeoutSeconds,
        useSubstitutes: true,
        overrides: {
          substituters: c.cacheUrl,
          'trusted-public-keys': c.cachePublicKey,
          'netrc-file': c.netrcPath,
          // The coordinator chose this host for the build; remote builders from nix.conf would defeat that.
          builders: '',
          // Nix 2.8's name for max-log-size. Sent even when 0 (no limit): a daemon keeps the settings of the
          // connection's previous build. A daemon ignores it from an untrusted user; the coordinator enforces it too.
          'max-build-log-size': String(a.maxLogBytes),
        },
      });
      built = await this.realise(conn);
    } catch (err) {
      await this.log.close();
      if (this.cancelReason !== null) return this.finishCancelled();
      return this.finish(Outcome.OUTCOME_INFRA_ERROR, `nix-daemon failed: ${message(err)}`);
    }
    await this.log.close();
    if (this.cancelReason !== null) return this.finishCancelled();
    if (this.log.writeError !== null) {
      return this.finish(Outcome.OUTCOME_INFRA_ERROR, `cannot write the log spool: ${this.log.writeError.message}`);
    }
    if (!built.ok) {
      const outcome = nixBuildOutcome(
        built.status,
        null,
        `${Buffer.concat(this.tail).toString('utf8')}\n${built.message}`,
      );
      return this.finish(outcome, built.message);
    }
    this.transition('uploading');
    c.builderEnded?.();
    let paths: Record<string, string>;
    try {
      paths = outputPaths(this.derivation ?? parseDerivation(await readFile(a.drvPath, 'utf8'), a.drvPath));
      await this.addGcRoots(conn, paths);
    } catch (err) {
      if (this.cancelReason !== null) return this.finishCancelled();
      return this.finish(
        Outcome.OUTCOME_INFRA_ERROR,
        `cannot keep the outputs from garbage collection: ${message(err)}`,
      );
    }
    try {
      // Pushes to the operator's caches are checked against the outputs' closures in the coordinator's cache, which
      // must hold them before Finished: those builds upload as any agent does.
      const inCoordinatorStore = c.coordinatorStore === true && a.pushes.length === 0;
      if (c.cacheUrl !== '' && !inCoordinatorStore)
        await c.uploader.upload(conn, c.cacheUrl, Object.values(paths), a.leaseId, {
          stopped: () => this.cancelReason !== null,
          oneRequest: c.oneRequestUploads ?? false,
        });
      const outputs: BuiltOutput[] = [];
      for (const [name, path] of Object.entries(paths)) {
        outputs.push({ name, path, ...(await c.uploader.sizes(conn, path)) });
      }
      if (this.cancelReason !== null) return this.finishCancelled();
      const pushes = await this.pushToCaches(conn, Object.values(paths));
      if (this.cancelReason !== null) return this.finishCancelled();
      return {
        ...this.finish(Outcome.OUTCOME_SUCCEEDED, '', outputs),
        ...(pushes.length > 0 ? { pushes } : {}),
        ...(inCoordinatorStore ? { outputsInCoordinatorStore: true } : {}),
      };
    } catch (err) {
      if (this.cancelReason !== null) return this.finishCancelled();
      return this.finish(Outcome.OUTCOME_INFRA_ERROR, `upload to ${c.cacheUrl} failed: ${message(err)}`);
    }
  }

  /** Pushes the outputs to the caches the assignment names; the results go with `Finished`, failures included. */
  private async pushToCaches(conn: NixDaemonConnection, outputs: string[]): Promise<CachePushResult[]> {
    const { pushes, leaseId } = this.assign;
    if (pushes.length === 0) return [];
    return pushToCaches(pushes, outputs, {
      conn,
      leaseId,
      token: this.context.token,
      spoolDir: this.context.spool.workDir(leaseId),
      logger: this.logger,
      stopped: () => this.cancelReason !== null,
    });
  }

  /**
   * Builds the derivation. When its `.drv` is not in the store, the way Hydra's remote builders do: the one `.drv`
   * is read from the cache, its input derivations are resolved to the output paths the coordinator sent, and the
   * daemon builds the result (wopBuildDerivation), substituting only those outputs' closures. Substituting the
   * `.drv` instead would bring its whole `.drv` closure first, one path at a time (30,000 paths: over 12 minutes
   * for a nixpkgs pull request). Falls back to building the `.drv` by path when it cannot go that way: an older
   * coordinator, no cache, or a daemon that refuses wopBuildDerivation to an untrusted user.
   */
  private async realise(conn: NixDaemonConnection): Promise<BuildOutcome> {
    const a = this.assign;
    const onLog = { bytes: (lines: Buffer): void | Promise<void> => this.logLines(lines) };
    // A .drv in the store already (an agent sharing the coordinator's store, an earlier attempt here) is built by
    // path; it is read once, for its outputs, and one query asks whether it and its outputs are valid.
    const local = storeDerivation(a.drvPath);
    const valid = await conn.queryValidPaths([a.drvPath, ...(local === null ? [] : Object.values(outputPaths(local)))]);
    const drvValid = local !== null && valid.has(a.drvPath);
    const basic = drvValid ? null : await this.basicDerivation();
    if (this.cancelReason !== null) throw new Error('cancelled while reading the .drv');
    if (drvValid) this.derivation = local;
    const derivation = basic ?? this.derivation;
    if (derivation !== null) {
      const outputs = Object.values(outputPaths(derivation));
      const known = drvValid ? valid : await conn.queryValidPaths(outputs);
      if (outputs.length > 0 && outputs.every((o) => known.has(o))) await this.noteOutputsAlreadyValid();
    }
    if (basic !== null) {
      try {
        return await conn.buildDerivation(a.drvPath, basic, onLog);
      } catch (err) {
        if (!(err instanceof NixCommandError && /not privileged to build/.test(err.message))) throw err;
        this.context.pool.basicDerivationsRefused = true;
        this.derivation = null;
        this.logger.warn(
          { err: err.message },
          "the nix-daemon refuses to build derivations sent inline (this agent's user is not in trusted-users): " +
            'every build now substitutes its whole .drv closure first, which is slow for large closures',
        );
      }
    }
    return conn.buildPaths([`${a.drvPath}!*`], onLog);
  }

  /**
   * Nix builds nothing, and logs nothing, when the outputs are valid in the store already (an earlier attempt on this
   * host built them, and their upload failed): the attempt's log says so instead of being empty.
   */
  private async noteOutputsAlreadyValid(): Promise<void> {
    await this.logLines(
      Buffer.from(
        `eka-ci: nothing to build: the outputs of ${this.assign.drvPath} are valid in this builder's store already ` +
          '(an earlier attempt here built them); they are checked and uploaded as they are\n',
      ),
    );
  }

  /**
   * For a `.drv` not in the store: the derivation with its input derivations resolved to their outputs, or null to
   * build the `.drv` by path.
   */
  private async basicDerivation(): Promise<Derivation | null> {
    const a = this.assign;
    const c = this.context;
    if (c.cacheUrl === '' || c.pool.basicDerivationsRefused) return null;
    let d: Derivation;
    try {
      d = await readCachedDerivation(c.cacheUrl, c.netrcPath, a.drvPath);
    } catch (err) {
      this.logger.warn({ drvPath: a.drvPath, err: message(err) }, 'cannot read the .drv from the cache on its own');
      return null;
    }
    const known = new Map(a.inputOutputs.map((o) => [`${o.drvPath}!${o.name}`, o.path]));
    const inputs: string[] = [];
    for (const [drv, names] of Object.entries(d.inputDrvs)) {
      for (const name of names) {
        const path = known.get(`${drv}!${name}`);
        // An older coordinator sends none; a floating content-addressed input has no path before it is built.
        if (path === undefined || path === '') return null;
        inputs.push(path);
      }
    }
    this.derivation = d;
    return { ...d, inputDrvs: {}, inputSrcs: [...d.inputSrcs, ...inputs] };
  }

  /** A promise while the spool is behind: the daemon connection reads no further until it settles. */
  private logLines(lines: Buffer): void | Promise<void> {
    this.keepTail(lines);
    if (!this.log.append(lines)) return this.log.writable();
  }

  private keepTail(chunk: Buffer): void {
    this.tail.push(chunk);
    this.tailBytes += chunk.length;
    while (this.tail.length > 1 && this.tailBytes - (this.tail[0] as Buffer).length >= LOG_TAIL_BYTES) {
      this.tailBytes -= (this.tail.shift() as Buffer).length;
    }
  }

  /**
   * One symlink per output in the lease's spool directory, registered with the daemon as an indirect GC root: the
   * daemon's own temporary roots last only as long as its connection, which is recycled or killed independently
   * of the lease. The workload deletes the links when the lease is settled or dropped.
   */
  private async addGcRoots(conn: NixDaemonConnection, paths: Record<string, string>): Promise<void> {
    for (const [name, path] of Object.entries(paths)) {
      const link = this.context.spool.gcRoot(this.assign.leaseId, name);
      await rm(link, { force: true });
      await symlink(path, link);
      await conn.addIndirectRoot(link);
    }
  }

  private killTree(): void {
    this.conn?.kill();
  }

  private async finishCancelled(): Promise<BuildResult> {
    await this.log.close();
    return this.finish(Outcome.OUTCOME_CANCELLED, `cancelled: ${this.cancelReason ?? 'no reason given'}`);
  }

  private finish(outcome: Outcome, error: string, outputs: BuiltOutput[] = []): BuildResult {
    this.transition('done');
    this.logger.info({ leaseId: this.assign.leaseId, outcome: Outcome[outcome], error }, 'build finished');
    return { outcome, error: error.slice(0, ERROR_TEXT_MAX_CHARS), outputs, finishedAtMs: Date.now() };
  }

  private transition(to: BuildState): void {
    if (!TRANSITIONS[this.state].includes(to)) {
      throw new IllegalStateError(`build of lease ${this.assign.leaseId}: illegal transition ${this.state} → ${to}`);
    }
    this.state = to;
  }
}

/**
 * The `.drv` as the agent's store holds it, or null when it has none (or one it cannot read). Read synchronously:
 * it is a few hundred bytes, and a read through the thread pool waited on the event loop three times (bench/dispatch).
 * Whether the store holds it validly is the daemon's to say.
 */
function storeDerivation(drvPath: string): Derivation | null {
  try {
    return parseDerivation(readFileSync(drvPath, 'utf8'), drvPath);
  } catch {
    return null;
  }
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
