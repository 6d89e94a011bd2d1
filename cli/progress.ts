import { isTerminal } from '../coordinator/scheduler/build-state.js';
import type { BuildManager } from '../coordinator/scheduler/build-manager.js';
import type { BuildStore } from '../coordinator/scheduler/build-store.js';
import { storePathName } from '../common/nix/store-path.js';
import { type RunEta, etaDetail, etaShort } from '../coordinator/scheduler/eta.js';

// Redraws this often on a terminal: smooth enough for elapsed-time counters, cheap on the event loop.
const REDRAW_MS = 250;
// Without a terminal a status line is written this often, so a CI log shows progress without flooding.
const PLAIN_STATUS_MS = 15_000;
// Running builds listed by name on a terminal; the rest are counted.
const MAX_RUNNING_SHOWN = 8;

const SUCCEEDED = new Set(['succeeded', 'substituted']);

/**
 * What `ekaci review` shows while it works: the phase (evaluating, building), the build queue, running builds
 * with their names, agents and elapsed time, and counts of done and failed derivations. On a terminal the block
 * is redrawn in place; otherwise plain lines are written (each failure at once, a status line now and then).
 */
export class Progress {
  private block = 0;
  private timer: NodeJS.Timeout | undefined;
  private watching: { manager: BuildManager; store: BuildStore; off: () => void } | undefined;
  private done = 0;
  private failed = 0;
  private buildStarted = 0;
  private lastPlain = 0;
  private evaluation: { label: string; attrs: number; errors: number; started: number } | undefined;

  constructor(
    private readonly out: NodeJS.WriteStream,
    private readonly tty = out.isTTY === true,
  ) {}

  /** A line that stays (a phase starting or ending). */
  line(text: string): void {
    this.clear();
    this.out.write(`${text}\n`);
    this.draw();
  }

  /**
   * Counts an evaluation's attributes as they arrive (a package set's evaluation takes minutes: the count shows it
   * moving), until `end`.
   */
  evaluating(label: string): { attr(error: boolean): void; end(): void } {
    const e = { label, attrs: 0, errors: 0, started: Date.now() };
    this.evaluation = e;
    this.lastPlain = e.started;
    this.startTimer();
    this.draw();
    return {
      attr: (error) => {
        e.attrs++;
        if (error) e.errors++;
      },
      end: () => {
        this.clear();
        this.evaluation = undefined;
        if (!this.watching) this.stopTimer();
      },
    };
  }

  /** Follows the builds of `manager` until `stop()`. */
  watch(manager: BuildManager, store: BuildStore): void {
    const onSettled = (drvPath: string): void => {
      const row = store.derivation(drvPath);
      if (!row || !isTerminal(row.state)) return;
      if (SUCCEEDED.has(row.state)) this.done++;
      else {
        this.failed++;
        this.line(`  ${row.state.padEnd(17)} ${storePathName(drvPath)}`);
      }
    };
    manager.on('settled', onSettled);
    this.watching = { manager, store, off: () => manager.off('settled', onSettled) };
    this.buildStarted = Date.now();
    this.lastPlain = this.buildStarted;
    this.startTimer();
    this.draw();
  }

  stop(): void {
    this.stopTimer();
    this.clear();
    if (this.watching) {
      this.out.write(`${this.status()}\n`);
      this.watching.off();
      this.watching = undefined;
    }
  }

  private startTimer(): void {
    if (this.timer) return;
    this.timer = setInterval(() => this.tick(), REDRAW_MS);
    this.timer.unref();
  }

  private stopTimer(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
  }

  private tick(): void {
    if (this.tty) {
      this.clear();
      this.draw();
    } else if (Date.now() - this.lastPlain >= PLAIN_STATUS_MS) {
      this.lastPlain = Date.now();
      this.out.write(`${this.status()}\n`);
    }
  }

  private status(): string {
    const e = this.evaluation;
    if (e)
      return `  ${e.label}: ${e.attrs} attributes, ${e.errors} evaluation errors (${clock(Date.now() - e.started)})`;
    const running = this.watching?.store.openAttempts().length ?? 0;
    const queued = this.watching?.manager.pendingCount ?? 0;
    const eta = queued + running > 0 ? this.eta() : null;
    return `builds: ${queued} queued, ${running} running, ${this.done} done, ${this.failed} failed (${clock(Date.now() - this.buildStarted)})${eta ? `, ${etaShort(eta)}` : ''}`;
  }

  /**
   * The ETA of every unfinished build (the embedded system builds this command's and nothing else), from recorded
   * durations of the same packages; computed at most every few seconds, however often the block is redrawn.
   */
  private eta(): RunEta | null {
    const w = this.watching;
    return w ? w.manager.etas.of('ekaci-progress', () => w.manager.activeDerivations()) : null;
  }

  private draw(): void {
    if (!this.tty || (!this.watching && !this.evaluation)) return;
    const running = this.evaluation ? [] : (this.watching?.store.openAttempts() ?? []);
    const now = Date.now();
    const lines = [this.status()];
    const eta = this.evaluation || (this.watching?.manager.pendingCount ?? 0) === 0 ? null : this.eta();
    if (eta) lines.push(`  ${etaDetail(eta)}`);
    for (const a of running.slice(0, MAX_RUNNING_SHOWN)) {
      const since = a.started_at ?? a.assigned_at;
      lines.push(`  ▸ ${storePathName(a.drv_path)}  ${clock(now - since)}  on ${a.agent_id}`);
    }
    if (running.length > MAX_RUNNING_SHOWN) lines.push(`  … and ${running.length - MAX_RUNNING_SHOWN} more`);
    // Lines longer than the terminal wrap and would break the redraw: cut them to its width.
    const width = this.out.columns > 0 ? this.out.columns : 120;
    this.out.write(`${lines.map((l) => (l.length > width ? `${l.slice(0, width - 1)}…` : l)).join('\n')}\n`);
    this.block = lines.length;
  }

  private clear(): void {
    if (!this.tty || this.block === 0) return;
    // Up to the first line of the block, then erase to the end of the screen.
    this.out.write(`\x1b[${this.block}F\x1b[J`);
    this.block = 0;
  }
}

function clock(ms: number): string {
  const s = Math.max(0, Math.floor(ms / 1000));
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
}
