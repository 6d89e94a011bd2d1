import { EkaciError } from '../../common/errors.js';

/**
 * A GitHub App's credentials cannot be resolved: the environment variable, file or systemd credential is missing or
 * unreadable, the app id is not a positive integer, or the private key is not an RSA private key in PEM form. The
 * message names the app and where the credentials were looked for, never their content.
 */
export class GitHubCredentialsError extends EkaciError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EKACI_ERR_GITHUB_CREDENTIALS', message, options);
  }
}

/**
 * GitHub refused a request in a way that retrying cannot fix (401, 403 without a rate limit, 404, 409, 422, …). The
 * message names the operation and quotes GitHub; a 401 usually means a wrong app id or private key, a 403 a
 * permission the app was not granted, a 404 a repository the app is not installed on.
 */
export class GitHubApiError extends EkaciError {
  constructor(
    message: string,
    readonly operation: string,
    readonly status: number,
    readonly githubMessage: string,
    options?: { cause?: unknown; code?: string },
  ) {
    super(options?.code ?? 'EKACI_ERR_GITHUB_API', message, options);
  }
}

/**
 * GitHub answered a request with success but not in the shape its API describes (an object where a list belongs, a
 * field missing or of another type): an incident at GitHub, a proxy in between that answers for it, or a change of
 * the API. The message names the operation, what eka-ci expected and what came. A GitHubApiError, so whatever handles
 * GitHub's refusals handles this too: the operation fails with the message instead of a TypeError deep inside.
 */
export class GitHubResponseError extends GitHubApiError {
  constructor(
    message: string,
    operation: string,
    status: number,
    readonly expected: string,
  ) {
    super(message, operation, status, message, { code: 'EKACI_ERR_GITHUB_RESPONSE' });
  }
}

/**
 * GitHub kept failing (5xx, unreachable) or rate-limiting a request through every retry, or asked eka-ci to wait
 * longer than it is willing to. Nothing is wrong with the request; try again later and check githubstatus.com.
 */
export class GitHubUnavailableError extends EkaciError {
  constructor(
    message: string,
    readonly operation: string,
    readonly status: number,
    options?: { cause?: unknown },
  ) {
    super('EKACI_ERR_GITHUB_UNAVAILABLE', message, options);
  }
}

/**
 * A check run was described in a way GitHub would refuse and clipping cannot repair: a conclusion missing from a
 * completed check run (or given to one that is not), more than three actions, or an action identifier longer than
 * GitHub's 20 characters (the identifier comes back in webhooks, so it is never shortened). A bug in eka-ci.
 */
export class CheckRunSpecError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_CHECK_RUN_SPEC', message);
  }
}

/**
 * A webhook payload lacks a field eka-ci needs, or has it in the wrong shape: the delivery is marked failed with
 * this message (naming the event and the field) and nothing is done for it. Not retried: the payload will not change.
 */
export class MalformedPayloadError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_GITHUB_PAYLOAD', message);
  }
}

// Errors kept in a row are for a person reading it, not a full stack dump.
const MAX_RECORDED_ERROR_CHARS = 4_000;

/** An error as `webhook_deliveries` and `check_runs` record it: its name and message, cut to a readable length. */
export function recordedError(err: unknown): string {
  const text = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  return text.length > MAX_RECORDED_ERROR_CHARS ? `${text.slice(0, MAX_RECORDED_ERROR_CHARS)}…` : text;
}
