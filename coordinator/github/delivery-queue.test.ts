import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { sleep } from '../../common/backoff.js';
import { IllegalStateError } from '../../common/errors.js';
import { silentLogger } from '../../common/logging.js';
import { openDatabase, type Db } from '../db/database.js';
import { MalformedPayloadError } from './errors.js';
import {
  DELIVERY_MAX_ATTEMPTS,
  DeliveryQueue,
  deliveryRetryDelay,
  type Delivery,
  type DeliveryObservation,
  type DeliveryQueueOptions,
  type IncomingDelivery,
} from './delivery-queue.js';

let dir: string;
let dbFile: string;
let db: Db;
const queues: DeliveryQueue[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-deliveries-'));
  dbFile = join(dir, 'ekaci.sqlite');
  db = openDatabase(dbFile);
});
afterEach(async () => {
  for (const q of queues.splice(0)) q.stopNow();
  if (db.open) db.close();
  await rm(dir, { recursive: true, force: true });
});

function queue(options: Partial<DeliveryQueueOptions> = {}, on: Db = db): DeliveryQueue {
  // Retries are made fast by shrinking the backoff, not by skipping it.
  const q = new DeliveryQueue(on, { logger: silentLogger(), retryBaseMs: 2, retryCapMs: 4, ...options });
  queues.push(q);
  return q;
}

function delivery(n: number, event = 'pull_request', action: string | undefined = 'opened'): IncomingDelivery {
  return {
    deliveryId: `delivery-${n}`,
    event,
    action,
    body: JSON.stringify({ action, number: n }),
    source: '127.0.0.1',
  };
}

/** Polls until `predicate` holds; the test runner's timeout is the only limit. */
async function until(predicate: () => boolean): Promise<void> {
  while (!predicate()) await sleep(2);
}

function row(id: string): { state: string; attempts: number; last_error: string | null; finished_at: number | null } {
  return db
    .prepare('SELECT state, attempts, last_error, finished_at FROM webhook_deliveries WHERE delivery_id = ?')
    .get(id) as { state: string; attempts: number; last_error: string | null; finished_at: number | null };
}

/** A handler that records what it is handed. */
function recordInto<T>(list: T[], pick: (d: Delivery) => T): (d: Delivery) => Promise<void> {
  return (d) => {
    list.push(pick(d));
    return Promise.resolve();
  };
}

class Gate {
  private open!: () => void;
  readonly opened = new Promise<void>((resolve) => (this.open = resolve));
  release(): void {
    this.open();
  }
}

describe('webhook delivery queue', () => {
  it('hands deliveries to the handler in arrival order, with their event, action and payload, and marks them done', async () => {
    const q = queue({ concurrency: 1 });
    for (const n of [3, 1, 2]) q.enqueue(delivery(n));
    const seen: Delivery[] = [];
    q.start(recordInto(seen, (d) => d));
    await until(() => seen.length === 3);
    expect(seen.map((d) => d.deliveryId)).toEqual(['delivery-3', 'delivery-1', 'delivery-2']);
    expect(seen[0]).toMatchObject({ event: 'pull_request', action: 'opened', payload: { number: 3 }, attempt: 1 });
    await until(() => q.counts().done === 3);
    expect(row('delivery-1')).toMatchObject({ state: 'done', attempts: 1, last_error: null });
  });

  it('hands over deliveries enqueued while it runs', async () => {
    const q = queue();
    const seen: string[] = [];
    q.start(recordInto(seen, (d) => d.deliveryId));
    q.enqueue(delivery(1, 'push', undefined));
    await until(() => seen.length === 1);
    expect(row('delivery-1').state).not.toBe('pending');
  });

  it('runs at most `concurrency` handlers at once', async () => {
    const q = queue({ concurrency: 2 });
    for (let n = 0; n < 6; n++) q.enqueue(delivery(n));
    let running = 0;
    let most = 0;
    let finished = 0;
    q.start(async () => {
      most = Math.max(most, ++running);
      await sleep(5);
      running--;
      finished++;
    });
    await until(() => finished === 6);
    expect(most).toBe(2);
  });

  it('refuses a delivery id it has stored before while it waits, runs or is done', async () => {
    const q = queue({ concurrency: 1 });
    expect(q.enqueue(delivery(1))).toBe('queued');
    expect(q.enqueue(delivery(1))).toBe('duplicate');
    const handled: string[] = [];
    q.start(recordInto(handled, (d) => d.deliveryId));
    await until(() => q.counts().done === 1);
    expect(q.enqueue(delivery(1))).toBe('duplicate');
    // A delivery queued after the replay is handled after it would have been: the replay was not.
    q.enqueue(delivery(2));
    await until(() => q.counts().done === 2);
    expect(handled).toEqual(['delivery-1', 'delivery-2']);
  });

  it('runs a failed delivery again, from its first attempt, when GitHub redelivers it (same id, same body)', async () => {
    const q = queue({ maxAttempts: 2 });
    q.enqueue(delivery(1));
    let healthy = false;
    const attempts: number[] = [];
    q.start((d) => {
      attempts.push(d.attempt);
      return healthy ? Promise.resolve() : Promise.reject(new Error('GitHub API said 502'));
    });
    await until(() => q.counts().failed === 1);
    // Another body under the same id is not GitHub's redelivery.
    expect(q.enqueue({ ...delivery(1), body: JSON.stringify({ action: 'opened', number: 666 }) })).toBe('duplicate');
    healthy = true;
    expect(q.enqueue(delivery(1))).toBe('redelivered');
    await until(() => q.counts().done === 1);
    expect(attempts).toEqual([1, 2, 1]);
    expect(row('delivery-1')).toMatchObject({ state: 'done', attempts: 1, last_error: null });
    expect(q.enqueue(delivery(1))).toBe('duplicate');
  });

  it('spaces retries over hours: doubling from a second up to an hour, ±25 %', () => {
    const span = (random: () => number): number =>
      Array.from({ length: DELIVERY_MAX_ATTEMPTS - 1 }, (_, i) =>
        deliveryRetryDelay(i + 1, undefined, undefined, random),
      ).reduce((a, b) => a + b);
    const hour = 3_600_000;
    expect(deliveryRetryDelay(1, undefined, undefined, () => 0.5)).toBe(1_000);
    expect(deliveryRetryDelay(30, undefined, undefined, () => 0.5)).toBe(hour);
    expect(span(() => 0)).toBeGreaterThan(3 * hour);
    expect(span(() => 1)).toBeLessThan(6 * hour);
  });

  it('retries a throwing handler with backoff, then marks the delivery done', async () => {
    const q = queue({ maxAttempts: 5 });
    q.enqueue(delivery(1));
    const attempts: number[] = [];
    q.start((d) => {
      attempts.push(d.attempt);
      return d.attempt < 3
        ? Promise.reject(new Error(`GitHub API said 502 (attempt ${d.attempt})`))
        : Promise.resolve();
    });
    await until(() => q.counts().done === 1);
    expect(attempts).toEqual([1, 2, 3]);
    expect(row('delivery-1')).toMatchObject({ state: 'done', attempts: 3, last_error: null });
  });

  it('marks a delivery failed, with its last error, after the maximum number of attempts', async () => {
    const q = queue({ maxAttempts: 3 });
    q.enqueue(delivery(1));
    let runs = 0;
    q.start(() => Promise.reject(new TypeError(`cannot read the pull request (run ${++runs})`)));
    await until(() => q.counts().failed === 1);
    expect(runs).toBe(3);
    expect(row('delivery-1')).toMatchObject({ state: 'failed', attempts: 3 });
    expect(row('delivery-1').last_error).toBe('TypeError: cannot read the pull request (run 3)');
    expect(row('delivery-1').finished_at).not.toBeNull();
  });

  it('fails a malformed payload at once: the same payload would fail the same way again', async () => {
    const q = queue({ maxAttempts: 5 });
    q.enqueue(delivery(1));
    let runs = 0;
    q.start(() => {
      runs++;
      return Promise.reject(new MalformedPayloadError('pull_request payload: installation: missing'));
    });
    await until(() => q.counts().failed === 1);
    expect(runs).toBe(1);
    expect(row('delivery-1')).toMatchObject({ state: 'failed', attempts: 1 });
    expect(row('delivery-1').last_error).toMatch(/installation: missing/);
  });

  it('keeps handling later deliveries while one is waiting to be retried', async () => {
    const q = queue({ concurrency: 2, retryBaseMs: 50, retryCapMs: 50 });
    q.enqueue(delivery(1));
    q.enqueue(delivery(2));
    const seen: string[] = [];
    q.start((d) => {
      seen.push(`${d.deliveryId}#${d.attempt}`);
      const transient = d.deliveryId === 'delivery-1' && d.attempt === 1;
      return transient ? Promise.reject(new Error('transient')) : Promise.resolve();
    });
    await until(() => q.counts().done === 2);
    expect(seen.indexOf('delivery-2#1')).toBeLessThan(seen.indexOf('delivery-1#2'));
  });

  it('loses no delivery when the process stops while a handler runs: the next start runs it again', async () => {
    const first = queue();
    first.enqueue(delivery(1));
    const gate = new Gate();
    let signal: AbortSignal | undefined;
    first.start(async (d) => {
      signal = d.signal;
      await gate.opened;
    });
    await until(() => signal !== undefined);
    first.stopNow();
    expect(signal?.aborted).toBe(true);
    db.close();
    // The abandoned handler returns after the database is gone: that must neither throw nor record anything.
    gate.release();
    await sleep(5);

    db = openDatabase(dbFile);
    expect(row('delivery-1')).toMatchObject({ state: 'processing', attempts: 1 });
    const second = queue();
    const seen: Delivery[] = [];
    second.start(recordInto(seen, (d) => d));
    await until(() => second.counts().done === 1);
    expect(seen.map((d) => [d.deliveryId, d.attempt])).toEqual([['delivery-1', 2]]);
  });

  it('resumes deliveries stored while no queue was running', async () => {
    queue().enqueue(delivery(1));
    db.close();
    db = openDatabase(dbFile);
    const q = queue();
    const seen: string[] = [];
    q.start(recordInto(seen, (d) => d.deliveryId));
    await until(() => seen.length === 1);
    expect(seen).toEqual(['delivery-1']);
  });

  it('gives up on a delivery whose last attempt was cut off by a restart, instead of crashing forever', async () => {
    queue().enqueue(delivery(1));
    db.prepare("UPDATE webhook_deliveries SET state = 'processing', attempts = 3").run();
    const q = queue({ maxAttempts: 3 });
    let handled = 0;
    q.start(() => Promise.resolve(void handled++));
    await until(() => q.counts().failed === 1);
    expect(handled).toBe(0);
    expect(row('delivery-1').last_error).toBe('its last attempt was cut off by a restart');
  });

  it('fails a delivery whose stored payload is damaged, and goes on with the next', async () => {
    const q = queue({ concurrency: 1 });
    q.enqueue(delivery(1));
    q.enqueue(delivery(2));
    db.prepare("UPDATE webhook_deliveries SET payload = '{' WHERE delivery_id = 'delivery-1'").run();
    const seen: string[] = [];
    q.start(recordInto(seen, (d) => d.deliveryId));
    await until(() => seen.length === 1);
    expect(seen).toEqual(['delivery-2']);
    expect(row('delivery-1')).toMatchObject({ state: 'failed', last_error: 'the stored payload is not JSON' });
  });

  it('stops gracefully: waits for running handlers, starts no more, and leaves the rest pending', async () => {
    const q = queue({ concurrency: 1 });
    q.enqueue(delivery(1));
    q.enqueue(delivery(2));
    const gate = new Gate();
    const seen: string[] = [];
    q.start(async (d) => {
      seen.push(d.deliveryId);
      await gate.opened;
    });
    await until(() => seen.length === 1);
    let stopped = false;
    const stopping = q.stopGracefully().then(() => (stopped = true));
    await sleep(10);
    expect(q.state).toBe('stopping');
    expect(stopped).toBe(false);
    gate.release();
    await stopping;
    expect(q.state).toBe('stopped');
    expect(seen).toEqual(['delivery-1']);
    expect(row('delivery-1').state).toBe('done');
    expect(row('delivery-2').state).toBe('pending');
  });

  it('keeps a scheduled retry in the database across a restart, holding no handler slot, and runs it when due', async () => {
    const q = queue({ concurrency: 1, retryBaseMs: 3_600_000, retryCapMs: 3_600_000 });
    q.enqueue(delivery(1));
    let runs = 0;
    q.start(() => Promise.reject(new Error(`GitHub is down (run ${++runs})`)));
    await until(() => row('delivery-1').last_error !== null);
    // The only slot is free while delivery 1 waits its hour: a graceful stop has nothing to wait for.
    await q.stopGracefully();
    const scheduled = db
      .prepare("SELECT next_attempt_at AS at FROM webhook_deliveries WHERE delivery_id = 'delivery-1'")
      .get() as {
      at: number;
    };
    expect(scheduled.at - Date.now()).toBeGreaterThan(0.7 * 3_600_000);
    expect(row('delivery-1')).toMatchObject({
      state: 'pending',
      attempts: 1,
      last_error: 'Error: GitHub is down (run 1)',
    });

    const seen: string[] = [];
    const next = queue({ concurrency: 1 });
    next.enqueue(delivery(2));
    next.start(recordInto(seen, (d) => `${d.deliveryId}#${d.attempt}`));
    await until(() => next.counts().done === 1);
    expect(seen).toEqual(['delivery-2#1']); // delivery 1 is not due yet
    // Its hour is up.
    db.prepare("UPDATE webhook_deliveries SET next_attempt_at = ? WHERE delivery_id = 'delivery-1'").run(
      Date.now() + 20,
    );
    next.notify();
    await until(() => next.counts().done === 2);
    expect(seen).toEqual(['delivery-2#1', 'delivery-1#2']);
  });

  it('reports, for metrics, how long each delivery waited and how each run ended', async () => {
    const seen: DeliveryObservation[] = [];
    const q = queue({ observe: (o) => seen.push(o) });
    q.enqueue(delivery(1, 'issue_comment', 'created'), Date.now() - 1_000);
    q.start((d) => (d.attempt === 1 ? Promise.reject(new Error('once')) : Promise.resolve()));
    await until(() => seen.length === 4);
    expect(seen.map((o) => (o.kind === 'started' ? `started#${o.attempt}` : o.outcome))).toEqual([
      'started#1',
      'retry',
      'started#2',
      'done',
    ]);
    const first = seen[0]!;
    expect(first).toMatchObject({ kind: 'started', event: 'issue_comment', action: 'created' });
    expect(first.kind === 'started' && first.waitedMs).toBeGreaterThanOrEqual(1_000);
  });

  it('follows its lifecycle: started once, never restarted', async () => {
    const q = queue();
    const nothing = () => Promise.resolve();
    q.start(nothing);
    expect(() => q.start(nothing)).toThrow(IllegalStateError);
    await q.stopGracefully();
    expect(() => q.start(nothing)).toThrow(IllegalStateError);
    const unused = queue();
    unused.stopNow();
    expect(unused.state).toBe('stopped');
  });
});
