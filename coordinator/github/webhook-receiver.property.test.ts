import { createHmac } from 'node:crypto';
import { request, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import fc from 'fast-check';
import Koa from 'koa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { silentLogger } from '../../common/logging.js';
import { mutateBytes, mutations } from '../../test/support/fuzz.js';
import { type Db, openDatabase } from '../db/database.js';
import { DeliveryQueue } from './delivery-queue.js';
import { WEBHOOK_PATH, webhookReceiver } from './webhook-receiver.js';

const RUNS = 150;
const SECRET = 'it-is-a-secret-to-everybody';
// Shrunk so that bodies over the limit are cheap to send.
const MAX_BODY_BYTES = 2_048;

/** The receiver as the coordinator mounts it, on a loopback port, over a real database and queue. */
let db: Db;
let server: Server;
let port: number;
beforeAll(async () => {
  db = openDatabase(':memory:');
  const router = webhookReceiver({
    queue: new DeliveryQueue(db, { logger: silentLogger() }),
    webhookSecret: SECRET,
    allowInsecureWebhooks: false,
    logger: silentLogger(),
    maxBodyBytes: MAX_BODY_BYTES,
    rateLimit: { burst: 1_000_000, perSecond: 1_000_000 },
  });
  const app = new Koa();
  app.use(router.routes()).use(router.allowedMethods());
  server = app.listen(0, '127.0.0.1');
  await new Promise<void>((resolve) => server.once('listening', resolve));
  port = (server.address() as AddressInfo).port;
});
afterAll(async () => {
  server.closeAllConnections();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  db.close();
});

interface Delivery {
  headers: Record<string, string>;
  body: Buffer;
  /** Sent in pieces without Content-Length, as a streaming client does. */
  chunked: boolean;
}

function post({ headers, body, chunked }: Delivery): Promise<{ status: number; json: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method: 'POST', path: WEBHOOK_PATH, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString();
        let json: Record<string, unknown>;
        try {
          json = (text ? JSON.parse(text) : {}) as Record<string, unknown>;
        } catch {
          json = { notJson: text };
        }
        resolve({ status: res.statusCode ?? 0, json });
      });
    });
    // A refused body may be cut off mid-send: the answer still arrives.
    req.on('error', reject);
    if (chunked) {
      req.write(body.subarray(0, body.length >> 1));
      req.end(body.subarray(body.length >> 1));
    } else req.end(body);
  });
}

const signature = (body: Buffer, secret = SECRET): string =>
  `sha256=${createHmac('sha256', secret).update(body).digest('hex')}`;
const stored = (): number => (db.prepare('SELECT COUNT(*) AS n FROM webhook_deliveries').get() as { n: number }).n;

let ids = 0;
const freshId = fc.constant(null).map(() => `00000000-0000-4000-8000-${String(ids++).padStart(12, '0')}`);
const headerText = fc.stringMatching(/^[\x20-\x7e]{0,40}$/);
const payload = fc.dictionary(fc.string({ maxLength: 8 }), fc.jsonValue({ maxDepth: 2 }), { maxKeys: 4 });
const body = fc.oneof(
  payload.map((p) => Buffer.from(JSON.stringify(p))),
  fc
    .tuple(payload, mutations(['{', '}', '"', ':', ',', '\uFEFF', '\u00ff']))
    .map(([p, ms]) => mutateBytes(Buffer.from(JSON.stringify(p)), ms)),
  fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b)),
  fc.constantFrom(
    Buffer.alloc(0),
    Buffer.from([0xc3, 0x28]),
    Buffer.from('[]'),
    Buffer.from('null'),
    Buffer.from('"x"'),
  ),
  fc.nat(3 * MAX_BODY_BYTES).map((n) => Buffer.from(`{"a":"${'x'.repeat(n)}"}`)),
  fc.nat(20_000).map((depth) => Buffer.from(`{"a":${'['.repeat(depth)}${']'.repeat(depth)}}`)),
);

/** Anything a client could send: GitHub's headers or not, signed, unsigned or signed wrong, any body. */
const delivery: fc.Arbitrary<Delivery> = fc
  .record({
    body,
    event: fc.oneof(fc.constantFrom('pull_request', 'push', 'ping'), headerText),
    id: fc.oneof(freshId, headerText),
    contentType: fc.option(
      fc.oneof(fc.constantFrom('application/json', 'application/json; charset=utf-8', 'text/plain'), headerText),
    ),
    sign: fc.constantFrom('right', 'other-secret', 'none', 'garbage'),
    garbage: headerText,
    chunked: fc.boolean(),
  })
  .map(({ body, event, id, contentType, sign, garbage, chunked }) => {
    const headers: Record<string, string> = { 'X-GitHub-Event': event, 'X-GitHub-Delivery': id };
    if (contentType !== null) headers['Content-Type'] = contentType;
    if (sign === 'right') headers['X-Hub-Signature-256'] = signature(body);
    if (sign === 'other-secret') headers['X-Hub-Signature-256'] = signature(body, 'another-secret-of-some-length');
    if (sign === 'garbage') headers['X-Hub-Signature-256'] = garbage;
    return { headers, body, chunked };
  });

describe('the webhook receiver with any request', () => {
  it('answers 202, 200 duplicate, or a refusal in JSON, never 500, and stores exactly what it accepts', async () => {
    await fc.assert(
      fc.asyncProperty(delivery, async (d) => {
        const before = stored();
        const { status, json } = await post(d);
        expect([200, 202, 400, 401, 413]).toContain(status);
        if (status >= 400) expect(typeof json.error).toBe('string');
        expect(stored() - before).toBe(status === 202 ? 1 : 0);
      }),
      { numRuns: RUNS },
    );
  });

  it('queues every correctly signed JSON object once and answers its replay as a duplicate', async () => {
    await fc.assert(
      fc.asyncProperty(payload, freshId, fc.boolean(), async (p, id, chunked) => {
        const body = Buffer.from(JSON.stringify(p));
        const headers = {
          'Content-Type': 'application/json',
          'X-GitHub-Event': 'pull_request',
          'X-GitHub-Delivery': id,
          'X-Hub-Signature-256': signature(body),
        };
        const first = await post({ headers, body, chunked });
        const replay = await post({ headers, body, chunked: !chunked });
        expect(first.status === 202 || body.length > MAX_BODY_BYTES).toBe(true);
        if (first.status === 202) expect(replay).toEqual({ status: 200, json: { duplicate: true } });
      }),
      { numRuns: RUNS / 3 },
    );
  });
});
