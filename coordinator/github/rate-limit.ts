/**
 * How eka-ci behaves towards GitHub's limits. This is the one place that decides which GitHub responses are worth
 * trying again, and how long to wait first:
 *
 * - a primary rate limit (403/429 with `x-ratelimit-remaining: 0`): wait until `x-ratelimit-reset`;
 * - a secondary rate limit (403/429 with `retry-after`, or GitHub's "secondary rate limit" message): wait
 *   `retry-after` seconds, else at least a minute plus jittered exponential backoff, as GitHub asks;
 * - a 5xx or a failed connection: jittered exponential backoff;
 * - anything else (401, 404, 422, …): no retry — the request itself is wrong.
 *
 * Retries are bounded; a client that kept waiting without end would hide an outage. Besides reacting, a
 * `RateLimitGate` holds back the next request once a response said the budget is spent, so eka-ci does not spend
 * requests on refusals that GitHub counts against the app.
 */
import { Backoff, sleep } from '../../common/backoff.js';

export interface GitHubRetryOptions {
  /** Attempts per request, the first included. */
  maxAttempts: number;
  backoffBaseMs: number;
  backoffCapMs: number;
  /** The least wait after a secondary rate limit that came without `retry-after`. */
  secondaryRateLimitWaitMs: number;
  /** Slack added to `x-ratelimit-reset`, which is in whole seconds and read from another machine's clock. */
  resetMarginMs: number;
  /** The longest single wait; a request that would need longer fails instead. */
  maxWaitMs: number;
}

export const DEFAULT_RETRY_OPTIONS: GitHubRetryOptions = {
  // Five attempts ride out a deploy-sized GitHub hiccup or two secondary limits, and still surface an outage within
  // minutes instead of stalling a pull request silently.
  maxAttempts: 5,
  // 1 s doubling up to a minute: quick recovery from a single 502, without hammering an API that is struggling.
  backoffBaseMs: 1_000,
  backoffCapMs: 60_000,
  // GitHub: "If the retry-after response header is not present, wait for at least one minute before retrying."
  secondaryRateLimitWaitMs: 60_000,
  resetMarginMs: 1_000,
  // The primary rate-limit window is an hour, so its reset is never further away than that.
  maxWaitMs: 65 * 60_000,
};

export type FailureKind = 'primary-rate-limit' | 'secondary-rate-limit' | 'server-error' | 'fatal';

type Headers = Record<string, string | number | undefined>;

function header(headers: Headers, name: string): string | undefined {
  const value = headers[name];
  return value === undefined ? undefined : String(value);
}

/** What a failed response (or a request that got none: status 500 from Octokit, no headers) means. */
export function classifyFailure(status: number, headers: Headers, message: string): FailureKind {
  if (status >= 500) return 'server-error';
  if (status !== 403 && status !== 429) return 'fatal';
  if (header(headers, 'x-ratelimit-remaining') === '0' && header(headers, 'retry-after') === undefined) {
    return 'primary-rate-limit';
  }
  if (status === 429 || header(headers, 'retry-after') !== undefined) return 'secondary-rate-limit';
  // A plain 403 is a missing permission, unless GitHub's message says it is its abuse protection.
  return /secondary rate limit|abuse/i.test(message) ? 'secondary-rate-limit' : 'fatal';
}

/** How long to wait before retrying after a failure of `kind`. */
export function retryDelayMs(
  kind: Exclude<FailureKind, 'fatal'>,
  headers: Headers,
  backoff: Backoff,
  options: GitHubRetryOptions,
  nowMs = Date.now(),
): number {
  const retryAfter = Number(header(headers, 'retry-after'));
  if (Number.isFinite(retryAfter) && retryAfter >= 0 && header(headers, 'retry-after') !== undefined) {
    return retryAfter * 1000;
  }
  if (kind === 'primary-rate-limit') {
    const reset = Number(header(headers, 'x-ratelimit-reset'));
    if (Number.isFinite(reset)) return Math.max(0, reset * 1000 - nowMs) + options.resetMarginMs;
  }
  if (kind === 'secondary-rate-limit') return options.secondaryRateLimitWaitMs + backoff.next();
  return backoff.next();
}

/**
 * One rate-limit budget as GitHub reports it in `x-ratelimit-*` headers (one per installation, and one for the app
 * itself). Once a response says nothing is left, `wait()` holds every request back until the reset.
 */
export class RateLimitGate {
  private resumeAtMs = 0;

  constructor(private readonly options: Pick<GitHubRetryOptions, 'resetMarginMs' | 'maxWaitMs'>) {}

  /** Reads a response's headers; returns the remaining budget when the response reported it. */
  observe(headers: Headers): number | undefined {
    // Search and GraphQL have budgets of their own; only the core REST budget governs eka-ci's requests.
    const resource = header(headers, 'x-ratelimit-resource');
    if (resource !== undefined && resource !== 'core') return undefined;
    const remaining = Number(header(headers, 'x-ratelimit-remaining'));
    const reset = Number(header(headers, 'x-ratelimit-reset'));
    if (!Number.isFinite(remaining)) return undefined;
    this.resumeAtMs = remaining === 0 && Number.isFinite(reset) ? reset * 1000 + this.options.resetMarginMs : 0;
    return remaining;
  }

  /** How long the next request must wait (0 when the budget is not known to be spent). */
  delayMs(nowMs = Date.now()): number {
    return Math.min(Math.max(0, this.resumeAtMs - nowMs), this.options.maxWaitMs);
  }

  async wait(): Promise<void> {
    const delay = this.delayMs();
    if (delay > 0) await sleep(delay);
  }
}
