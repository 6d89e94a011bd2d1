import { status } from '@grpc/grpc-js';
import { Outcome } from './proto/ekaci/agent/v1/agent.js';

/**
 * The one place that decides what is worth trying again. Nothing else in eka-ci inspects gRPC status codes or
 * Nix exit codes.
 */
export type Disposition = 'retry' | 'fatal';

/** How an agent treats a failed `Connect` stream: reconnect with backoff, or stop because retrying cannot help. */
export function grpcStatusDisposition(code: status): Disposition {
  switch (code) {
    case status.UNAUTHENTICATED: // token unknown or revoked: a new connection would be refused the same way
    case status.PERMISSION_DENIED:
    case status.FAILED_PRECONDITION: // protocol major mismatch
    case status.INVALID_ARGUMENT:
    case status.UNIMPLEMENTED:
      return 'fatal';
    default:
      return 'retry';
  }
}

/** Whether a fatal stream status means the coordinator refused the agent's token (unknown, revoked, not allowed). */
export function isTokenRefusal(code: status): boolean {
  return code === status.UNAUTHENTICATED || code === status.PERMISSION_DENIED;
}

// ErrorReply codes that a new connection would receive again until someone changes an installation or a
// configuration: a protocol major mismatch, a refused agent, a message the coordinator cannot accept.
const FATAL_REPLY_CODES = new Set([
  'EKACI_ERR_PROTOCOL_MISMATCH',
  'EKACI_ERR_AUTH',
  'EKACI_ERR_PROTOCOL',
  'EKACI_ERR_CONFIG',
]);

/**
 * How an agent treats an `ErrorReply` on its `Connect` stream. Unknown codes are retried: a coordinator that is
 * starting up, or still holds the agent's previous stream, refuses only for a moment.
 */
export function errorReplyDisposition(code: string): Disposition {
  return FATAL_REPLY_CODES.has(code) ? 'fatal' : 'retry';
}

// Nix 2.x exit status for failed builds: 100 plus bit flags (1 = timed out, 2 = hash mismatch, 4 = check mismatch).
const NIX_BUILD_FAILURE_BASE = 100;
const NIX_TIMED_OUT_BIT = 1;

// Log lines that betray a machine problem rather than a broken derivation.
const INFRA_PATTERNS = [
  /No space left on device/i,
  /cannot allocate memory/i,
  /unable to download/i,
  /Couldn't resolve host|Could not resolve host|Connection refused|Connection reset/i,
  /some substitutes for the outputs of derivation .* failed/i,
  /path '.*' is required, but there is no substituter that can build it/i,
  /database or disk is full/i,
];

/**
 * Maps how `nix-store --realise` ended to a build outcome. A builder failure is final; anything that points at
 * the machine (Nix itself failing, disk full, a cache unreachable, a killing signal) is an infrastructure error
 * that is retried on another agent.
 */
export function nixBuildOutcome(exitCode: number | null, signal: string | null, logTail: string): Outcome {
  if (exitCode === 0) return Outcome.OUTCOME_SUCCEEDED;
  if (INFRA_PATTERNS.some((re) => re.test(logTail))) return Outcome.OUTCOME_INFRA_ERROR;
  if (exitCode !== null && exitCode >= NIX_BUILD_FAILURE_BASE && exitCode < NIX_BUILD_FAILURE_BASE + 8) {
    return (exitCode - NIX_BUILD_FAILURE_BASE) & NIX_TIMED_OUT_BIT ? Outcome.OUTCOME_TIMED_OUT : Outcome.OUTCOME_FAILED;
  }
  if (signal !== null || exitCode === null) return Outcome.OUTCOME_INFRA_ERROR;
  // Exit 1 is Nix's generic error: it could not even start the build (bad store, missing .drv, daemon gone).
  return Outcome.OUTCOME_INFRA_ERROR;
}

/** Whether a finished attempt is retried on another agent. */
export function outcomeDisposition(outcome: Outcome): Disposition {
  return outcome === Outcome.OUTCOME_INFRA_ERROR ? 'retry' : 'fatal';
}
