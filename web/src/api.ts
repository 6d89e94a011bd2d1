/**
 * The UI's side of /api/v1 (coordinator/http/openapi.ts is the contract; the types below mirror its schemas). The
 * credential is an API token kept in the browser's localStorage, sent as `Authorization: Bearer`.
 */

import type { BuildState } from '../../coordinator/scheduler/build-state.js';

export const TOKEN_KEY = 'ekaci.token';
export const API = '/api/v1';

export type { BuildState } from '../../coordinator/scheduler/build-state.js';

export type AttemptState =
  'assigned' | 'accepted' | 'started' | 'succeeded' | 'failed' | 'timed-out' | 'infra-error' | 'cancelled' | 'lost';

/** States after which a derivation changes only when something else happens (a rebuild, a capable agent). */
export { TERMINAL_STATES as SETTLED_STATES } from '../../coordinator/scheduler/build-state.js';
export const OPEN_ATTEMPT_STATES: ReadonlySet<AttemptState> = new Set(['assigned', 'accepted', 'started']);

export interface Derivation {
  drv_path: string;
  system: string;
  required_features?: string;
  is_fod?: 0 | 1;
  untrusted?: 0 | 1;
  state: BuildState;
  attempts: number;
  root_cause: string | null;
  error: string | null;
  agent_id: string | null;
}

export interface Output {
  name: string;
  path: string;
  nar_size: number | null;
  closure_size: number | null;
}

export interface Attempt {
  lease_id: string;
  attempt: number;
  agent_id: string;
  state: AttemptState;
  assigned_at: number;
  started_at?: number | null;
  finished_at?: number | null;
  error?: string | null;
  log_bytes: number;
  cancel_reason?: string | null;
  log_truncated?: 0 | 1;
}

export interface Neighbours {
  count: number;
  derivations: Array<{ drvPath: string; state: BuildState | null }>;
}

export interface DerivationDetail {
  derivation: Derivation;
  outputs: Output[];
  attempts: Attempt[];
  dependencies: Neighbours;
  dependents: Neighbours;
}

export interface Agent {
  id: string;
  hostname: string;
  os: string;
  systems: string[];
  supportedFeatures: string[];
  mandatoryFeatures: string[];
  maxJobs: number;
  nixVersion: string;
  sandboxed: boolean;
  lastSeen: number;
  connected: boolean;
  freeSlots: number;
  draining: boolean;
  /** An operator's drain: no new work until resumed. */
  drained: { at: number; by: string | null; reason: string | null } | null;
  leases: Array<{ leaseId: string; drvPath: string; attempt: number; expiresAt: number }>;
}

export interface Lane {
  kind: 'build' | 'fixed-output';
  system: string;
  features: string[];
  untrusted: boolean;
  buildable: number;
  waitingSince: number;
  agents: string[];
  why?: string;
}

export interface Queues {
  pending: number;
  lanes: Lane[];
}

export type RunState = 'queued' | 'awaiting-approval' | 'evaluating' | 'building' | 'done' | 'cancelled' | 'failed';

export interface Run {
  id: number;
  kind: 'pull_request' | 'push' | 'merge_group';
  prNumber: number | null;
  baseSha: string | null;
  headSha: string;
  state: RunState;
  error: string | null;
  untrusted: boolean;
  createdAt: number;
  updatedAt: number;
  rebuildCountBySystem: Record<string, number> | null;
  /** The review's counts (Review.summary), once built. */
  review: Record<string, number> | null;
}

export interface Repository {
  name: string;
  github: boolean;
  private: boolean;
  defaultBranch: string | null;
  openPullRequests: number;
  lastEvaluatedAt: number | null;
}

export interface PullRequest {
  number: number;
  title: string;
  author: string;
  state: 'open' | 'closed';
  draft: boolean;
  headSha: string;
  baseSha: string;
  baseRef: string;
  updatedAt: number;
  rebuilds: number;
  newlyFailing: number | null;
  run: Run | null;
  review: string | null;
}

export type PullSort = 'updated' | 'rebuilds' | 'failing';

export interface SizePoint {
  commit: string;
  job: string;
  evaluatedAt: number;
  drvPath: string | null;
  system: string | null;
  error: string | null;
  state: BuildState | null;
  outputs: Array<{ name: string; narSize: number | null; closureSize: number | null }>;
}

/** GET /runs/{id}/timeline: every build of a run, and the chain of builds that decided how long it took. */
export interface Timeline {
  run: Run;
  closure: number;
  truncated: boolean;
  builds: TimelineBuild[];
  criticalPath: string[];
}

export interface TimelineBuild {
  drvPath: string;
  attr: string | null;
  attempt: number;
  agentId: string;
  state: AttemptState;
  assignedAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  critical: boolean;
}

/** What GET /events sends (`build`, `run`, `agent`, `check`; coordinator/events.ts). */
export type CoordinatorEvent =
  | { type: 'build'; drvPath: string; state: BuildState; attempt: number; agentId: string | null }
  | { type: 'run'; id: number; repo: string; kind: string; prNumber: number | null; headSha: string; state: RunState }
  | { type: 'agent'; id: string; connected: boolean; drained: boolean }
  | { type: 'check'; repo: string; commit: string; name: string; system: string; state: string };

/** A read a page makes once and keeps by key (across redraws), for data that changes only when an event says so. */
export type Memo = <T>(key: string, load: () => Promise<T>) => Promise<T>;

/** The `end` event of a followed log. */
export interface EndOfLog {
  attempt: number;
  attemptState: AttemptState | null;
  state: BuildState | null;
  error?: string | null;
  bytes: number;
  truncated: boolean;
}

/** A response that is not what was asked for, with the API's error code and message. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export function token(): string | undefined {
  try {
    return localStorage.getItem(TOKEN_KEY) ?? undefined;
  } catch {
    return undefined;
  }
}

export function authHeaders(): Record<string, string> {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

/** Fetches from the API with the credential; throws an ApiError for any status but those in `accept`. */
export async function apiFetch(
  path: string,
  init: RequestInit = {},
  accept: readonly number[] = [],
): Promise<Response> {
  const response = await fetch(`${API}${path}`, {
    ...init,
    headers: { ...authHeaders(), ...(init.headers as Record<string, string> | undefined) },
  });
  if (response.ok || accept.includes(response.status)) return response;
  throw await errorOf(response);
}

export async function getJson<T>(path: string, signal?: AbortSignal): Promise<T> {
  const response = await apiFetch(path, signal ? { signal } : {});
  return (await response.json()) as T;
}

/**
 * Every request that changes something (cancel, rebuild, drain, resume) goes through here, and only here: the one
 * place that adds what such a request needs besides the credential. Throws an ApiError with the API's message.
 */
export async function postAction<T>(path: string, body?: object): Promise<T> {
  const init: RequestInit = { method: 'POST' };
  // A login session (a cookie) proves itself on a change with its CSRF token; a token in a header needs none.
  const csrf = (await me()).csrfToken;
  const headers: Record<string, string> = csrf ? { 'X-CSRF-Token': csrf } : {};
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  }
  init.headers = headers;
  const response = await apiFetch(path, init);
  return (await response.json()) as T;
}

/** Who the page's user is to the coordinator (`GET /api/v1/me`). */
export interface Me {
  kind: 'anonymous' | 'agent' | 'api' | 'user';
  name: string | null;
  admin: boolean;
  csrfToken: string | null;
  /** Where to log in with GitHub, when the coordinator offers it. */
  login: string | null;
}

let asked: Promise<Me> | undefined;

/** The caller, asked once per page load (a login or logout reloads the page). */
export function me(): Promise<Me> {
  asked ??= apiFetch('/me').then(
    (r) => r.json() as Promise<Me>,
    () => ({ kind: 'anonymous', name: null, admin: false, csrfToken: null, login: null }),
  );
  return asked;
}

export async function errorOf(response: Response): Promise<ApiError> {
  let code = 'EKACI_ERR_HTTP';
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = (await response.json()) as { error?: { code?: string; message?: string } };
    code = body.error?.code ?? code;
    message = body.error?.message ?? message;
  } catch {
    // Not the API's JSON (a proxy's page): the status says enough.
  }
  return new ApiError(response.status, code, message);
}
