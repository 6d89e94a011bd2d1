import { randomBytes } from 'node:crypto';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Counter, type Registry } from 'prom-client';
import type { Logger } from '../common/logging.js';

/**
 * Faults the coordinator survives, in one place: a failed stream message, request or disk write is logged with its
 * context and counted (`ekaci_faults_total{where,kind}`), and the coordinator goes on. A full disk under the data
 * directory pauses new work — `/readyz` answers 503 naming it — until a probe write succeeds again, checked every
 * few seconds; nothing already recorded is touched meanwhile.
 */

// How often a paused coordinator tries its probe write.
const DISK_PROBE_INTERVAL_MS = 2_000;
// What the probe writes: enough that the next few log chunks and SQLite pages fit when it succeeds.
const DISK_PROBE_BYTES = 1024 * 1024;

export type FaultKind = 'disk-full' | 'illegal-transition' | 'error';

export class Health {
  private diskFull: { since: number; detail: string } | undefined;
  private probeTimer: NodeJS.Timeout | undefined;
  private readonly faults = new Counter({
    name: 'ekaci_faults_total',
    help: 'Errors the coordinator survived, by where they happened and their kind',
    labelNames: ['where', 'kind'],
    registers: [],
  });
  private readonly resumeListeners: Array<() => void> = [];

  constructor(
    private readonly dataDir: string,
    private readonly logger: Logger,
    private readonly probeIntervalMs = DISK_PROBE_INTERVAL_MS,
  ) {}

  register(registry: Registry): void {
    registry.registerMetric(this.faults);
  }

  /** Whether new work may start: false while the data directory's disk is full. */
  get accepting(): boolean {
    return this.diskFull === undefined;
  }

  /** Why the coordinator is not ready, or undefined. */
  get reason(): string | undefined {
    if (!this.diskFull) return undefined;
    return `the data directory's disk is full (${this.diskFull.detail}); new work is paused until space is freed`;
  }

  /** Called when a paused coordinator takes work again. */
  onResume(listener: () => void): void {
    this.resumeListeners.push(listener);
  }

  /** How many faults of a kind were counted at `where` (for tests and the status page). */
  async count(where: string, kind: FaultKind): Promise<number> {
    const metric = await this.faults.get();
    return metric.values.find((v) => v.labels.where === where && v.labels.kind === kind)?.value ?? 0;
  }

  /** Logs and counts an error that a handler survived; a full disk also pauses new work. */
  fault(where: string, err: unknown, context: Record<string, unknown> = {}): void {
    const kind: FaultKind = isDiskFull(err) ? 'disk-full' : 'error';
    this.faults.inc({ where, kind });
    const message = err instanceof Error ? err.message : String(err);
    this.logger.error({ where, kind, err: message, ...context }, `${where} failed: ${message}`);
    if (kind === 'disk-full') this.pauseForDisk(message);
  }

  /** Counts a state transition refused as illegal (already logged by the caller with its context). */
  illegalTransition(): void {
    this.faults.inc({ where: 'transition', kind: 'illegal-transition' });
  }

  stop(): void {
    clearTimeout(this.probeTimer);
    this.probeTimer = undefined;
  }

  private pauseForDisk(detail: string): void {
    if (this.diskFull) return;
    this.diskFull = { since: Date.now(), detail };
    this.logger.error({ dataDir: this.dataDir }, `${this.reason}`);
    const probe = (): void => {
      if (this.probeWrite()) {
        this.diskFull = undefined;
        this.probeTimer = undefined;
        this.logger.info({ dataDir: this.dataDir }, 'space in the data directory again: taking new work');
        for (const l of this.resumeListeners) l();
        return;
      }
      this.probeTimer = setTimeout(probe, this.probeIntervalMs);
      this.probeTimer.unref();
    };
    this.probeTimer = setTimeout(probe, this.probeIntervalMs);
    this.probeTimer.unref();
  }

  private probeWrite(): boolean {
    const file = join(this.dataDir, `.space-probe-${randomBytes(4).toString('hex')}`);
    try {
      writeFileSync(file, Buffer.alloc(DISK_PROBE_BYTES));
      return true;
    } catch {
      return false;
    } finally {
      rmSync(file, { force: true });
    }
  }
}

/** ENOSPC from a file write, SQLITE_FULL from the database. */
export function isDiskFull(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const code = (err as { code?: unknown }).code;
  return code === 'ENOSPC' || code === 'SQLITE_FULL' || code === 'EDQUOT';
}
