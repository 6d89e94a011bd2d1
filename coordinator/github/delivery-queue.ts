import { MalformedPayloadError, recordedError } from './errors.js';
import { jitter } from '../../common/backoff.js';
import { IllegalStateError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { Db } from '../db/database.js';

/**
 * GitHub webhook deliveries, stored in `webhook_deliveries` before the receiver answers, then handed to a handler.
 *
 * A delivery is `pending` → `processing` (a handler runs; `attempts` counts the runs) → `done`, or back to `pending`
 * with a time for its next run (`next_attempt_at`, exponential backoff: the retries of a delivery span hours, so that
 * an outage of GitHub's API or of the coordinator's disk loses no event), or `failed` once `maxAttempts` runs have
 * thrown. The schedule is in the database: a restart keeps it, and a delivery waiting for its retry holds no
 * handler slot. A delivery found `processing` when the queue starts was cut off by a restart: it is run again, and
 * counts as an attempt, so a delivery that crashes the coordinator every time still ends `failed` instead of
 * crashing it forever. Handlers must therefore tolerate running a delivery twice.
 *
 * A delivery id seen before is a duplicate (a replay), unless that delivery ended `failed` and the same body comes
 * again: that is GitHub's manual redelivery (it keeps the id), and the delivery is run again from its first attempt.
 *
 * Deliveries start in arrival order when due, at most `concurrency` at a time; they may finish out of order.
 *
 * Queue lifecycle: `created` → `running` (start) → `stopping` (stopGracefully: no new runs, waits for running
 * handlers) → `stopped`; stopNow goes to `stopped` from anywhere at once, abandoning running handlers, whose rows
 * stay `processing` for the next start. A stopped queue is not restarted: make a new one.
 */
export type DeliveryQueueState = 'created' | 'running' | 'stopping' | 'stopped';

const TRANSITIONS: Record<DeliveryQueueState, readonly DeliveryQueueState[]> = {
  created: ['running', 'stopped'],
  running: ['stopping', 'stopped'],
  stopping: ['stopped'],
  stopped: [],
};

export type DeliveryState = 'pending' | 'processing' | 'done' | 'failed';

/** What the receiver hands over: a verified JSON body and what GitHub's headers and the body say about it. */
export interface IncomingDelivery {
  deliveryId: string;
  event: string;
  action: string | undefined;
  /** The body exactly as received (the receiver has checked it is a JSON object). */
  body: string;
  /** The address it came from, for the record. */
  source: string;
}

export interface Delivery {
  deliveryId: string;
  event: string;
  /** The payload's `action`, for events that have one. */
  action: string | undefined;
  payload: unknown;
  /** 1 on the first run. */
  attempt: number;
  /** Aborted by stopNow: the handler should give up; its delivery will be run again on the next start. */
  signal: AbortSignal;
}

export type DeliveryHandler = (delivery: Delivery) => Promise<void>;

/** For metrics: one `started` per handler run, one `finished` per run's outcome. */
export type DeliveryObservation =
  | { kind: 'started'; event: string; action: string | undefined; attempt: number; waitedMs: number }
  | { kind: 'finished'; event: string; action: string | undefined; outcome: 'done' | 'retry' | 'failed'; ms: number };

// Handlers mostly call GitHub's API, which asks integrators to avoid concurrent requests (secondary rate limits):
// a few in parallel hide network latency without provoking it, and keep processing close to arrival order.
export const DELIVERY_CONCURRENCY = 4;
// Retries wait 1 s, 2 s, 4 s, … up to an hour (±25 %): 16 runs span about four hours (3 to 5), long enough for an
// outage of GitHub's API or a full disk to be mended; a handler failing that long is failing on the delivery.
export const DELIVERY_MAX_ATTEMPTS = 16;
export const DELIVERY_RETRY_BASE_MS = 1_000;
export const DELIVERY_RETRY_CAP_MS = 3_600_000;
// GitHub keeps deliveries for redelivery three days; remembering ids a week keeps replays refused throughout.
export const DELIVERY_RETENTION_MS = 7 * 24 * 3_600_000;
const PRUNE_INTERVAL_MS = 3_600_000;

export interface DeliveryQueueOptions {
  logger: Logger;
  concurrency?: number;
  maxAttempts?: number;
  /** Retry delays; tests shrink them. */
  retryBaseMs?: number;
  retryCapMs?: number;
  observe?: (o: DeliveryObservation) => void;
}

/** The wait after a delivery's `attempt`-th run failed: doubling from `baseMs` up to `capMs`, ±25 %. */
export function deliveryRetryDelay(
  attempt: number,
  baseMs = DELIVERY_RETRY_BASE_MS,
  capMs = DELIVERY_RETRY_CAP_MS,
  random: () => number = Math.random,
): number {
  return jitter(Math.min(capMs, baseMs * 2 ** Math.min(attempt - 1, 40)), 0.25, random);
}

interface Row {
  delivery_id: string;
  event: string;
  action: string | null;
  payload: string;
  received_at: number;
  attempts: number;
}

export class DeliveryQueue {
  private current: DeliveryQueueState = 'created';
  private handler: DeliveryHandler | undefined;
  private readonly running = new Map<string, Promise<void>>();
  private readonly abort = new AbortController();
  private retryTimer: NodeJS.Timeout | undefined;
  private pruneTimer: NodeJS.Timeout | undefined;
  private readonly concurrency: number;
  private readonly maxAttempts: number;

  constructor(
    private readonly db: Db,
    private readonly options: DeliveryQueueOptions,
  ) {
    this.concurrency = options.concurrency ?? DELIVERY_CONCURRENCY;
    this.maxAttempts = options.maxAttempts ?? DELIVERY_MAX_ATTEMPTS;
  }

  get state(): DeliveryQueueState {
    return this.current;
  }

  /**
   * Stores a delivery (in any state: a stopped queue's deliveries wait for the next start). `redelivered` when a
   * delivery with this id and body ended `failed` and is queued again; `duplicate` when this id was stored before
   * otherwise.
   */
  enqueue(d: IncomingDelivery, receivedAt = Date.now()): 'queued' | 'redelivered' | 'duplicate' {
    const before = this.db.prepare('SELECT state FROM webhook_deliveries WHERE delivery_id = ?').get(d.deliveryId) as
      { state: DeliveryState } | undefined;
    const stored = this.db
      .prepare(
        `INSERT INTO webhook_deliveries (delivery_id, event, action, payload, source, received_at, state)
         VALUES (?, ?, ?, ?, ?, ?, 'pending')
         ON CONFLICT (delivery_id) DO UPDATE SET
           state = 'pending', attempts = 0, next_attempt_at = 0, last_error = NULL, finished_at = NULL,
           source = excluded.source, received_at = excluded.received_at
         WHERE webhook_deliveries.state = 'failed' AND webhook_deliveries.payload = excluded.payload`,
      )
      .run(d.deliveryId, d.event, d.action ?? null, d.body, d.source, receivedAt);
    if (stored.changes === 0) return 'duplicate';
    this.notify();
    return before === undefined ? 'queued' : 'redelivered';
  }

  /** Looks for pending deliveries now (after rows were inserted by other means). */
  notify(): void {
    if (this.current === 'running') this.pump();
  }

  start(handler: DeliveryHandler): void {
    this.transition('running');
    this.handler = handler;
    // Rows left `processing` were cut off by a restart.
    this.db.prepare("UPDATE webhook_deliveries SET state = 'pending' WHERE state = 'processing'").run();
    this.prune();
    this.schedulePrune();
    this.pump();
  }

  /** Starts no more handlers and resolves once running handlers have returned; scheduled retries stay stored. */
  async stopGracefully(): Promise<void> {
    if (this.current === 'stopped') return;
    if (this.current === 'created') return this.stopNow();
    this.transition('stopping');
    clearTimeout(this.pruneTimer);
    clearTimeout(this.retryTimer);
    while (this.running.size > 0 && this.current === 'stopping') await Promise.race(this.running.values());
    if (this.current === 'stopping') this.transition('stopped');
  }

  /** Stops at once. Running handlers are told (their signal aborts) but not waited for, and their rows are left. */
  stopNow(): void {
    if (this.current === 'stopped') return;
    this.transition('stopped');
    clearTimeout(this.pruneTimer);
    clearTimeout(this.retryTimer);
    this.abort.abort();
  }

  /** Counts by state, for metrics and tests. */
  counts(): Record<DeliveryState, number> {
    const counts: Record<DeliveryState, number> = { pending: 0, processing: 0, done: 0, failed: 0 };
    const rows = this.db.prepare('SELECT state, COUNT(*) AS n FROM webhook_deliveries GROUP BY state').all() as Array<{
      state: DeliveryState;
      n: number;
    }>;
    for (const r of rows) counts[r.state] = r.n;
    return counts;
  }

  private pump(): void {
    while (this.current === 'running' && this.running.size < this.concurrency) {
      const busy = [...this.running.keys()];
      const row = this.db
        .prepare(
          `SELECT delivery_id, event, action, payload, received_at, attempts FROM webhook_deliveries
           WHERE state = 'pending' AND next_attempt_at <= ? AND delivery_id NOT IN (SELECT value FROM json_each(?))
           ORDER BY rowid LIMIT 1`,
        )
        .get(Date.now(), JSON.stringify(busy)) as Row | undefined;
      if (!row) {
        this.wakeForNextRetry();
        return;
      }
      const id = row.delivery_id;
      const run = this.run(row).then(
        () => {
          this.running.delete(id);
          this.pump();
        },
        (err: unknown) => {
          // Only the bookkeeping lands here (run catches the handler's errors): the database was closed under a
          // stopped queue, or failed. The row keeps its state; looking again at once would only fail again.
          this.running.delete(id);
          if (this.current === 'stopped') return;
          this.options.logger.error({ err, deliveryId: id }, 'could not record a webhook delivery; will look again');
          setTimeout(() => this.notify(), this.options.retryBaseMs ?? DELIVERY_RETRY_BASE_MS);
        },
      );
      this.running.set(id, run);
    }
  }

  /** Runs a delivery once: it ends done or failed, is scheduled for a retry, or is left as it is by a stop. */
  private async run(row: Row): Promise<void> {
    const action = row.action ?? undefined;
    if (row.attempts >= this.maxAttempts) {
      this.finish(row, 'failed', 'its last attempt was cut off by a restart');
      return;
    }
    const attempt = row.attempts + 1;
    this.db
      .prepare("UPDATE webhook_deliveries SET state = 'processing', attempts = ? WHERE delivery_id = ?")
      .run(attempt, row.delivery_id);
    let payload: unknown;
    try {
      // Parsed for every run, so a handler that changes its payload cannot change the next run's.
      payload = JSON.parse(row.payload);
    } catch {
      this.finish(row, 'failed', 'the stored payload is not JSON');
      return;
    }
    const started = Date.now();
    const base = { event: row.event, action };
    this.options.observe?.({ kind: 'started', ...base, attempt, waitedMs: started - row.received_at });
    try {
      await this.handler!({ ...base, deliveryId: row.delivery_id, payload, attempt, signal: this.abort.signal });
    } catch (err) {
      if (this.current === 'stopped') return;
      const message = recordedError(err);
      // A malformed payload fails the same way every time: no point in retrying it.
      const permanent = err instanceof MalformedPayloadError;
      const outcome = permanent || attempt >= this.maxAttempts ? 'failed' : 'retry';
      this.options.observe?.({ kind: 'finished', ...base, outcome, ms: Date.now() - started });
      if (outcome === 'failed') {
        this.options.logger.warn(
          { deliveryId: row.delivery_id, event: row.event, attempt, err: message },
          'webhook delivery failed',
        );
        this.finish(row, 'failed', message);
        return;
      }
      const delayMs = deliveryRetryDelay(
        attempt,
        this.options.retryBaseMs ?? DELIVERY_RETRY_BASE_MS,
        this.options.retryCapMs ?? DELIVERY_RETRY_CAP_MS,
      );
      this.options.logger.warn(
        { deliveryId: row.delivery_id, event: row.event, attempt, err: message, retryInMs: delayMs },
        'webhook delivery failed; will retry',
      );
      this.db
        .prepare(
          "UPDATE webhook_deliveries SET state = 'pending', last_error = ?, next_attempt_at = ? WHERE delivery_id = ?",
        )
        .run(message, Date.now() + delayMs, row.delivery_id);
      return;
    }
    if (this.current === 'stopped') return;
    this.options.observe?.({ kind: 'finished', ...base, outcome: 'done', ms: Date.now() - started });
    this.finish(row, 'done', null);
  }

  /** Sets a timer for the earliest scheduled retry, if any. */
  private wakeForNextRetry(): void {
    clearTimeout(this.retryTimer);
    if (this.current !== 'running') return;
    const next = this.db
      .prepare("SELECT MIN(next_attempt_at) AS at FROM webhook_deliveries WHERE state = 'pending'")
      .get() as { at: number | null };
    if (next.at === null) return;
    // setTimeout's longest wait is about 24.8 days; a later retry is looked at again then.
    const wait = Math.min(Math.max(0, next.at - Date.now()), 2 ** 31 - 1);
    this.retryTimer = setTimeout(() => this.notify(), wait);
  }

  private finish(row: Row, state: 'done' | 'failed', error: string | null): void {
    this.db
      .prepare('UPDATE webhook_deliveries SET state = ?, last_error = ?, finished_at = ? WHERE delivery_id = ?')
      .run(state, error, Date.now(), row.delivery_id);
  }

  private prune(): void {
    this.db
      .prepare("DELETE FROM webhook_deliveries WHERE state IN ('done', 'failed') AND finished_at < ?")
      .run(Date.now() - DELIVERY_RETENTION_MS);
  }

  private schedulePrune(): void {
    this.pruneTimer = setTimeout(() => {
      if (this.current !== 'running') return;
      this.prune();
      this.schedulePrune();
    }, jitter(PRUNE_INTERVAL_MS));
    // Pruning is housekeeping: it must not keep a process alive that has nothing else to do.
    this.pruneTimer.unref();
  }

  private transition(to: DeliveryQueueState): void {
    if (!TRANSITIONS[this.current].includes(to)) {
      throw new IllegalStateError(`webhook delivery queue cannot go from ${this.current} to ${to}`);
    }
    this.current = to;
  }
}
