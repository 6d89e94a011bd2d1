import type { OAuthStandIn } from './oauth.js';
/** The public shapes of the GitHub stand-in: what tests put in, and what they read back. */

/** One request as the stand-in saw it, whether it was valid, refused, failed on purpose, or served. */
export interface RecordedRequest {
  method: string;
  /** The request path without the query string, e.g. `/repos/o/r/check-runs/1`. */
  path: string;
  query: Record<string, string>;
  /** The parsed JSON body, or undefined when there was none. */
  body: unknown;
  /** The operation of GitHub's OpenAPI description the request matched (`checks/create`), if any. */
  operationId: string | undefined;
  status: number;
  auth: 'app-jwt' | 'installation' | 'none';
  installationId?: number;
  /** `Date.now()` when the request arrived. */
  at: number;
}

export interface InvalidRequest extends RecordedRequest {
  /** Why the request does not conform to GitHub's OpenAPI description. */
  errors: string[];
}

export interface StandInRepo {
  owner: string;
  name: string;
  installationId: number;
  private?: boolean;
  defaultBranch?: string;
  cloneUrl?: string;
  id?: number;
}

export interface StandInPull {
  number: number;
  title: string;
  user: string;
  authorAssociation: string;
  headSha: string;
  headRef: string;
  /** `owner/name` of the head repository when the pull request comes from a fork. */
  headRepo?: string;
  baseSha: string;
  baseRef: string;
  draft?: boolean;
  state?: 'open' | 'closed';
  mergeable?: boolean;
  commits?: Array<{ sha: string; message: string }>;
}

export interface StandInCheckRun {
  id: number;
  /** `owner/name`. */
  repo: string;
  headSha: string;
  name: string;
  status: string;
  conclusion: string | null;
  output: { title?: string; summary?: string; text?: string };
  detailsUrl?: string;
  actions: unknown[];
  externalId?: string;
  /** How many times the check run was PATCHed. */
  updates: number;
}

export type Permission = 'admin' | 'maintain' | 'write' | 'triage' | 'read' | 'none';

export interface StandInComment {
  id: number;
  body: string;
  user: string;
}

export interface StandInMerge {
  number: number;
  method: string;
  sha?: string;
}

export interface FailureResponse {
  status: number;
  headers?: Record<string, string>;
  body?: unknown;
}

export interface GitHubStandIn {
  /** API base, e.g. `http://127.0.0.1:PORT`; pass it as the GitHub App's `api_url`. */
  readonly url: string;
  readonly appId: number;
  /** PEM (PKCS#1, as GitHub hands them out) of a fresh RSA key generated at start. */
  readonly privateKey: string;
  /** GitHub's OAuth web flow: client id and secret to configure, and who the browser is signed in as. */
  readonly oauth: OAuthStandIn;
  readonly requests: RecordedRequest[];
  readonly invalid: InvalidRequest[];
  addInstallation(id: number, account: string): void;
  addRepo(repo: StandInRepo): void;
  addPull(repo: string, pull: StandInPull): void;
  /** Changes a pull request as a push to it or an edit would. */
  updatePull(repo: string, number: number, change: Partial<StandInPull>): void;
  setPermission(repo: string, login: string, permission: Permission): void;
  checkRuns(repo: string, headSha?: string): StandInCheckRun[];
  comments(repo: string, issueNumber: number): StandInComment[];
  reactions(repo: string, commentId: number): string[];
  merges(repo: string): StandInMerge[];
  /** The next `count` requests matching method and path prefix get this response instead (rate limits, 5xx). */
  failNext(match: { method?: string; pathPrefix: string }, response: FailureResponse, count?: number): void;
  /**
   * Sets the rate-limit budget that the `x-ratelimit-*` headers of every response report. Each request spends one;
   * once none is left, requests are refused with GitHub's primary rate-limit 403 until `resetEpochSeconds`, when the
   * budget refills.
   */
  setRateLimit(remaining: number, resetEpochSeconds: number): void;
  /** Polls the predicate until it returns a value other than undefined/false; rejects naming `what` after 60 s. */
  waitFor<T>(predicate: () => T | undefined | false, what: string): Promise<T>;
  close(): Promise<void>;
}
