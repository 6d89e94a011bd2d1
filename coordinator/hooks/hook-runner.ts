import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StringDecoder } from 'node:string_decoder';
import { descendantGroups, signalGroup } from '../../common/process-tree.js';
import { Redactor } from '../../common/redaction.js';
import type { LogStore } from '../logs/log-store.js';

/**
 * One hook process: started in a session (and process group) of its own, with exactly the environment it is given,
 * stdout and stderr stored together in one log (credential values replaced, capped), killed at its timeout — SIGTERM
 * to its group and to the groups its descendants made, SIGKILL after a grace — and whatever it left running killed
 * when it exits, so that nothing a hook started outlives its run.
 */

/** PATH of every hook: the system's programs on NixOS, in Nix's default profile and on other Unixes; nothing else. */
export const HOOK_PATH = '/run/current-system/sw/bin:/nix/var/nix/profiles/default/bin:/usr/local/bin:/usr/bin:/bin';
// Output kept per run: a hook's output says what it did or why it failed; a few MiB is more than anyone reads.
export const HOOK_MAX_LOG_BYTES = 4 * 1024 ** 2;
// A hook told to stop (SIGTERM) gets this long to clean up before its group is killed.
export const HOOK_KILL_GRACE_MS = 10_000;
// After the hook exits, a process it detached into a session of its own may still hold the output pipes open: its
// output is read this long more, then the pipes are closed so the run can end.
const OUTPUT_DRAIN_MS = 2_000;

export type HookOutcome = 'exited' | 'timed-out' | 'stopped' | 'spawn-error';

export interface HookProcessResult {
  outcome: HookOutcome;
  exitCode: number | null;
  signal: string | null;
  /** Why it could not start (`spawn-error`). */
  error: string | undefined;
  logBytes: number;
  truncated: boolean;
}

export interface HookProcessOptions {
  argv: readonly string[];
  /** The whole environment: nothing of the coordinator's own is added. */
  env: Readonly<Record<string, string>>;
  timeoutMs: number;
  killGraceMs?: number;
  logs: LogStore;
  logPath: string;
  maxLogBytes?: number;
  /** Values to replace with `[redacted]` in the stored output (the run's credentials). */
  secrets?: readonly string[];
}

/** Lifecycle: running (from construction) → ended (`done` resolves); `stop` and the timeout end it early. */
export class HookProcess {
  readonly done: Promise<HookProcessResult>;
  private child: ChildProcess | undefined;
  private pgid: number | undefined;
  private outcome: HookOutcome = 'exited';
  private exited = false;
  private readonly timers: NodeJS.Timeout[] = [];
  private readonly killGraceMs: number;

  constructor(private readonly o: HookProcessOptions) {
    this.killGraceMs = o.killGraceMs ?? HOOK_KILL_GRACE_MS;
    this.done = this.run();
  }

  /** Ends the run early: SIGTERM then SIGKILL after the grace (`graceful`), or SIGKILL now. */
  stop(graceful: boolean): void {
    if (this.exited || this.outcome !== 'exited') return;
    this.outcome = 'stopped';
    if (graceful) this.terminate();
    else this.signalAll('SIGKILL');
  }

  private async run(): Promise<HookProcessResult> {
    const { logs, logPath } = this.o;
    const cwd = mkdtempSync(join(tmpdir(), 'ekaci-hook-'));
    const sink = new OutputSink(logs, logPath, this.o.maxLogBytes ?? HOOK_MAX_LOG_BYTES, this.o.secrets ?? []);
    try {
      const child = spawn(this.o.argv[0]!, this.o.argv.slice(1), {
        cwd,
        env: { ...this.o.env },
        detached: true,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      this.child = child;
      const started = await new Promise<{ error?: Error }>((resolve) => {
        child.once('spawn', () => resolve({}));
        child.once('error', (error) => resolve({ error }));
      });
      if (started.error) {
        return { ...sink.finish(), outcome: 'spawn-error', exitCode: null, signal: null, error: spawnError(started) };
      }
      const pgid = child.pid!;
      this.pgid = pgid;
      if (this.outcome === 'stopped') this.signalAll('SIGKILL');
      child.stdout.on('data', (b: Buffer) => sink.write(b));
      child.stderr.on('data', (b: Buffer) => sink.write(b));
      this.timers.push(
        setTimeout(() => {
          if (this.outcome !== 'exited') return;
          this.outcome = 'timed-out';
          this.terminate();
        }, this.o.timeoutMs),
      );
      const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));
      const [exitCode, signal] = await new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
        child.once('exit', (code, sig) => resolve([code, sig])),
      );
      this.exited = true;
      // What it left behind in its group goes with it.
      signalGroup(pgid, 'SIGKILL');
      let drain: NodeJS.Timeout | undefined;
      await Promise.race([
        closed,
        new Promise<void>((resolve) => {
          drain = setTimeout(resolve, OUTPUT_DRAIN_MS);
        }),
      ]);
      clearTimeout(drain);
      child.stdout.destroy();
      child.stderr.destroy();
      return { ...sink.finish(), outcome: this.outcome, exitCode, signal, error: undefined };
    } finally {
      for (const t of this.timers) clearTimeout(t);
      logs.close(logPath);
      rmSync(cwd, { recursive: true, force: true });
    }
  }

  private terminate(): void {
    this.signalAll('SIGTERM');
    this.timers.push(setTimeout(() => this.signalAll('SIGKILL'), this.killGraceMs));
  }

  /** Its group and the groups its descendants started (a `setsid` child would escape a signal to the group). */
  private signalAll(signal: NodeJS.Signals): void {
    if (this.pgid === undefined) return;
    const groups = this.exited ? [] : descendantGroups(this.pgid);
    for (const g of [this.pgid, ...groups]) signalGroup(g, signal);
  }
}

function spawnError(started: { error?: Error }): string {
  const e = started.error as NodeJS.ErrnoException;
  return e.code === 'ENOENT'
    ? `${e.path ?? 'the program'} not found (hooks run with PATH=${HOOK_PATH})`
    : `cannot start ${e.path ?? 'the program'}: ${e.code ?? e.message}`;
}

/**
 * Output into the run's log: decoded as UTF-8 across chunk boundaries, credential values replaced (a value split
 * between two chunks too: the last few characters wait for the next chunk), at most `limit` bytes stored.
 */
class OutputSink {
  private readonly decoder = new StringDecoder('utf8');
  private readonly redactor: Redactor;
  private readonly hold: number;
  private pending = '';
  private size = 0;
  private truncated = false;

  constructor(
    private readonly logs: LogStore,
    private readonly path: string,
    private readonly limit: number,
    secrets: readonly string[],
  ) {
    this.redactor = new Redactor(secrets);
    this.hold = Math.max(0, this.redactor.longest - 1);
    this.size = logs.storedBytes(path);
  }

  write(chunk: Buffer): void {
    this.pending += this.decoder.write(chunk);
    this.flush(false);
  }

  finish(): { logBytes: number; truncated: boolean } {
    this.pending += this.decoder.end();
    this.flush(true);
    return { logBytes: this.size, truncated: this.truncated };
  }

  private flush(all: boolean): void {
    const text = this.redactor.apply(this.pending);
    // The end may be the start of a value whose rest is still to come.
    let keep = all ? 0 : Math.min(this.hold, text.length);
    // Never between the two halves of a surrogate pair.
    if (keep > 0 && keep < text.length && /[\udc00-\udfff]/.test(text[text.length - keep]!)) keep++;
    this.pending = text.slice(text.length - keep);
    const out = Buffer.from(text.slice(0, text.length - keep), 'utf8');
    if (out.length === 0) return;
    const before = this.size;
    this.size = this.logs.append(this.path, before, out, this.limit);
    if (this.size - before < out.length) this.truncated = true;
  }
}
