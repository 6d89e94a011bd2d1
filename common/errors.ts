/**
 * Every error eka-ci raises on purpose, each with a stable code. Users search for the code; the message says
 * what went wrong and what to do about it.
 */
export class EkaciError extends Error {
  constructor(
    readonly code: string,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** A configuration file or flag is invalid: unknown key, wrong type, unreadable file. */
export class ConfigError extends EkaciError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EKACI_ERR_CONFIG', message, options);
  }
}

/** A command-line invocation is malformed (missing argument, unknown option, unusable value). */
export class UsageError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_USAGE', message);
  }
}

/** Nix could not evaluate what the user asked for: missing file, missing attribute, not a derivation. */
export class EvaluationError extends EkaciError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EKACI_ERR_EVALUATION', message, options);
  }
}

/** A Nix command exited unsuccessfully where eka-ci needed it to work (copy, path-info, show-config). */
export class NixCommandError extends EkaciError {
  constructor(
    message: string,
    readonly exitCode: number | null,
    readonly stderr: string,
  ) {
    super('EKACI_ERR_NIX_COMMAND', message);
  }
}

/** A `.drv` file is not valid ATerm as Nix writes it. */
export class DerivationParseError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_DRV_PARSE', message);
  }
}

/** An agent's protocol major version differs from the coordinator's. */
export class ProtocolMismatchError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_PROTOCOL_MISMATCH', message);
  }
}

/** The agent's token is unknown or revoked. Create one with `ekaci-coordinator agent-token create NAME`. */
export class AuthError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_AUTH', message);
  }
}

/** A message arrived that the protocol does not allow in the current state (e.g. anything before Hello). */
export class ProtocolError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_PROTOCOL', message);
  }
}

/** A lifecycle method was called in a state that does not allow it. */
export class IllegalStateError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_ILLEGAL_STATE', message);
  }
}

/** An upload to the binary cache was refused or malformed. */
export class CacheError extends EkaciError {
  constructor(message: string) {
    super('EKACI_ERR_CACHE', message);
  }
}

/**
 * Untrusted code cannot be confined on this host: bubblewrap (Linux) or sandbox-exec (macOS) is missing or refuses
 * to start. Install bubblewrap, or allow user namespaces; eka-ci does not run repository code without a sandbox
 * unless the server configuration says so explicitly.
 */
export class SandboxError extends EkaciError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EKACI_ERR_SANDBOX', message, options);
  }
}
