/**
 * A stand-in for api.github.com as a GitHub App sees it, on loopback. Every request is checked against GitHub's
 * published OpenAPI description: an unknown path gets GitHub's 404, a request that breaks the description gets
 * GitHub's 422, and both land in `invalid` with the reasons, so a test ends with `expect(standIn.invalid).toEqual([])`.
 *
 * Requests then pass, in order: injected failures (`failNext`), the rate-limit budget, authentication (app JWT or
 * installation token, as the operation needs), the installation's repository scope, and the operation's handler.
 * Operations that conform but are not implemented get 501 naming the operation.
 */
import { randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { AppAuth, generateAppKey, type Credential } from './github-standin/app-auth.js';
import type { Reply } from './github-standin/endpoint-kit.js';
import { ENDPOINTS } from './github-standin/endpoints.js';
import { validateRequest, type MatchedOperation } from './github-standin/openapi.js';
import { StandInState } from './github-standin/state.js';
import { OAuthStandIn } from './github-standin/oauth.js';
import type { FailureResponse, GitHubStandIn, InvalidRequest, RecordedRequest } from './github-standin/types.js';

export type * from './github-standin/types.js';
export {
  allWebhookExamples,
  deliverWebhook,
  postWebhook,
  signWebhook,
  webhookExamples,
} from './github-standin/webhooks.js';

const DEFAULT_APP_ID = 4242;
const APP_SLUG = 'eka-ci-test';
// GitHub's hourly budget for an installation, and the window after which it refills.
const RATE_LIMIT = 5000;
const RATE_LIMIT_WINDOW_SECONDS = 3600;
// waitFor polls this often; it is a loopback test, so a short interval costs nothing.
const WAIT_POLL_MS = 10;
// waitFor gives up after this long: far beyond anything a healthy test waits for, it only turns a hang into a message.
const WAIT_GUARD_MS = 60_000;
const DOCS = 'https://docs.github.com/rest';

/** GitHub's 401 message when an endpoint is called with the other kind of credential, or none. */
function requiredAuthMessage(kind: 'app-jwt' | 'installation'): string {
  return kind === 'app-jwt'
    ? 'A JSON web token could not be decoded'
    : 'You must authenticate with an installation access token in order to use this endpoint';
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (chunk: Buffer) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

class StandIn implements GitHubStandIn {
  readonly requests: RecordedRequest[] = [];
  readonly invalid: InvalidRequest[] = [];
  readonly privateKey: string;
  url = '';
  private readonly state: StandInState;
  /** GitHub's OAuth web flow, for logging in to eka-ci's web UI. */
  readonly oauth = new OAuthStandIn();
  private readonly auth: AppAuth;
  private readonly server = createServer((req, res) => void this.serve(req, res));
  private readonly failures: Array<{ method?: string; pathPrefix: string; response: FailureResponse; left: number }> =
    [];
  private remaining = RATE_LIMIT;
  private resetAt = Math.floor(Date.now() / 1000) + RATE_LIMIT_WINDOW_SECONDS;

  constructor(readonly appId: number) {
    const { privateKey, publicKey } = generateAppKey();
    this.privateKey = privateKey;
    this.auth = new AppAuth(appId, publicKey);
    this.state = new StandInState(appId, APP_SLUG);
  }

  async listen(): Promise<void> {
    this.server.listen(0, '127.0.0.1');
    await new Promise<void>((resolve) => this.server.once('listening', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  addInstallation(id: number, account: string): void {
    this.state.addInstallation(id, account);
  }
  addRepo(repo: Parameters<GitHubStandIn['addRepo']>[0]): void {
    this.state.addRepo(repo);
  }
  addPull(repo: string, pull: Parameters<GitHubStandIn['addPull']>[1]): void {
    this.state.addPull(repo, pull);
  }

  updatePull(repo: string, number: number, change: Parameters<StandInState['updatePull']>[2]): void {
    this.state.updatePull(repo, number, change);
  }
  setPermission(repo: string, login: string, permission: Parameters<GitHubStandIn['setPermission']>[2]): void {
    this.state.setPermission(repo, login, permission);
  }
  checkRuns(repo: string, headSha?: string): ReturnType<GitHubStandIn['checkRuns']> {
    return this.state
      .checkRunsOf(repo, headSha)
      .map(({ startedAt: _s, completedAt: _c, ...run }) => structuredClone(run));
  }
  comments(repo: string, issueNumber: number): ReturnType<GitHubStandIn['comments']> {
    return this.state.commentsOn(repo, issueNumber).map(({ id, body, user }) => ({ id, body, user }));
  }
  reactions(repo: string, commentId: number): string[] {
    return this.state.reactionsTo(repo, commentId).map((r) => r.content);
  }
  merges(repo: string): ReturnType<GitHubStandIn['merges']> {
    return this.state.mergesOf(repo).map((m) => ({ ...m }));
  }

  failNext(match: { method?: string; pathPrefix: string }, response: FailureResponse, count = 1): void {
    this.failures.push({ ...match, method: match.method?.toUpperCase(), response, left: count });
  }

  setRateLimit(remaining: number, resetEpochSeconds: number): void {
    this.remaining = remaining;
    this.resetAt = resetEpochSeconds;
  }

  async waitFor<T>(predicate: () => T | undefined | false, what: string): Promise<T> {
    const deadline = Date.now() + WAIT_GUARD_MS;
    for (;;) {
      const value = predicate();
      if (value !== undefined && value !== false) return value;
      if (Date.now() > deadline) throw new Error(`GitHub stand-in: gave up waiting for ${what}`);
      await new Promise((resolve) => setTimeout(resolve, WAIT_POLL_MS));
    }
  }

  async close(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.server.closeAllConnections();
    await closed;
  }

  private async serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const at = Date.now();
    const url = new URL(req.url ?? '/', 'http://stand-in');
    const method = (req.method ?? 'GET').toUpperCase();
    const query = Object.fromEntries(url.searchParams);
    const record: RecordedRequest = {
      method,
      path: url.pathname,
      query,
      body: undefined,
      operationId: undefined,
      status: 0,
      auth: 'none',
      at,
    };
    this.requests.push(record);
    let reply: Reply;
    try {
      reply = await this.dispatch(req, record);
    } catch (error) {
      // A defect of the stand-in itself fails the test through `invalid`, instead of looking like a GitHub outage.
      const message = `stand-in failed: ${String(error)}`;
      reply = { status: 500, body: { message }, errors: [message] };
    }
    record.status = reply.status;
    if (reply.errors?.length) this.invalid.push({ ...record, errors: reply.errors });
    res.writeHead(reply.status, {
      'content-type': 'application/json; charset=utf-8',
      'x-github-media-type': 'github.v3; format=json',
      'x-github-request-id': randomUUID(),
      'x-ratelimit-limit': String(RATE_LIMIT),
      'x-ratelimit-remaining': String(this.remaining),
      'x-ratelimit-reset': String(this.resetAt),
      'x-ratelimit-used': String(Math.max(0, RATE_LIMIT - this.remaining)),
      'x-ratelimit-resource': 'core',
      ...reply.headers,
    });
    res.end(reply.body === undefined ? '' : JSON.stringify(reply.body));
  }

  /** Parses and validates the request, then applies injected failures and the rate-limit budget. */
  private async dispatch(req: IncomingMessage, record: RecordedRequest): Promise<Reply> {
    const raw = await readBody(req);
    if (raw.length > 0) {
      try {
        record.body = JSON.parse(raw);
      } catch {
        const body = { message: 'Problems parsing JSON', documentation_url: DOCS };
        return { status: 400, body, errors: ['body is not JSON'] };
      }
    }
    const oauth = this.oauth.handle(record.method, record.path, record.query, record.body, req.headers.authorization);
    if (oauth) return oauth;
    const credential = this.auth.identify(req.headers.authorization);
    record.auth = credential.kind;
    if (credential.kind === 'installation' && credential.installationId !== undefined) {
      record.installationId = credential.installationId;
    }
    const { operation, errors } = validateRequest(record.method, record.path, record.query, record.body);
    record.operationId = operation?.operationId;
    const docs = operation?.documentationUrl ?? DOCS;
    if (!operation) return { status: 404, body: { message: 'Not Found', documentation_url: docs }, errors };
    if (errors.length) {
      const message = `Invalid request.\n\n${errors.join('\n')}`;
      return { status: 422, body: { message, documentation_url: docs, status: '422' }, errors };
    }
    const failure = this.takeFailure(record.method, record.path);
    if (failure) {
      const body = failure.body ?? { message: 'stand-in failure' };
      return { status: failure.status, body, headers: failure.headers };
    }
    const limited = this.spendRateLimit(record.installationId);
    const reply = limited ?? this.serveOperation(operation, credential, record);
    const body = reply.status >= 400 ? { ...(reply.body as object), documentation_url: docs } : reply.body;
    return { ...reply, body };
  }

  /** Authenticates the request as its operation needs, scopes it to the installation, and runs the handler. */
  private serveOperation(operation: MatchedOperation, credential: Credential, record: RecordedRequest): Reply {
    const endpoint = ENDPOINTS[operation.operationId];
    if (!endpoint) return { status: 501, body: { message: `stand-in does not implement ${operation.operationId}` } };
    const credentialError = 'error' in credential ? credential.error : undefined;
    if (credential.kind !== endpoint.auth || credentialError !== undefined) {
      return { status: 401, body: { message: credentialError ?? requiredAuthMessage(endpoint.auth) } };
    }
    const params = operation.pathParams;
    let repo;
    if (endpoint.auth === 'installation' && params.owner !== undefined && params.repo !== undefined) {
      repo = this.state.repo(`${params.owner}/${params.repo}`);
      if (!repo || repo.installationId !== record.installationId)
        return { status: 404, body: { message: 'Not Found' } };
    }
    const { query, body, installationId } = record;
    return endpoint.handle({
      api: this.url,
      state: this.state,
      auth: this.auth,
      params,
      query,
      body,
      installationId,
      repo,
    });
  }

  private takeFailure(method: string, path: string): FailureResponse | undefined {
    const failure = this.failures.find(
      (f) => f.left > 0 && (f.method === undefined || f.method === method) && path.startsWith(f.pathPrefix),
    );
    if (!failure) return undefined;
    failure.left -= 1;
    return failure.response;
  }

  /** Spends one request of the budget, refilling it once the window has passed; a 403 like GitHub's when spent. */
  private spendRateLimit(installationId: number | undefined): Reply | undefined {
    const nowSeconds = Math.floor(Date.now() / 1000);
    if (nowSeconds >= this.resetAt) {
      this.remaining = RATE_LIMIT;
      this.resetAt = nowSeconds + RATE_LIMIT_WINDOW_SECONDS;
    }
    if (this.remaining > 0) {
      this.remaining -= 1;
      return undefined;
    }
    const who = installationId === undefined ? 'this app' : `installation ID ${installationId}`;
    return { status: 403, body: { message: `API rate limit exceeded for ${who}.` } };
  }
}

/** Starts a stand-in on a loopback port chosen by the OS, with a fresh app key. */
export async function startGitHubStandIn(options: { appId?: number } = {}): Promise<GitHubStandIn> {
  const standIn = new StandIn(options.appId ?? DEFAULT_APP_ID);
  await standIn.listen();
  return standIn;
}
