import { spawn, type ChildProcess } from 'node:child_process';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import { lastLines } from '../../common/nix/cli.js';
import { Outcome, type Assign, type BuiltOutput } from '../../common/proto/ekaci/agent/v1/agent.js';
import { nixBuildOutcome } from '../../common/retry.js';
import type { LeaseLog } from '../logs/spool.js';
import { descendantGroups, signalGroup } from '../../common/process-tree.js';

// How much of the end of the output is kept in memory: Nix prints its verdict (and the machine problems
// nixBuildOutcome looks for) in the last lines; 16 KiB holds them even after a verbose builder.
const LOG_TAIL_BYTES = 16 * 1024;

// Longest `Finished.error`: a summary for tables and check runs; the full story is in the log.
const ERROR_TEXT_MAX_CHARS = 2000;

// After nix-store exits, how long a grandchild still holding its stdout may delay the end of the log.
const PIPE_DRAIN_AFTER_EXIT_MS = 2000;

const NIX_COMMAND = ['--extra-experimental-features', 'nix-command'];
// Helper calls never need a substituter; naming none keeps Nix from trying cache.nixos.org.
const NO_SUBSTITUTERS = ['--option', 'substituters', ''];

/** What a build needs from the agent besides its `Assign`. */
export interface BuildContext {
  /** The coordinator's cache: substituter for inputs and `.drv`s, destination for outputs; '' for none. */
  cacheUrl: string;
  cachePublicKey: string;
  netrcPath: string;
  /** `--add-root` path keeping the outputs alive until they are uploaded and reported. */
  gcRoot: string;
  /** The features this agent announced (supported and mandatory): Nix must agree to build what they allow. */
  systemFeatures: readonly string[];
}

export interface BuildResult {
  outcome: Outcome;
  error: string;
  outputs: BuiltOutput[];
  finishedAtMs: number;
}

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

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
  spawnError: Error | null;
  stdout: string;
  stderr: string;
}

/**
 * One `Assign` carried out: `nix-store --realise` in a process group of its own with its output spooled to the
 * lease's log, then the outputs uploaded to the cache and measured. `run()` never rejects: every failure is an
 * outcome.
 */
export class Build {
  private state: BuildState = 'created';
  private child: ChildProcess | null = null;
  private tail = Buffer.alloc(0);
  private cancelReason: string | null = null;
  private result: Promise<BuildResult> | null = null;

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

  /** Graceful: SIGTERM to the process group (Nix then stops its builder), SIGKILL after `graceMs`. */
  async cancel(reason: string, graceMs: number): Promise<void> {
    if (this.state === 'done') return;
    this.cancelReason ??= reason;
    if (this.state === 'created') return;
    if (this.state !== 'stopping') this.transition('stopping');
    if (this.child?.pid !== undefined) signalGroup(this.child.pid, 'SIGTERM');
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
    const realise = await this.spawnTracked('nix-store', this.realiseArgs(), true);
    await this.log.close();
    if (this.cancelReason !== null) return this.finishCancelled();
    if (realise.spawnError !== null)
      return this.finish(Outcome.OUTCOME_INFRA_ERROR, `cannot run nix-store: ${realise.spawnError.message}`);
    if (this.log.writeError !== null) {
      return this.finish(Outcome.OUTCOME_INFRA_ERROR, `cannot write the log spool: ${this.log.writeError.message}`);
    }
    const tail = this.tail.toString('utf8');
    const outcome = nixBuildOutcome(realise.code, realise.signal, tail);
    if (outcome !== Outcome.OUTCOME_SUCCEEDED) return this.finish(outcome, summarise(tail, realise));
    this.transition('uploading');
    try {
      const paths = await this.outputPaths();
      if (this.context.cacheUrl !== '') await this.upload([...paths.values()]);
      const outputs = await this.measure(paths);
      if (this.cancelReason !== null) return this.finishCancelled();
      return this.finish(Outcome.OUTCOME_SUCCEEDED, '', outputs);
    } catch (err) {
      if (this.cancelReason !== null) return this.finishCancelled();
      return this.finish(Outcome.OUTCOME_INFRA_ERROR, err instanceof Error ? err.message : String(err));
    }
  }

  private realiseArgs(): string[] {
    const a = this.assign;
    const c = this.context;
    return [
      '--realise',
      a.drvPath,
      ...['--option', 'substituters', c.cacheUrl],
      ...['--option', 'trusted-public-keys', c.cachePublicKey],
      ...['--option', 'max-silent-time', String(a.maxSilentSeconds)],
      ...['--option', 'timeout', String(a.timeoutSeconds)],
      ...['--option', 'netrc-file', c.netrcPath],
      // The coordinator chose this host for the build; remote builders from nix.conf would defeat that choice.
      ...['--option', 'builders', ''],
      ...['--option', 'system-features', c.systemFeatures.join(' ')],
      ...['--add-root', c.gcRoot, '--indirect'],
    ];
  }

  private async outputPaths(): Promise<Map<string, string>> {
    const r = await this.checked('nix', ['show-derivation', ...NIX_COMMAND, ...NO_SUBSTITUTERS, this.assign.drvPath]);
    const parsed = JSON.parse(r) as Record<string, { outputs?: Record<string, { path?: string }> }>;
    const drv = Object.values(parsed)[0];
    const paths = new Map<string, string>();
    for (const [name, output] of Object.entries(drv?.outputs ?? {})) {
      if (output.path !== undefined) paths.set(name, output.path);
    }
    if (paths.size === 0) throw new Error(`nix show-derivation reported no outputs for ${this.assign.drvPath}`);
    return paths;
  }

  private async upload(paths: string[]): Promise<void> {
    const c = this.context;
    const args = [
      'copy',
      ...NIX_COMMAND,
      '--to',
      c.cacheUrl,
      '--option',
      'netrc-file',
      c.netrcPath,
      ...NO_SUBSTITUTERS,
    ];
    await this.checked('nix', [...args, ...paths], `upload to ${c.cacheUrl} failed`);
  }

  private async measure(paths: Map<string, string>): Promise<BuiltOutput[]> {
    const out = await this.checked('nix', [
      'path-info',
      ...NIX_COMMAND,
      ...NO_SUBSTITUTERS,
      '--json',
      '-S',
      ...paths.values(),
    ]);
    // Nix ≤ 2.18 prints an array of { path, … }; later versions an object keyed by path.
    const parsed = JSON.parse(out) as unknown;
    const infos = new Map<string, { narSize?: number; closureSize?: number }>();
    if (Array.isArray(parsed)) {
      for (const info of parsed as { path: string; narSize?: number; closureSize?: number }[])
        infos.set(info.path, info);
    } else {
      for (const [path, info] of Object.entries(parsed as Record<string, { narSize?: number; closureSize?: number }>)) {
        infos.set(path, info);
      }
    }
    return [...paths].map(([name, path]) => ({
      name,
      path,
      narSize: infos.get(path)?.narSize ?? 0,
      closureSize: infos.get(path)?.closureSize ?? 0,
    }));
  }

  private async checked(command: string, args: string[], what = `${command} ${args[0] ?? ''} failed`): Promise<string> {
    if (this.cancelReason !== null) throw new Error(`cancelled before ${command} ${args[0] ?? ''}`);
    const r = await this.spawnTracked(command, args, false);
    if (r.spawnError !== null) throw new Error(`${what}: ${r.spawnError.message}`);
    if (r.code !== 0) throw new Error(`${what} (exit ${r.code ?? r.signal}): ${lastLines(r.stderr, 5)}`);
    return r.stdout;
  }

  /** Runs a command as the leader of a new process group; `toLog` sends both streams to the spool file. */
  private spawnTracked(command: string, args: string[], toLog: boolean): Promise<Exit> {
    return new Promise((resolve) => {
      const child = spawn(command, args, { detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
      this.child = child;
      const stdout: Buffer[] = [];
      const stderr: Buffer[] = [];
      const sources = [child.stdout, child.stderr];
      const onDrain = (): void => sources.forEach((s) => s.resume());
      if (toLog) this.log.on('drain', onDrain);
      const collect = (into: Buffer[]) => (chunk: Buffer) => {
        if (!toLog) return void into.push(chunk);
        this.keepTail(chunk);
        if (!this.log.append(chunk)) sources.forEach((s) => s.pause());
      };
      child.stdout.on('data', collect(stdout));
      child.stderr.on('data', collect(stderr));
      let spawnError: Error | null = null;
      let drainTimer: NodeJS.Timeout | undefined;
      child.on('error', (err) => {
        spawnError = err;
      });
      child.on('exit', () => {
        drainTimer = setTimeout(() => sources.forEach((s) => s.destroy()), PIPE_DRAIN_AFTER_EXIT_MS);
      });
      child.on('close', (code, signal) => {
        clearTimeout(drainTimer);
        this.log.off('drain', onDrain);
        this.child = null;
        const text = (b: Buffer[]): string => Buffer.concat(b).toString('utf8');
        resolve({ code, signal, spawnError, stdout: text(stdout), stderr: text(stderr) });
      });
    });
  }

  private keepTail(chunk: Buffer): void {
    const joined = Buffer.concat([this.tail, chunk]);
    this.tail = joined.length > LOG_TAIL_BYTES ? joined.subarray(joined.length - LOG_TAIL_BYTES) : joined;
  }

  private killTree(): void {
    const pid = this.child?.pid;
    if (pid === undefined) return;
    const below = descendantGroups(pid);
    signalGroup(pid, 'SIGKILL');
    for (const pgid of below) signalGroup(pgid, 'SIGKILL');
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

/** The line Nix ends a failed build with (`error: builder for … failed with exit code 3`), or the last lines. */
function summarise(tail: string, exit: Exit): string {
  const errorLine = tail
    .split('\n')
    .reverse()
    .find((line) => line.startsWith('error: '));
  return (
    errorLine?.slice('error: '.length) ?? `nix-store exited with ${exit.code ?? exit.signal}: ${lastLines(tail, 3)}`
  );
}
