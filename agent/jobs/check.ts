import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { spawn as spawnPty, type IPty } from 'node-pty';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { NixDaemonConnection } from '../../common/nix/daemon-client.js';
import { PLATFORM } from '../../common/platform.js';
import { signalGroup } from '../../common/process-tree.js';
import { Outcome, type Assign, type CheckJob } from '../../common/proto/ekaci/agent/v1/agent.js';
import type { SandboxCgroups } from '../../common/sandbox/cgroup.js';
import { type SandboxMount, killSandboxed, sandboxCommand, terminateSandboxed } from '../../common/sandbox/sandbox.js';
import type { LeaseLog, LogSpool } from '../logs/spool.js';
import type { StorePool } from '../nix/store-pool.js';
import { CheckLimits } from './check-limits.js';
import { fetchSource, readOnlyPaths } from './check-source.js';
import { type CheckShell, type ShellDirs, derivationShell, hostShell } from './check-shell.js';
import { ERROR_TEXT_MAX_CHARS, type Job, type JobResult } from './job.js';

// SIGTERM → SIGKILL at a check's timeout: time for a test runner to stop its workers and write its report. The same
// as the grace the agent gives a build it stops on its own (options.ts, DEFAULT_LOCAL_CANCEL_GRACE_MS).
export const CHECK_TIMEOUT_GRACE_MS = 10_000;

// After SIGKILL inside the sandbox, bubblewrap exits once its init is reaped, within milliseconds. One still there
// after this long is stuck (or no namespace existed yet) and is killed itself.
const WRAPPER_KILL_AFTER_MS = 2_000;

// The terminal's size: wide enough that tools which fit their output to the terminal (progress bars, tables) do not
// wrap most lines; the log has no width of its own.
const PTY_COLUMNS = 160;
const PTY_ROWS = 50;

// Where the checkout is inside the Linux sandbox, and the private HOME in its /tmp. macOS cannot move mounts: there
// the checkout and HOME are at their host paths.
const SANDBOX_SOURCE = '/build/source';
const SANDBOX_HOME = '/tmp/home';

// Run first in the command's shell: closes every descriptor above stderr that the agent's process inherited
// without close-on-exec (from whatever started the agent), so that none reaches the command. On one line, so the
// command's own line numbers stay right in bash's messages.
const CLOSE_INHERITED_FDS =
  'for __ekaci_fd in /dev/fd/*; do __ekaci_fd=${__ekaci_fd##*/}; ' +
  '[ "$__ekaci_fd" -gt 2 ] && eval "exec $__ekaci_fd>&-"; done; unset __ekaci_fd; ';

/** What a check needs from the agent besides its `Assign`. */
export interface CheckContext {
  /** The coordinator's cache, where a shell derivation and its inputs come from; '' for none. */
  cacheUrl: string;
  cachePublicKey: string;
  netrcPath: string;
  /** Connections to the agent's store, for the shell's inputs. */
  pool: StorePool;
  /** The lease's work directory and the GC roots of its shell's inputs. */
  spool: LogSpool;
  /** The agent's token: sent with the source download (`CheckJob.source_url`) and nowhere else. */
  token: string;
  /** Why this agent cannot run checks (its sandbox does not start), or null when it can. */
  unavailable: string | null;
  /** SIGTERM → SIGKILL at the timeout; CHECK_TIMEOUT_GRACE_MS when not given. */
  timeoutGraceMs?: number;
  /** Where checks get their memory and process limits (probed at the agent's start); none: no limits. */
  cgroups?: SandboxCgroups | null;
}

/**
 * States: created → preparing (source, shell) → running (the command) → done; preparing/running → stopping → done
 * (cancel, kill, timeout, output cap); created → done (cancelled before it began).
 */
export type CheckState = 'created' | 'preparing' | 'running' | 'stopping' | 'done';

const TRANSITIONS: Record<CheckState, readonly CheckState[]> = {
  created: ['preparing', 'done'],
  preparing: ['running', 'stopping', 'done'],
  running: ['stopping', 'done'],
  stopping: ['done'],
  done: [],
};

type Ending = Pick<JobResult, 'outcome' | 'error' | 'exitCode'>;

/**
 * One check lease (`Assign.check`): the commit's source is downloaded from the coordinator into a fresh work
 * directory of the lease, the shell's environment is made (check-shell.ts), and `bash -c command` runs under a
 * terminal (node-pty) inside the sandbox (common/sandbox): network only if the check allows it; the writable
 * checkout at /build/source as its working directory, each `ro_bind` path read-only over itself; the system and the
 * Nix store read-only; a private /tmp and HOME; nothing else of the host or of the agent (token, spool, HOME). Its
 * output goes to the lease's log after an `eka-ci:` header line. `run()` never rejects: every failure is an outcome.
 * Which environment the command gets (no shell derivation, a plain one, a stdenv one) is decided and documented in
 * check-shell.ts.
 *
 * Outcomes: exit 0 SUCCEEDED; another exit FAILED (both with `exitCode`); a bad `ro_bind` FAILED before anything
 * runs; more than `max_log_bytes` of log (header included, so the log stays within the coordinator's limit) FAILED,
 * the process tree killed and the log cut at the limit; past `timeout_seconds` TIMED_OUT (SIGTERM to the command's
 * processes, SIGKILL to the sandbox after the grace); cancel CANCELLED; anything of the agent's own (download,
 * shell, sandbox start, log spool) INFRA_ERROR. A command killed by a signal inside the Linux sandbox exits 128+N,
 * as bash reports it. The work directory is removed when the check ends, after its last process.
 *
 * Where the agent has cgroups (`context.cgroups`), the sandbox runs in a cgroup of its own with the agent's memory
 * and process limits (check-limits.ts): a fork past the process limit fails, and the kernel kills a process of the
 * check that needs memory past the memory limit (bash then reports 137). The log's second line states the limits;
 * a FAILED or TIMED_OUT check whose limits were reached says so in its error and at the end of its log. Killing
 * stays bubblewrap's, whose PID namespace ends with its init and lets bubblewrap reap that init (killing both at
 * once through the cgroup could leave the init to a host init that never reaps it); the cgroup kills what is left
 * after that, or everything when bubblewrap itself does not die.
 */
export class Check implements Job {
  private state: CheckState = 'created';
  /** Why the check was stopped from outside (cancel, timeout, output cap); it becomes the outcome. */
  private stopCause: Ending | null = null;
  private result: Promise<JobResult> | null = null;
  private readonly abort = new AbortController();
  private conn: NixDaemonConnection | null = null;
  private term: IPty | null = null;
  private limits: CheckLimits | null = null;
  private timers: NodeJS.Timeout[] = [];
  private logged = 0;
  private capped = false;

  constructor(
    private readonly assign: Assign,
    private readonly check: CheckJob,
    private readonly context: CheckContext,
    private readonly log: LeaseLog,
    private readonly logger: Logger,
  ) {}

  get status(): CheckState {
    return this.state;
  }

  /**
   * The pid of the sandbox's wrapper process while the command runs: bubblewrap (at first the shell that joins the
   * check's cgroup and execs it); the command on macOS.
   */
  get pid(): number | undefined {
    return this.term?.pid;
  }

  run(): Promise<JobResult> {
    this.result ??= this.execute();
    return this.result;
  }

  /** The directories of the check's cgroup while its sandbox may run; none without limits. */
  get cgroupDirs(): readonly string[] {
    return this.limits?.dirs ?? [];
  }

  /** Graceful: SIGTERM to the command's processes, SIGKILL to the sandbox after `graceMs`. */
  async cancel(reason: string, graceMs: number): Promise<void> {
    if (this.state === 'done') return;
    this.stop({ outcome: Outcome.OUTCOME_CANCELLED, error: `cancelled: ${reason}` }, graceMs);
    if (this.state !== 'created') await this.run();
  }

  /** Forced: SIGKILL to everything in the sandbox at once. */
  async kill(reason: string): Promise<void> {
    if (this.state === 'done') return;
    this.stop({ outcome: Outcome.OUTCOME_CANCELLED, error: `cancelled: ${reason}` }, 0);
    if (this.state !== 'created') await this.run();
  }

  private async execute(): Promise<JobResult> {
    let ending: Ending;
    try {
      ending = await this.attempt();
    } catch (err) {
      ending = infra(`the check failed on the agent: ${message(err)}`);
    }
    this.clearTimers();
    if (this.limits !== null) ending = await this.releaseLimits(this.limits, ending);
    await this.log.close();
    await this.context.spool.removeWorkDir(this.assign.leaseId).catch((err: unknown) => {
      this.logger.warn({ err: message(err) }, 'cannot remove the work directory of a check');
    });
    if (this.log.writeError !== null && ending.outcome !== Outcome.OUTCOME_INFRA_ERROR) {
      ending = infra(`cannot write the log spool: ${this.log.writeError.message}`);
    }
    return this.finish(ending);
  }

  private async attempt(): Promise<Ending> {
    if (this.stopCause !== null) return this.stopCause;
    this.transition('preparing');
    if (this.context.unavailable !== null) return infra(`this agent cannot run checks: ${this.context.unavailable}`);
    const work = this.context.spool.workDir(this.assign.leaseId);
    const checkout = join(work, 'source');
    const hostHome = join(work, 'home');
    const hostTmp = join(work, 'tmp');
    await Promise.all([checkout, hostHome, hostTmp].map((d) => mkdir(d, { mode: 0o700 })));
    const linux = PLATFORM === 'linux';
    const dirs: ShellDirs = linux ? { home: SANDBOX_HOME, tmp: '/tmp' } : { home: hostHome, tmp: hostTmp };

    try {
      await fetchSource(this.check.sourceUrl, this.context.token, checkout, this.abort.signal);
    } catch (err) {
      return this.stopCause ?? infra(message(err));
    }
    if (this.stopCause !== null) return this.stopCause;
    let readOnly: string[];
    try {
      readOnly = await readOnlyPaths(checkout, this.check.roBind);
    } catch (err) {
      return { outcome: Outcome.OUTCOME_FAILED, error: message(err) };
    }
    let shell: CheckShell;
    try {
      shell = this.assign.drvPath === '' ? hostShell(dirs) : await this.derivationShell(dirs);
    } catch (err) {
      return this.stopCause ?? infra(`cannot make the check's shell: ${message(err)}`);
    }
    if (this.stopCause !== null) return this.stopCause;

    const inside = linux ? SANDBOX_SOURCE : checkout;
    const mounts: SandboxMount[] = [
      { source: checkout, target: inside, writable: true },
      { source: hostHome, target: dirs.home, writable: true },
      ...(linux ? [] : [{ source: hostTmp, writable: true }]),
      ...readOnly.map((p) => ({ source: join(checkout, p), target: join(inside, p) })),
    ];
    const limits = await CheckLimits.make(this.context.cgroups ?? null, this.assign.leaseId, this.logger);
    this.limits = limits;
    const command = sandboxCommand(shell.bash, ['-c', CLOSE_INHERITED_FDS + shell.prelude + this.check.command], {
      mounts,
      network: this.check.allowNetwork,
      env: shell.env,
      cwd: inside,
      newSession: false,
      cgroupProcs: limits.procsFiles,
    });
    const network = this.check.allowNetwork ? 'on' : 'off';
    this.output(
      Buffer.from(
        `eka-ci: check '${this.check.name}': bash -c in ${shell.description}, network ${network}\n` +
          `eka-ci: limits: ${limits.description}\n`,
      ),
    );
    if (this.stopCause !== null) return this.stopCause;
    this.transition('running');
    let term: IPty;
    try {
      term = spawnPty(command.file, command.args, {
        name: 'xterm-256color',
        cols: PTY_COLUMNS,
        rows: PTY_ROWS,
        // bubblewrap's own working directory shows in the sandbox (its init's /proc/1/cwd and PWD): not the spool.
        cwd: linux ? '/' : checkout,
        env: command.env,
        // Bytes, not strings: the cap counts bytes, and a character split across reads must reach the log whole.
        encoding: null,
      });
    } catch (err) {
      return infra(`cannot start the sandbox (${command.file}): ${message(err)}`);
    }
    this.term = term;
    return this.supervise(term);
  }

  /** Says in the error and at the end of the log which limits a failed check reached; removes its cgroup. */
  private async releaseLimits(limits: CheckLimits, ending: Ending): Promise<Ending> {
    this.limits = null;
    const notes = await limits.release(this.logger);
    const failed = ending.outcome === Outcome.OUTCOME_FAILED || ending.outcome === Outcome.OUTCOME_TIMED_OUT;
    if (!failed || notes.length === 0) return ending;
    this.output(Buffer.from(notes.map((n) => `\r\neka-ci: ${n}`).join('') + '\r\n'));
    return { ...ending, error: [ending.error, ...notes].filter((e) => e !== '').join('; ') };
  }

  private async derivationShell(dirs: ShellDirs): Promise<CheckShell> {
    const c = this.context;
    const conn = await c.pool.acquire();
    this.conn = conn;
    try {
      const source = { conn, cacheUrl: c.cacheUrl, cachePublicKey: c.cachePublicKey, netrcPath: c.netrcPath };
      return await derivationShell(this.assign, { ...source, spool: c.spool }, dirs);
    } finally {
      this.conn = null;
      c.pool.release(conn);
    }
  }

  /** Streams the command's output and waits for its end, enforcing the timeout. */
  private async supervise(term: IPty): Promise<Ending> {
    // node-pty emits exit only after the terminal's last byte was read (or 200 ms later if reading stays paused:
    // a log spool that far behind loses the tail).
    const exited = new Promise<{ exitCode: number; signal?: number }>((resolve) => term.onExit(resolve));
    term.onData((data) => this.output(data as unknown as Buffer));
    const seconds = this.assign.timeoutSeconds;
    if (seconds > 0) {
      const graceMs = this.context.timeoutGraceMs ?? CHECK_TIMEOUT_GRACE_MS;
      const timeout = { outcome: Outcome.OUTCOME_TIMED_OUT, error: `timed out after ${seconds} s` };
      this.timers.push(setTimeout(() => this.stop(timeout, graceMs), seconds * 1000));
    }
    const { exitCode, signal } = await exited;
    this.clearTimers();
    // Nothing outlives bubblewrap's init. sandbox-exec leaves what the command started in the background.
    if (PLATFORM === 'darwin') signalGroup(term.pid, 'SIGKILL');
    this.term = null;
    if (this.stopCause !== null) return this.stopCause;
    if (signal !== undefined && signal !== 0) {
      return { outcome: Outcome.OUTCOME_FAILED, error: `killed by signal ${signal}` };
    }
    if (exitCode === 0) return { outcome: Outcome.OUTCOME_SUCCEEDED, error: '', exitCode };
    return { outcome: Outcome.OUTCOME_FAILED, error: `exit code ${exitCode}`, exitCode };
  }

  /** Appends to the log up to the cap; past it, the sandbox is killed. Pauses the terminal while the log is behind. */
  private output(data: Buffer): void {
    if (this.capped) return;
    const limit = this.assign.maxLogBytes;
    if (limit > 0 && this.logged + data.length > limit) {
      this.capped = true;
      if (this.logged < limit) this.log.append(data.subarray(0, limit - this.logged));
      this.logged = limit;
      this.stop({ outcome: Outcome.OUTCOME_FAILED, error: `output exceeded check_max_log_bytes (${limit} bytes)` }, 0);
      return;
    }
    this.logged += data.length;
    if (this.log.append(data)) return;
    const term = this.term;
    if (term === null) return;
    term.pause();
    void this.log.writable().then(() => term.resume());
  }

  /** Records why the check stops (the first reason wins) and stops what runs: at once when `graceMs` is 0. */
  private stop(cause: Ending, graceMs: number): void {
    this.stopCause ??= cause;
    if (this.state === 'preparing') {
      this.transition('stopping');
      this.abort.abort();
      this.conn?.kill();
      return;
    }
    if (this.state === 'running') this.transition('stopping');
    if (this.state !== 'stopping' || this.term === null) return;
    const pid = this.term.pid;
    if (graceMs <= 0) {
      this.killSandbox(pid);
      return;
    }
    terminateSandboxed(pid);
    this.timers.push(setTimeout(() => this.killSandbox(pid), graceMs));
  }

  private killSandbox(pid: number): void {
    if (this.term?.pid !== pid) return;
    killSandboxed(pid);
    this.timers.push(
      setTimeout(() => {
        if (this.term?.pid !== pid) return;
        signalGroup(pid, 'SIGKILL');
        this.limits?.kill();
      }, WRAPPER_KILL_AFTER_MS),
    );
  }

  private clearTimers(): void {
    for (const t of this.timers.splice(0)) clearTimeout(t);
  }

  private finish(ending: Ending): JobResult {
    this.transition('done');
    const { outcome, error, exitCode } = ending;
    this.logger.info({ leaseId: this.assign.leaseId, outcome: Outcome[outcome], error, exitCode }, 'check finished');
    return {
      outcome,
      error: error.slice(0, ERROR_TEXT_MAX_CHARS),
      outputs: [],
      finishedAtMs: Date.now(),
      ...(exitCode === undefined ? {} : { exitCode }),
    };
  }

  private transition(to: CheckState): void {
    if (!TRANSITIONS[this.state].includes(to)) {
      throw new IllegalStateError(`check of lease ${this.assign.leaseId}: illegal transition ${this.state} → ${to}`);
    }
    this.state = to;
  }
}

function infra(error: string): Ending {
  return { outcome: Outcome.OUTCOME_INFRA_ERROR, error };
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
