import { KeyedRateLimiter } from '../../common/keyed-rate-limiter.js';
import type { IncomingMessage } from 'node:http';
import Router, { type RouterContext } from '@koa/router';
import { verify } from '@octokit/webhooks-methods';
import { ConfigError } from '../../common/errors.js';
import type { Logger } from '../../common/logging.js';
import type { DeliveryQueue } from './delivery-queue.js';

/**
 * GitHub's webhook endpoint, `POST /github/webhook`. A delivery is checked, stored, and answered `202` at once;
 * the work happens later, from the queue (GitHub gives up on a delivery after 10 seconds and does not retry it).
 *
 * In order, a request is refused with:
 * - 429 (and `Retry-After`) when its source address has sent more than its share, before its body is read;
 * - 400 without `X-GitHub-Event` and `X-GitHub-Delivery`;
 * - 413 when the body is larger than GitHub ever sends;
 * - 400 when the body is empty or not UTF-8;
 * - 401 when `X-Hub-Signature-256` is missing or is not the HMAC-SHA256 of the body under the webhook secret
 *   (compared in constant time). Without a secret, only in insecure mode, nothing is verified;
 * - 400 when the body is not a JSON object;
 * - 200 `{duplicate: true}` when the delivery id was stored before: a replay, or a redelivery of a delivery that
 *   arrived, is handled once — unless that delivery ended failed: GitHub's manual redelivery of the same body is
 *   then queued again (202).
 * Every refusal is a JSON `{error}` and stores nothing.
 *
 * The router reads the raw body itself (the signature covers the exact bytes): mount it where no body parser runs.
 */

export const WEBHOOK_PATH = '/github/webhook';

/** GitHub caps webhook payloads at 25 MB and drops larger ones, so anything bigger is not GitHub. */
export const MAX_WEBHOOK_BODY_BYTES = 25 * 1024 * 1024;
/**
 * Every installation's deliveries come from the same few GitHub addresses, and GitHub does not retry a refused
 * delivery, so the limit is far above real traffic (a mass relabel of 1,000 pull requests arrives as one burst) and
 * only stops a flood from a single address from filling the disk.
 */
export const RATE_LIMIT_BURST = 2_000;
export const RATE_LIMIT_PER_SECOND = 100;
/** Addresses remembered at once; the idle ones are forgotten first, so memory stays bounded during a spoofed flood. */
const MAX_TRACKED_SOURCES = 10_000;

// GitHub's event names are snake_case words and its delivery ids are GUIDs: anything else is not from GitHub, and
// bounding them keeps arbitrary header text out of the database and the logs.
const EVENT_NAME = /^[a-z][a-z0-9_]{0,63}$/;
const DELIVERY_ID = /^[A-Za-z0-9-]{1,128}$/;

export interface WebhookReceiverOptions {
  queue: Pick<DeliveryQueue, 'enqueue'>;
  /** Required unless `allowInsecureWebhooks`. */
  webhookSecret: string | undefined;
  allowInsecureWebhooks: boolean;
  logger: Logger;
  /** Shrunk in tests; production uses the constants above. */
  maxBodyBytes?: number;
  rateLimit?: { burst: number; perSecond: number };
}

export function webhookReceiver(options: WebhookReceiverOptions): Router {
  const { queue, webhookSecret: secret, logger } = options;
  if (!secret && !options.allowInsecureWebhooks) {
    throw new ConfigError('the GitHub webhook receiver needs a webhook secret (or allow_insecure_webhooks = true)');
  }
  const maxBytes = options.maxBodyBytes ?? MAX_WEBHOOK_BODY_BYTES;
  const limiter = new KeyedRateLimiter(
    MAX_TRACKED_SOURCES,
    options.rateLimit?.burst ?? RATE_LIMIT_BURST,
    options.rateLimit?.perSecond ?? RATE_LIMIT_PER_SECOND,
  );
  let warnedInsecure = false;
  const router = new Router();

  router.post(WEBHOOK_PATH, async (ctx) => {
    const source = ctx.ip || 'unknown';
    const waitMs = limiter.take(source);
    if (waitMs > 0) {
      ctx.set('Retry-After', String(Math.ceil(waitMs / 1000)));
      return refuse(ctx, 429, 'too many requests from this address');
    }
    const event = ctx.get('X-GitHub-Event');
    const deliveryId = ctx.get('X-GitHub-Delivery');
    if (!EVENT_NAME.test(event)) return refuse(ctx, 400, 'missing or malformed X-GitHub-Event header');
    if (!DELIVERY_ID.test(deliveryId)) return refuse(ctx, 400, 'missing or malformed X-GitHub-Delivery header');
    if (Number(ctx.get('Content-Length') || 0) > maxBytes) return refuse(ctx, 413, `body exceeds ${maxBytes} bytes`);
    const raw = await readBody(ctx.req, maxBytes);
    if (raw === undefined) return refuse(ctx, 413, `body exceeds ${maxBytes} bytes`);
    let body: string;
    try {
      body = new TextDecoder('utf-8', { fatal: true }).decode(raw);
    } catch {
      return refuse(ctx, 400, 'body is not UTF-8');
    }

    // GitHub never sends an empty body (and verify() would throw on one).
    if (body === '') return refuse(ctx, 400, 'empty body');
    if (secret) {
      const signature = ctx.get('X-Hub-Signature-256');
      if (!signature || !(await verify(secret, body, signature))) {
        logger.warn({ source, deliveryId, event, signed: signature !== '' }, 'refused webhook: bad signature');
        return refuse(ctx, 401, signature ? 'X-Hub-Signature-256 does not match' : 'X-Hub-Signature-256 missing');
      }
    } else if (!warnedInsecure) {
      warnedInsecure = true;
      logger.warn('accepting GitHub webhooks without verifying signatures: allow_insecure_webhooks is on');
    }

    const type = ctx.request.type;
    if (type !== '' && type !== 'application/json') {
      return refuse(ctx, 400, `Content-Type ${type}: set the app's webhook content type to application/json`);
    }
    let payload: unknown;
    try {
      payload = JSON.parse(body);
    } catch {
      return refuse(ctx, 400, 'body is not valid JSON');
    }
    if (typeof payload !== 'object' || payload === null || Array.isArray(payload)) {
      return refuse(ctx, 400, 'body is not a JSON object');
    }
    const action = (payload as { action?: unknown }).action;

    let outcome: ReturnType<DeliveryQueue['enqueue']>;
    try {
      outcome = queue.enqueue({
        deliveryId,
        event,
        action: typeof action === 'string' ? action : undefined,
        body,
        source,
      });
    } catch (err) {
      // GitHub does not retry: the failure must show in the app's delivery log, where it can be redelivered.
      logger.error({ err, deliveryId, event }, 'could not store a webhook delivery');
      return refuse(ctx, 503, 'could not store the delivery; redeliver it from the app settings');
    }
    if (outcome === 'duplicate') {
      logger.info({ deliveryId, event }, 'ignored a replayed webhook delivery');
      ctx.status = 200;
      ctx.body = { duplicate: true };
      return;
    }
    if (outcome === 'redelivered') logger.info({ deliveryId, event }, 'a failed webhook delivery came again; queued');
    else logger.debug({ deliveryId, event, bytes: raw.length }, 'webhook delivery queued');
    ctx.status = 202;
    ctx.body = { queued: true, deliveryId };
  });

  return router;
}

function refuse(ctx: RouterContext, status: number, error: string): void {
  ctx.status = status;
  ctx.body = { error };
  // A refused body may still be arriving; closing the connection spares reading it.
  if (!ctx.req.complete) ctx.set('Connection', 'close');
}

/** The body, or undefined as soon as it passes `max` bytes (the rest is left unread). */
function readBody(req: IncomingMessage, max: number): Promise<Buffer | undefined> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let bytes = 0;
    const done = (): void => {
      req.off('data', onData).off('end', onEnd).off('error', onError).off('close', onClose);
    };
    const onData = (chunk: Buffer): void => {
      bytes += chunk.length;
      if (bytes <= max) return void chunks.push(chunk);
      done();
      req.pause();
      resolve(undefined);
    };
    const onEnd = (): void => {
      done();
      resolve(Buffer.concat(chunks));
    };
    const onError = (err: Error): void => {
      done();
      reject(err);
    };
    const onClose = (): void => onError(new Error('the client closed the connection before sending the whole body'));
    req.on('data', onData).on('end', onEnd).on('error', onError).on('close', onClose);
  });
}
