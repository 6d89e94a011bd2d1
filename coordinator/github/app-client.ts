/**
 * The coordinator's way into GitHub's REST API as one GitHub App: app-JWT requests, installation tokens (issued,
 * cached and renewed by `@octokit/app`), and one request hook that every call of every Octokit it hands out passes
 * through — it waits out rate limits, retries what `rate-limit.ts` calls retryable, and turns the rest into named
 * errors.
 */
import { App } from '@octokit/app';
import { Octokit } from '@octokit/core';
import { LRUCache } from 'lru-cache';
import { Backoff, sleep } from '../../common/backoff.js';
import type { Logger } from '../../common/logging.js';
import { GitHubApiError, GitHubUnavailableError } from './errors.js';
import { installationResponse, readResponse } from './responses.js';
import {
  classifyFailure,
  DEFAULT_RETRY_OPTIONS,
  RateLimitGate,
  retryDelayMs,
  type GitHubRetryOptions,
} from './rate-limit.js';

export type { Octokit };

export interface GitHubAppCredentials {
  appId: number;
  privateKey: string;
}

export interface GitHubMetrics {
  /** One GitHub response (or failed connection, as status 500) for `op`, e.g. `GET /repos/{owner}/{repo}`. */
  calls(op: string, status: number): void;
  rateLimitRemaining(n: number): void;
}

export interface GitHubAppClientOptions {
  /** The app's name in the configuration, for logs. */
  id: string;
  credentials: GitHubAppCredentials;
  /**
   * Where the credentials come from, when they may rotate or are read only when the coordinator starts: asked before
   * each use (cheap: its values are cached) and a new identity means new credentials. Without it, `credentials`.
   */
  credentialSource?: { current(): Promise<GitHubAppCredentials> };
  /** `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server. */
  apiUrl: string;
  logger: Logger;
  metrics?: GitHubMetrics;
  /** Tuning of waits and retries; tests shrink them. */
  retry?: Partial<GitHubRetryOptions>;
}

// Which installation serves a repository changes only when someone installs or removes the app; ten minutes keeps
// lookups off the API while such a change still takes effect soon.
const INSTALLATION_TTL_MS = 10 * 60_000;
// "Not installed" is remembered briefly: someone who just installed the app should not wait long for it to notice.
const NOT_INSTALLED_TTL_MS = 60_000;
// Far more repositories than one coordinator serves; the bound only keeps a misbehaving caller from growing it.
const INSTALLATION_CACHE_MAX = 10_000;
// A clone or fetch of a large repository makes several authenticated requests over minutes; hand out no token that
// expires sooner than this (@octokit/app may return a cached one with only a minute left).
const CLONE_TOKEN_MIN_VALIDITY_MS = 10 * 60_000;

// Routes authenticated as the app itself (JWT); their rate-limit budget is the app's, not an installation's.
const APP_ROUTE =
  /^\/(app|marketplace_listing)(\/|$)|^\/(orgs|users|enterprises)\/[^/]+\/installation$|^\/repos\/[^/]+\/[^/]+\/installation$/;

interface HttpError {
  status: number;
  message: string;
  response?: { headers: Record<string, string | number | undefined>; data?: unknown };
}

/** Octokit's RequestError, by its name: errors already translated by an inner call (a token request) pass as they are. */
function isHttpError(error: unknown): error is HttpError {
  return (
    error instanceof Error && error.name === 'HttpError' && typeof (error as Partial<HttpError>).status === 'number'
  );
}

function githubMessage(error: HttpError): string {
  const data = error.response?.data as { message?: unknown } | undefined;
  return typeof data?.message === 'string' ? data.message : error.message;
}

const HINTS: Record<number, string> = {
  401: 'check the app id and private key, and that the installation still exists',
  403: 'the app may lack a permission this needs; check its permissions in the app settings on GitHub',
  404: 'the app may not be installed on the repository, or the repository or object does not exist',
};

interface HookContext {
  options: GitHubRetryOptions;
  logger: Logger;
  metrics: GitHubMetrics | undefined;
  gate(key: string): RateLimitGate;
}

/**
 * The request hook: one gate per rate-limit budget, bounded retries with backoff, named errors. It wraps Octokit's
 * auth hook, so a retried request is re-authenticated and a token request is itself guarded.
 */
function retryingRequests(ctx: HookContext) {
  return (octokit: Octokit, octokitOptions: { auth?: { installationId?: number } }): void => {
    const installationId = octokitOptions.auth?.installationId;
    octokit.hook.wrap('request', async (request, endpoint) => {
      // Routes are templates (`/repos/{owner}/{repo}`) except for URLs followed from `Link` headers.
      const route = endpoint.url.replace(endpoint.baseUrl, '').split('?')[0]!;
      const op = `${endpoint.method} ${route}`;
      const budget = installationId === undefined || APP_ROUTE.test(route) ? 'app' : String(installationId);
      const gate = ctx.gate(budget);
      const backoff = new Backoff(ctx.options.backoffBaseMs, ctx.options.backoffCapMs);
      for (let attempt = 1; ; attempt++) {
        await gate.wait();
        try {
          const response = await request(endpoint);
          observe(ctx, gate, op, response.status, response.headers);
          return response;
        } catch (error) {
          if (!isHttpError(error) || error.status < 400) throw error;
          const headers = error.response?.headers ?? {};
          observe(ctx, gate, op, error.status, headers);
          const message = githubMessage(error);
          const kind = classifyFailure(error.status, headers, message);
          if (kind === 'fatal') {
            const hint = HINTS[error.status];
            const text = `GitHub refused ${op} (${error.status}): ${message}${hint ? ` — ${hint}` : ''}`;
            throw new GitHubApiError(text, op, error.status, message, { cause: error });
          }
          const waitMs = retryDelayMs(kind, headers, backoff, ctx.options);
          if (attempt >= ctx.options.maxAttempts || waitMs > ctx.options.maxWaitMs) {
            const why =
              attempt >= ctx.options.maxAttempts ? `after ${attempt} attempts` : `(asked to wait ${waitMs} ms)`;
            const text = `GitHub did not serve ${op} ${why}: ${error.status} ${message} (${kind})`;
            throw new GitHubUnavailableError(text, op, error.status, { cause: error });
          }
          ctx.logger.warn({ op, status: error.status, kind, attempt, waitMs }, 'GitHub request failed; retrying');
          await sleep(waitMs);
        }
      }
    });
  };
}

function observe(
  ctx: HookContext,
  gate: RateLimitGate,
  op: string,
  status: number,
  headers: Record<string, string | number | undefined>,
): void {
  ctx.metrics?.calls(op, status);
  const remaining = gate.observe(headers);
  if (remaining !== undefined) ctx.metrics?.rateLimitRemaining(remaining);
}

export class GitHubAppClient {
  private app: App | undefined;
  private appCredentials: GitHubAppCredentials | undefined;
  private readonly makeApp: (credentials: GitHubAppCredentials) => App;
  private readonly credentialSource: GitHubAppClientOptions['credentialSource'];
  private readonly logger: Logger;
  private readonly installations = new LRUCache<string, { id: number | null }>({ max: INSTALLATION_CACHE_MAX });
  private readonly octokits = new Map<number, Promise<Octokit>>();

  constructor(options: GitHubAppClientOptions) {
    this.logger = options.logger.child({ component: 'github-app', app: options.id });
    const retry = { ...DEFAULT_RETRY_OPTIONS, ...options.retry };
    const gates = new Map<string, RateLimitGate>();
    const gate = (key: string): RateLimitGate => {
      let found = gates.get(key);
      if (!found) gates.set(key, (found = new RateLimitGate(retry)));
      return found;
    };
    const hook = retryingRequests({ options: retry, logger: this.logger, metrics: options.metrics, gate });
    const log = {
      debug: (message: string) => this.logger.debug(message),
      info: (message: string) => this.logger.info(message),
      warn: (message: string) => this.logger.warn(message),
      error: (message: string) => this.logger.error(message),
    };
    const ClientOctokit = Octokit.plugin(hook).defaults({
      baseUrl: options.apiUrl.replace(/\/+$/, ''),
      userAgent: `eka-ci (${options.id})`,
      log,
    });
    this.makeApp = (credentials) =>
      new App({ appId: credentials.appId, privateKey: credentials.privateKey, Octokit: ClientOctokit, log });
    this.credentialSource = options.credentialSource;
    if (!this.credentialSource) this.app = this.makeApp(options.credentials);
  }

  /** The App for the current credentials; rotated credentials replace it (and the installation clients made by it). */
  private async currentApp(): Promise<App> {
    if (!this.credentialSource) return this.app!;
    const credentials = await this.credentialSource.current();
    if (!this.app || credentials !== this.appCredentials) {
      if (this.app) this.logger.info('app credentials rotated: new tokens are minted with the new ones');
      this.app = this.makeApp(credentials);
      this.appCredentials = credentials;
      this.octokits.clear();
    }
    return this.app;
  }

  /** The installation serving owner/repo (cached; undefined when the app is not installed there). */
  async installationFor(owner: string, repo: string): Promise<number | undefined> {
    const key = `${owner}/${repo}`.toLowerCase();
    const cached = this.installations.get(key);
    if (cached) return cached.id ?? undefined;
    try {
      const op = 'GET /repos/{owner}/{repo}/installation';
      const app = await this.currentApp();
      const { id } = readResponse(installationResponse, op, await app.octokit.request(op, { owner, repo }));
      this.installations.set(key, { id }, { ttl: INSTALLATION_TTL_MS });
      return id;
    } catch (error) {
      if (!(error instanceof GitHubApiError) || error.status !== 404) throw error;
      this.installations.set(key, { id: null }, { ttl: NOT_INSTALLED_TTL_MS });
      return undefined;
    }
  }

  /** Drops what is known about installations, after an `installation` or `installation_repositories` webhook. */
  forgetInstallations(): void {
    this.installations.clear();
  }

  /** An Octokit authenticated as the installation (tokens are cached and renewed before expiry by @octokit/app). */
  octokit(installationId: number): Promise<Octokit> {
    if (this.credentialSource) return this.currentApp().then((app) => this.installationOctokit(app, installationId));
    return this.installationOctokit(this.app!, installationId);
  }

  private installationOctokit(app: App, installationId: number): Promise<Octokit> {
    let octokit = this.octokits.get(installationId);
    if (!octokit) {
      octokit = app.getInstallationOctokit(installationId);
      // A failed first token request must not be remembered: the next call tries again.
      void octokit.catch(() => this.octokits.delete(installationId));
      this.octokits.set(installationId, octokit);
    }
    return octokit;
  }

  /** Credentials for cloning over HTTPS: { username: 'x-access-token', password: <installation token> }. */
  async cloneAuth(installationId: number): Promise<{ username: string; password: string }> {
    type TokenAuth = { token: string; expiresAt: string };
    const app = await this.currentApp();
    let auth = (await app.octokit.auth({ type: 'installation', installationId })) as TokenAuth;
    if (Date.parse(auth.expiresAt) - Date.now() < CLONE_TOKEN_MIN_VALIDITY_MS) {
      auth = (await app.octokit.auth({ type: 'installation', installationId, refresh: true })) as TokenAuth;
    }
    return { username: 'x-access-token', password: auth.token };
  }
}
