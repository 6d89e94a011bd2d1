import { createHmac, randomUUID } from 'node:crypto';
import { readFile, mkdtemp, rm } from 'node:fs/promises';
import { request } from 'node:http';
import { createRequire } from 'node:module';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Koa from 'koa';
import { pino } from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { sleep } from '../../common/backoff.js';
import { ConfigError } from '../../common/errors.js';
import { silentLogger, type Logger } from '../../common/logging.js';
import { openDatabase, type Db } from '../db/database.js';
import { DeliveryQueue, type Delivery } from './delivery-queue.js';
import { WEBHOOK_PATH, webhookReceiver, type WebhookReceiverOptions } from './webhook-receiver.js';

const SECRET = 'it-is-a-secret-to-everybody';

interface Example {
  name: string;
  actions: string[];
  examples: Array<Record<string, unknown>>;
}

interface Response {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  json: Record<string, unknown>;
}

interface Harness {
  db: Db;
  queue: DeliveryQueue;
  handled: Delivery[];
  post(body: string | Buffer | Buffer[], headers?: Record<string, string>): Promise<Response>;
  close(): Promise<void>;
}

let dir: string;
const open: Harness[] = [];

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'ekaci-webhooks-'));
});
afterEach(async () => {
  for (const h of open.splice(0)) await h.close();
  await rm(dir, { recursive: true, force: true });
});

/** The receiver mounted as the coordinator mounts it, on a loopback port, over a real database and queue. */
async function serve(options: Partial<WebhookReceiverOptions> = {}, proxy = false): Promise<Harness> {
  const db = openDatabase(join(dir, `${randomUUID()}.sqlite`));
  const queue = new DeliveryQueue(db, { logger: silentLogger() });
  const handled: Delivery[] = [];
  queue.start((d) => {
    handled.push(d);
    return Promise.resolve();
  });
  const app = new Koa();
  app.proxy = proxy;
  const router = webhookReceiver({
    queue,
    webhookSecret: SECRET,
    allowInsecureWebhooks: false,
    logger: silentLogger(),
    ...options,
  });
  app.use(router.routes()).use(router.allowedMethods());
  const server = app.listen(0, '127.0.0.1');
  await new Promise<void>((resolve) => server.once('listening', resolve));
  const { port } = server.address() as AddressInfo;

  const post = (body: string | Buffer | Buffer[], headers: Record<string, string> = {}): Promise<Response> =>
    new Promise((resolve, reject) => {
      const req = request({ host: '127.0.0.1', port, method: 'POST', path: WEBHOOK_PATH, headers }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString();
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            json: (text ? JSON.parse(text) : {}) as Record<string, unknown>,
          });
        });
      });
      req.on('error', reject);
      // An array is sent chunk by chunk, without Content-Length, as a client streaming its body would.
      for (const chunk of Array.isArray(body) ? body : []) req.write(chunk);
      req.end(Array.isArray(body) ? undefined : body);
    });

  const harness: Harness = {
    db,
    queue,
    handled,
    post,
    close: async () => {
      queue.stopNow();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (db.open) db.close();
    },
  };
  open.push(harness);
  return harness;
}

function signature(body: string | Buffer, secret = SECRET): string {
  return `sha256=${createHmac('sha256', secret).update(body).digest('hex')}`;
}

/** GitHub's headers for `body`, correctly signed. */
function github(event: string, body: string | Buffer, deliveryId: string = randomUUID()): Record<string, string> {
  return {
    'Content-Type': 'application/json',
    'User-Agent': 'GitHub-Hookshot/test',
    'X-GitHub-Event': event,
    'X-GitHub-Delivery': deliveryId,
    'X-Hub-Signature-256': signature(body),
  };
}

function stored(h: Harness): number {
  return (h.db.prepare('SELECT COUNT(*) AS n FROM webhook_deliveries').get() as { n: number }).n;
}

async function until(predicate: () => boolean): Promise<void> {
  while (!predicate()) await sleep(2);
}

const PING = JSON.stringify({ zen: 'Design for failure.', hook_id: 1 });

describe('GitHub webhook receiver', () => {
  it('accepts every example payload GitHub documents, signed, and hands each to the handler with its event and action', async () => {
    const require = createRequire(import.meta.url);
    const index = require.resolve('@octokit/webhooks-examples/api.github.com/index.json');
    const examples = JSON.parse(await readFile(index, 'utf8')) as Example[];
    const h = await serve();
    const expected = new Map<string, { event: string; action: string | undefined; payload: unknown }>();
    for (const { name, examples: payloads } of examples) {
      for (const payload of payloads) {
        const body = JSON.stringify(payload);
        const id = randomUUID();
        const action = typeof payload.action === 'string' ? payload.action : undefined;
        expected.set(id, { event: name, action, payload });
        const res = await h.post(body, github(name, body, id));
        expect(res.status, `${name}.${action ?? ''}`).toBe(202);
        expect(res.json).toEqual({ queued: true, deliveryId: id });
      }
    }
    expect(expected.size).toBeGreaterThan(300);
    await until(() => h.handled.length === expected.size);
    for (const d of h.handled) {
      const want = expected.get(d.deliveryId);
      expect({ event: d.event, action: d.action, payload: d.payload }).toEqual(want);
    }
    await until(() => h.queue.counts().done === expected.size);
  });

  it('refuses a body signed with another secret with 401, storing and handling nothing', async () => {
    const h = await serve();
    const res = await h.post(PING, { ...github('ping', PING), 'X-Hub-Signature-256': signature(PING, 'wrong') });
    expect(res.status).toBe(401);
    expect(res.json).toEqual({ error: 'X-Hub-Signature-256 does not match' });
    const tampered = PING.replace('failure', 'success');
    expect((await h.post(tampered, { ...github('ping', PING) })).status).toBe(401);
    await sleep(20);
    expect(stored(h)).toBe(0);
    expect(h.handled).toEqual([]);
  });

  it('refuses an unsigned body with 401', async () => {
    const h = await serve();
    const { 'X-Hub-Signature-256': _, ...unsigned } = github('ping', PING);
    const res = await h.post(PING, unsigned);
    expect(res.status).toBe(401);
    expect(res.json).toEqual({ error: 'X-Hub-Signature-256 missing' });
    expect(stored(h)).toBe(0);
  });

  it('handles a replayed delivery once, answering the replay 200 duplicate', async () => {
    const h = await serve();
    const headers = github('ping', PING, 'replayed-delivery');
    expect((await h.post(PING, headers)).status).toBe(202);
    const replay = await h.post(PING, headers);
    expect(replay.status).toBe(200);
    expect(replay.json).toEqual({ duplicate: true });
    await until(() => h.queue.counts().done === 1);
    expect((await h.post(PING, headers)).json).toEqual({ duplicate: true });
    await sleep(20);
    expect(h.handled.map((d) => d.deliveryId)).toEqual(['replayed-delivery']);
  });

  it('refuses a body larger than the limit with 413, whether it declares its length or streams', async () => {
    const h = await serve({ maxBodyBytes: 1_024 });
    const big = JSON.stringify({ padding: 'x'.repeat(2_000) });
    const declared = await h.post(big, github('ping', big));
    expect(declared.status).toBe(413);
    expect(declared.json).toEqual({ error: 'body exceeds 1024 bytes' });
    const streamed = await h.post(
      [Buffer.from(big.slice(0, 1_000)), Buffer.from(big.slice(1_000))],
      github('ping', big),
    );
    expect(streamed.status).toBe(413);
    const fits = JSON.stringify({ padding: 'x'.repeat(1_000) });
    expect((await h.post(fits, github('ping', fits))).status).toBe(202);
    expect(stored(h)).toBe(1);
  });

  it('refuses a correctly signed body that is not a JSON object with 400', async () => {
    const h = await serve();
    for (const body of ['{"action": "opened",', '[1, 2]', 'null', '', Buffer.from([0x7b, 0xff, 0x7d])]) {
      const res = await h.post(body, github('pull_request', body));
      expect(res.status, String(body)).toBe(400);
      expect(typeof res.json.error).toBe('string');
    }
    const form = `payload=${encodeURIComponent(PING)}`;
    const res = await h.post(form, { ...github('ping', form), 'Content-Type': 'application/x-www-form-urlencoded' });
    expect(res.status).toBe(400);
    expect(res.json.error).toContain('application/json');
    expect(stored(h)).toBe(0);
  });

  it('refuses a request without X-GitHub-Event or X-GitHub-Delivery with 400', async () => {
    const h = await serve();
    const { 'X-GitHub-Event': _e, ...noEvent } = github('ping', PING);
    const { 'X-GitHub-Delivery': _d, ...noDelivery } = github('ping', PING);
    const withoutEvent = await h.post(PING, noEvent);
    expect(withoutEvent.status).toBe(400);
    expect(withoutEvent.json.error).toBe('missing or malformed X-GitHub-Event header');
    const withoutDelivery = await h.post(PING, noDelivery);
    expect(withoutDelivery.status).toBe(400);
    expect(withoutDelivery.json.error).toBe('missing or malformed X-GitHub-Delivery header');
    expect((await h.post(PING, { ...github('ping', PING), 'X-GitHub-Event': 'Ping; DROP' })).status).toBe(400);
    expect(stored(h)).toBe(0);
  });

  it('limits each source address to its token bucket, answering 429 with Retry-After', async () => {
    // Behind a proxy, so X-Forwarded-For can stand for two different senders.
    const h = await serve({ rateLimit: { burst: 3, perSecond: 0.01 } }, true);
    const from = (ip: string) => ({ ...github('ping', PING), 'X-Forwarded-For': ip });
    for (let n = 0; n < 3; n++) expect((await h.post(PING, from('192.0.2.1'))).status).toBe(202);
    const limited = await h.post(PING, from('192.0.2.1'));
    expect(limited.status).toBe(429);
    expect(Number(limited.headers['retry-after'])).toBeGreaterThanOrEqual(1);
    expect(limited.json).toEqual({ error: 'too many requests from this address' });
    expect((await h.post(PING, from('198.51.100.7'))).status).toBe(202);
    expect(stored(h)).toBe(4);
  });

  it('answers 503 when the delivery cannot be stored, so GitHub lists it for redelivery', async () => {
    const h = await serve();
    h.queue.stopNow();
    h.db.close();
    const res = await h.post(PING, github('ping', PING));
    expect(res.status).toBe(503);
    expect(res.json.error).toContain('redeliver');
  });

  it('refuses to start without a secret unless insecure webhooks are allowed', () => {
    const queue = { enqueue: () => 'queued' as const };
    expect(() =>
      webhookReceiver({ queue, webhookSecret: undefined, allowInsecureWebhooks: false, logger: silentLogger() }),
    ).toThrow(ConfigError);
  });

  it('accepts unsigned deliveries in insecure mode, warning once', async () => {
    const lines: string[] = [];
    const logger: Logger = pino({ level: 'warn' }, { write: (line: string) => void lines.push(line) });
    const h = await serve({ webhookSecret: undefined, allowInsecureWebhooks: true, logger });
    for (let n = 0; n < 3; n++) {
      const res = await h.post(PING, { 'X-GitHub-Event': 'ping', 'X-GitHub-Delivery': `unsigned-${n}` });
      expect(res.status).toBe(202);
    }
    await until(() => h.handled.length === 3);
    expect(lines.filter((l) => l.includes('without verifying signatures'))).toHaveLength(1);
  });
});
