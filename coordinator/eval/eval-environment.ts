import { accessSync, constants, mkdtempSync, realpathSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join } from 'node:path';
import { EvaluationError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { NIX_EXPERIMENTAL } from '../../common/nix/cli.js';
import { HOST_DAEMON_SOCKET, NixDaemonConnection, daemonAnswers } from '../../common/nix/daemon-client.js';
import { type SandboxedCommand, sandboxAvailable, sandboxCommand } from '../../common/sandbox/sandbox.js';
import { SYSTEM_PATHS } from '../../common/sandbox/spec.js';
import type { EvalPolicy, EvaluationOptions } from './eval-options.js';
import { EvalStore, type ImportReport } from './eval-store.js';
import { GcRoots, type RootRegistrar, directRegistrar } from './gc-roots.js';
import { PrivateNixDaemon } from './private-daemon.js';

/** The programs that evaluate repository code. */
export type EvalProgram = 'nix' | 'nix-instantiate' | 'nix-eval-jobs';

/** What one evaluation may see. */
export interface EvalScope {
  /** Directories its expressions may read (the checkout): visible read-only, and the only paths restrict-eval allows. */
  roots: readonly string[];
  /**
   * Visible read-only but not to expressions: the git objects behind a worktree, which Nix's own fetcher reads
   * when a flake is loaded by a locked `git+file` reference.
   */
  gitDirs?: readonly string[];
  policy: EvalPolicy;
}

/** Directories one command needs beyond its evaluation's scope (they must exist). */
export interface ExtraPaths {
  /** Readable by the evaluation like its roots: the evaluator's request files. */
  roots?: readonly string[];
  /** Read-write: `nix-eval-jobs --gc-roots-dir`. */
  writable?: readonly string[];
}

/** Starts the Nix processes of one evaluation (see `EvalEnvironment.launcher`). */
export interface NixLauncher {
  command(program: EvalProgram, args: readonly string[], extra?: ExtraPaths): SandboxedCommand;
  /** Per-attribute time limit, in ms. */
  readonly attrTimeoutMs: number;
  /** Resident memory per evaluator process above which it is restarted, in MiB. */
  readonly maxMemoryMiB: number;
  /**
   * How the GC roots of what its evaluations write are registered with their store (see RootRegistrar): in the
   * evaluation store's state directory (the Nix store gets roots when a build imports the paths; see
   * `importDerivations`), or through the host's daemon. Absent: directly in the Nix store's state directory.
   */
  readonly registerRoot?: RootRegistrar;
}

// Inside the sandbox the store's socket always has this path, whichever daemon serves it outside.
const SANDBOX_SOCKET = '/run/ekaci/nix-daemon.socket';
// The hard memory limit (RLIMIT_DATA) sits this far above the soft one the evaluator checks between requests: the
// soft limit restarts a worker that grew, the hard one stops an attribute that would take the machine's memory.
const HARD_MEMORY_FACTOR = 2;

/**
 * How the coordinator evaluates repository code: every evaluator process (the built-in evaluator's `nix repl`
 * workers, `nix-eval-jobs`, `ekaci build`'s `nix-instantiate`) is started through `launcher(scope).command`, which
 *
 * - runs it in the sandbox (common/sandbox): no network unless the repository's policy allows URIs, the store and
 *   the checkout read-only, a private `/tmp`, nothing of the coordinator's data directory;
 * - gives it an environment built from an allow-list: none of the coordinator's variables (app keys, webhook
 *   secret, agent tokens) passes;
 * - evaluates with `restrict-eval` (only the checkout and the store are readable; `getEnv` answers ""),
 *   `allowed-uris` from the policy, import-from-derivation off unless allowed, and a memory limit;
 * - writes `.drv` files into the evaluation store (`EvalStore`, under the data directory) when it has one and the
 *   repository may not import from derivations: directly, the way a single-user Nix writes its store, and several
 *   times faster than through a daemon. They reach the Nix store when a build needs them (`importDerivations`).
 * - otherwise writes `.drv` files through a nix-daemon: the host's on a multi-user host, else one of the
 *   coordinator's own (`PrivateNixDaemon`), since a read-only store cannot be written directly. Import from
 *   derivations needs this: the daemon builds what the evaluation imports.
 *
 * Lifecycle: `open` → `close`. `prepare()` (before each evaluation) restarts a private daemon that died.
 */
export class EvalEnvironment {
  private daemon: PrivateNixDaemon | undefined;
  private readonly homeDir: string;
  private readonly binDirs: string[];

  private constructor(
    readonly options: EvaluationOptions,
    private readonly logger: Logger,
    private readonly store: { kind: 'system' } | { kind: 'private' } | { kind: 'direct' },
    private readonly evalStore: EvalStore | undefined,
  ) {
    // Evaluation without a sandbox still gets a home of its own rather than the coordinator's.
    this.homeDir = mkdtempSync(join(tmpdir(), 'ekaci-eval-home-'));
    this.binDirs = [...new Set(['nix', 'git', 'nix-eval-jobs'].flatMap((p) => programDir(p) ?? []))];
  }

  /**
   * `evalStoreDir`: where the evaluation store lives (the coordinator's and `ekaci review`'s `<data dir>/eval-store`);
   * without it, or with `store` set to a daemon, or without the sandbox, every evaluation writes through the daemon.
   */
  static async open(
    options: EvaluationOptions,
    logger: Logger,
    place: { evalStoreDir?: string } = {},
  ): Promise<EvalEnvironment> {
    if (options.sandbox) await sandboxAvailable();
    else logger.warn('evaluation sandbox is off ([evaluation] sandbox = false): only evaluate code you trust');
    let store: { kind: 'system' } | { kind: 'private' } | { kind: 'direct' };
    if (!options.sandbox) store = { kind: 'direct' };
    else if (options.store === 'daemon') store = { kind: 'system' };
    else if (options.store === 'private-daemon') store = { kind: 'private' };
    else store = (await systemDaemonAnswers()) ? { kind: 'system' } : { kind: 'private' };
    const evalStore =
      options.sandbox && options.store === 'auto' && place.evalStoreDir !== undefined
        ? EvalStore.open(place.evalStoreDir)
        : undefined;
    // A private daemon starts with the first evaluation (`prepare`), not here: many commands never evaluate.
    return new EvalEnvironment(options, logger, store, evalStore);
  }

  /**
   * Makes sure the store an evaluation under `policy` writes is reachable: starts the private daemon (again, when it
   * died) unless the evaluation store takes it all. Without a policy, as for any evaluation.
   */
  async prepare(policy?: Pick<EvalPolicy, 'allowImportFromDerivation'>): Promise<void> {
    if (this.store.kind !== 'private' || this.daemon?.alive) return;
    if (policy && this.evalStoreFor(policy)) return;
    this.daemon?.stop();
    this.daemon = await PrivateNixDaemon.start(this.logger);
  }

  /**
   * Puts the `.drv` closures of `drvPaths` that only the evaluation store holds into the Nix store (see
   * `EvalStore.importDerivations`): before they are built or pushed to a cache. Nothing to do without an evaluation
   * store. With `gcRootsDir` (a commit's, see GcRoots), each of `drvPaths` is rooted there: in the Nix store it lives
   * as long as the commit's evaluation, as it would had it been evaluated into the Nix store.
   */
  async importDerivations(drvPaths: readonly string[], gcRootsDir?: string): Promise<ImportReport> {
    // Derivations evaluated elsewhere (uploaded, built before) need no daemon connection.
    if (!this.evalStore || !drvPaths.some((p) => this.evalStore!.holds(p))) return { added: 0, present: 0 };
    const started = Date.now();
    // Through the host's daemon, or one of the coordinator's own on the store it owns: either checks what it adds.
    const daemon =
      this.store.kind === 'system'
        ? await NixDaemonConnection.connect(HOST_DAEMON_SOCKET)
        : await NixDaemonConnection.open({ nixOptions: { store: 'local', substituters: '' } });
    try {
      const report = await this.evalStore.importDerivations(drvPaths, daemon);
      if (gcRootsDir !== undefined) {
        // Through the daemon: on a multi-user host only it may write the store's gcroots.
        const roots = new GcRoots(gcRootsDir, (link) => daemon.addIndirectRoot(link));
        for (const p of drvPaths) if (this.evalStore.holds(p)) await roots.add(p);
      }
      if (report.added > 0) {
        this.logger.debug({ ...report, ms: Date.now() - started }, 'imported paths from the evaluation store');
      }
      return report;
    } finally {
      await daemon.close();
    }
  }

  /**
   * Deletes from the evaluation store what no kept evaluation roots (see `releaseCommitRoots`): what is being
   * evaluated is safe, as Nix keeps what a running evaluator made. One collection at a time; nothing to do without
   * an evaluation store.
   */
  collectEvalStore(): Promise<void> {
    if (!this.evalStore) return Promise.resolve();
    const store = this.evalStore;
    this.collecting ??= store.collect().finally(() => (this.collecting = undefined));
    return this.collecting;
  }

  private collecting: Promise<void> | undefined;

  // The host daemon's connection for GC roots of evaluations through it, opened at the first; one call at a time.
  private rootsConnection: Promise<NixDaemonConnection> | undefined;
  private rootsQueue: Promise<void> = Promise.resolve();

  /** Registers an indirect root with the host's daemon: its gcroots are root's on a multi-user host. */
  private readonly registerThroughDaemon = (link: string): Promise<void> => {
    const done = this.rootsQueue.then(async () => {
      this.rootsConnection ??= NixDaemonConnection.connect(HOST_DAEMON_SOCKET);
      try {
        await (await this.rootsConnection).addIndirectRoot(link);
      } catch (e) {
        // A connection that broke is opened again by the next root.
        const gone = this.rootsConnection;
        this.rootsConnection = undefined;
        void gone.then((c) => c.kill()).catch(() => undefined);
        throw e;
      }
    });
    this.rootsQueue = done.catch(() => undefined);
    return done;
  };

  /** Whether a private daemon of this environment is running (the first evaluation that needs one starts it). */
  get privateDaemonRunning(): boolean {
    return this.daemon?.alive === true;
  }

  /** Where evaluations write when no evaluation store takes them: `private` when the host has no daemon. */
  get daemonKind(): 'system' | 'private' | 'direct' {
    return this.store.kind;
  }

  /** The evaluation store an evaluation under `policy` writes directly; undefined when it writes through a daemon. */
  private evalStoreFor(policy: Pick<EvalPolicy, 'allowImportFromDerivation'>): EvalStore | undefined {
    return policy.allowImportFromDerivation ? undefined : this.evalStore;
  }

  close(): void {
    void this.rootsConnection?.then((c) => c.close()).catch(() => undefined);
    this.rootsConnection = undefined;
    this.evalStore?.close();
    this.daemon?.stop();
    this.daemon = undefined;
    rmSync(this.homeDir, { recursive: true, force: true });
  }

  launcher(scope: EvalScope): NixLauncher {
    const direct = this.evalStoreFor(scope.policy);
    return {
      command: (program, args, extra = {}) =>
        this.command(
          program,
          args,
          { ...scope, roots: [...scope.roots, ...(extra.roots ?? [])] },
          extra.writable ?? [],
        ),
      attrTimeoutMs: this.options.attrTimeoutSeconds * 1000,
      maxMemoryMiB: this.options.maxMemoryMiB,
      ...(direct
        ? { registerRoot: directRegistrar(direct.stateDir) }
        : this.store.kind === 'system'
          ? { registerRoot: this.registerThroughDaemon }
          : {}),
    };
  }

  private command(
    program: EvalProgram,
    args: readonly string[],
    scope: EvalScope,
    writable: readonly string[],
  ): SandboxedCommand {
    const policy = scope.policy;
    const nixArgs = [
      ...args,
      ...NIX_EXPERIMENTAL,
      ...['--option', 'restrict-eval', 'true'],
      ...['--option', 'allowed-uris', policy.allowedUris.join(' ')],
      ...['--option', 'allow-import-from-derivation', String(policy.allowImportFromDerivation)],
      ...['--option', 'substituters', ''],
      // Named search path entries: restrict-eval allows reading under them, while `<nixpkgs>`-style lookups
      // still find nothing (as on a clean machine, not via the coordinator's NIX_PATH).
      ...scope.roots.flatMap((root, i) => ['-I', `ekaci-root-${i}=${root}`]),
    ];
    // `ulimit -d` in a shell that then becomes the program: Node cannot set a child's resource limits itself.
    const hardKib = this.options.maxMemoryMiB * HARD_MEMORY_FACTOR * 1024;
    const limited = (extra: readonly string[]): string[] => [
      '-c',
      'ulimit -d "$0" && exec "$@"',
      String(hardKib),
      program,
      ...nixArgs,
      ...extra,
    ];
    const path = [...this.binDirs, '/usr/bin', '/bin'].join(delimiter);
    if (this.store.kind === 'direct') {
      return {
        file: '/bin/sh',
        args: limited([]),
        env: { PATH: path, HOME: this.homeDir, TMPDIR: tmpdir(), LANG: 'C.UTF-8', ...passThroughNixEnv() },
      };
    }
    const direct = this.evalStoreFor(policy);
    const socket = this.store.kind === 'system' ? HOST_DAEMON_SOCKET : this.daemon?.socketPath;
    if (direct === undefined && socket === undefined) {
      throw new EvaluationError('the evaluation store is not open (prepare() first)');
    }
    const storeArgs = direct ? ['--store', direct.uri] : ['--store', `unix://${SANDBOX_SOCKET}`];
    return sandboxCommand('/bin/sh', limited(storeArgs), {
      mounts: [
        ...(direct ? [] : [{ source: socket!, target: SANDBOX_SOCKET }]),
        ...scope.roots.map((r) => ({ source: r })),
        ...(scope.gitDirs ?? []).map((r) => ({ source: r })),
        ...writable.map((r) => ({ source: r, writable: true })),
        ...this.binDirs.filter((d) => !underSystemPath(d)).map((d) => ({ source: d, optional: true })),
        // Last: a root above it (a data directory evaluated as a checkout) must not cover it read-only.
        ...(direct ? [{ source: direct.root, writable: true }] : []),
      ],
      network: policy.allowedUris.length > 0,
      env: {
        PATH: path,
        HOME: '/tmp',
        TMPDIR: '/tmp',
        XDG_CACHE_HOME: '/tmp/.cache',
        XDG_CONFIG_HOME: '/tmp/.config',
        NIX_CONF_DIR: '/etc/nix',
        LANG: 'C.UTF-8',
        TERM: 'dumb',
        // A local store names per-user directories after the user; the sandbox has no passwd entry to look it up.
        USER: 'ekaci',
      },
      cwd: scope.roots[0] ?? '/tmp',
    });
  }
}

/** Programs under the sandbox's system paths are visible already. */
function underSystemPath(dir: string): boolean {
  return SYSTEM_PATHS.some((p) => dir === p || dir.startsWith(`${p}/`));
}

/** Store location overrides of the caller's (tests move the store); the rest of its environment stays out. */
function passThroughNixEnv(): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of ['NIX_CONF_DIR', 'NIX_STORE_DIR', 'NIX_STATE_DIR', 'NIX_LOG_DIR', 'NIX_REMOTE']) {
    const value = process.env[name];
    if (value !== undefined) out[name] = value;
  }
  return out;
}

/** The real directory of a program on PATH (inside the store on NixOS), or undefined when it is not installed. */
function programDir(program: string): string | undefined {
  for (const dir of (process.env.PATH ?? '').split(delimiter)) {
    if (dir === '') continue;
    const candidate = join(dir, program);
    try {
      accessSync(candidate, constants.X_OK);
      return dirname(realpathSync(candidate));
    } catch {
      // not here
    }
  }
  return undefined;
}

/** Whether the host runs a nix-daemon this process can reach (a multi-user install). */
function systemDaemonAnswers(): Promise<boolean> {
  if (process.env.NIX_REMOTE === 'local') return Promise.resolve(false);
  return daemonAnswers(HOST_DAEMON_SOCKET);
}
