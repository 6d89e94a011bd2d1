/** Webhook deliveries as GitHub makes them, fed with GitHub's own example payloads (`@octokit/webhooks-examples`). */
import { createHmac, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { request } from 'node:http';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const EXAMPLES_FILE = '@octokit/webhooks-examples/api.github.com/index.json';

let examples: Array<{ name: string; examples: Array<Record<string, unknown>> }> | undefined;

/** The `X-Hub-Signature-256` header GitHub sends: HMAC-SHA256 of the exact body bytes under the webhook secret. */
export function signWebhook(secret: string, body: string): string {
  return `sha256=${createHmac('sha256', secret).update(body, 'utf8').digest('hex')}`;
}

/**
 * GitHub's example payloads for `event` (and `action`, when given), as fresh copies a test may modify. Throws when
 * there are none, so a misspelt event name fails loudly instead of testing nothing.
 */
export function webhookExamples(event: string, action?: string): Array<Record<string, unknown>> {
  examples ??= JSON.parse(readFileSync(require.resolve(EXAMPLES_FILE), 'utf8')) as typeof examples;
  const found = (examples ?? [])
    .filter((e) => e.name === event)
    .flatMap((e) => e.examples)
    .filter((payload) => action === undefined || payload.action === action);
  if (!found.length) throw new Error(`@octokit/webhooks-examples has no ${event}${action ? `.${action}` : ''} payload`);
  return structuredClone(found);
}

/** Every example payload GitHub publishes, with its event name, as fresh copies. */
export function allWebhookExamples(): Array<{ event: string; payload: Record<string, unknown> }> {
  examples ??= JSON.parse(readFileSync(require.resolve(EXAMPLES_FILE), 'utf8')) as typeof examples;
  return (examples ?? []).flatMap((e) =>
    e.examples.map((payload) => ({ event: e.name, payload: structuredClone(payload) })),
  );
}

/**
 * POSTs `payload` to `url` with the headers GitHub sends (event, delivery id, signature). `options.signature`
 * replaces the computed signature, to test refusals.
 */
export function deliverWebhook(
  url: string,
  secret: string,
  event: string,
  payload: unknown,
  options: { deliveryId?: string; signature?: string } = {},
): Promise<{ status: number; body: string }> {
  return postWebhook(url, secret, event, JSON.stringify(payload), options);
}

/** `deliverWebhook` for a body already serialised (a benchmark keeps JSON.stringify out of what it times). */
export function postWebhook(
  url: string,
  secret: string,
  event: string,
  body: string,
  options: { deliveryId?: string; signature?: string } = {},
): Promise<{ status: number; body: string }> {
  const headers = {
    'content-type': 'application/json',
    'content-length': String(Buffer.byteLength(body)),
    'user-agent': 'GitHub-Hookshot/eka-ci-stand-in',
    'x-github-event': event,
    'x-github-delivery': options.deliveryId ?? randomUUID(),
    'x-github-hook-id': '1',
    'x-hub-signature-256': options.signature ?? signWebhook(secret, body),
  };
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'POST', headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (chunk: Buffer) => chunks.push(chunk));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}
