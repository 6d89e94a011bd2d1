import { statSync, readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, UsageError } from '../common/errors.js';
import { LOG_CHUNK_BYTES } from '../common/grpc-options.js';
import { createLogger, type Logger } from '../common/logging.js';
import { HOST_DAEMON_SOCKET } from './nix/store-access.js';

// First reconnect after a blip comes quickly; the cap spreads a fleet that lost a restarting coordinator over
// half a minute instead of letting it arrive at once (jitter does the rest).
const DEFAULT_BACKOFF_BASE_MS = 500;
const DEFAULT_BACKOFF_CAP_MS = 30_000;

// Grace for cancels the agent decides itself (a lease dropped at reconnect or not renewed): time for Nix to stop
// its builder and release its locks before SIGKILL.
const DEFAULT_LOCAL_CANCEL_GRACE_MS = 10_000;

// Plain `/bin/sh` builders (the only kind without nixpkgs) need the shell, its libraries and the programs they call;
// nothing here is a secret of the host.
export const DEFAULT_SANDBOX_PATHS = ['/bin', '/usr/bin?', '/lib?', '/lib64?', '/usr/lib?'];

// stopNow() is for "stop now": a short grace still lets Nix kill its builders (they run in sessions of their own
// and outlive a SIGKILLed nix-store).
const DEFAULT_STOP_NOW_GRACE_MS = 3_000;

// How long a graceful stop (the first SIGTERM) lets running builds finish and report before it stops them: inside
// the 120 s that the systemd units and the launchd plist give the agent to exit, with room for stopNowGraceMs.
const DEFAULT_DRAIN_GRACE_MS = 100_000;
// A coordinator restarting (an upgrade, a crash) is back within seconds; two minutes covers a slow start.
const DEFAULT_CACHE_WAIT_MS = 120_000;

// A check's memory, where cgroups allow: enough for a compiler, a language server or a test runner of a large
// repository, while a runaway check cannot take the builder's memory from the builds beside it.
const DEFAULT_CHECK_MEMORY_MIB = 4096;
// A check's processes and threads together, where cgroups allow: far beyond a parallel test suite, and a fork bomb
// stops there instead of at the host's pid_max.
const DEFAULT_CHECK_MAX_PROCESSES = 1024;

// How long a graceful stop waits for the coordinator to end the stream after the agent half-closed it. Everything
// is acknowledged by then; the status only confirms it, so the wait is short.
const DEFAULT_CLOSE_TIMEOUT_MS = 2_000;

/** The agent's configuration, validated and complete: nothing reads raw flags or files after this. */
export interface AgentOptions {
  /** The coordinator's gRPC endpoint, `host:port`. */
  coordinator: string;
  token: string;
  /**
   * The coordinator names an agent by its token; this may stay empty or repeat the token's name (a Hello naming
   * another agent is refused).
   */
  agentId: string;
  /** `null` takes Nix's `max-jobs`. */
  maxJobs: number | null;
  /** `null` takes Nix's `system` and `extra-platforms`. */
  systems: string[] | null;
  /** `null` takes Nix's `system-features`. */
  features: string[] | null;
  mandatoryFeatures: string[];
  /**
   * Turn Nix's sandbox on for this agent's builds, whatever the host's nix.conf says (single-user stores, where
   * the agent runs its own `nix-daemon --stdio`). On a multi-user host the daemon's configuration decides.
   */
  nixSandbox: boolean;
  /** What a sandboxed build sees of the host (`sandbox-paths`): the shell and the programs `/bin/sh` builders use. */
  nixSandboxPaths: string[];
  /**
   * `daemon`: the host's nix-daemon socket (multi-user hosts); `local`: a `nix-daemon --stdio` of the agent's own
   * on a single-user store it owns; `auto`: the host's daemon when one answers (or NIX_REMOTE says so).
   */
  store: 'auto' | 'daemon' | 'local';
  /** The host daemon's socket. */
  daemonSocket: string;
  spoolDir: string;
  /** PEM root certificate for TLS; `null` connects without TLS. */
  tlsCaPath: string | null;
  /** PEM client certificate and key, for a coordinator that requires mutual TLS; both or neither. */
  tlsCertPath: string | null;
  tlsKeyPath: string | null;
  logger: Logger;
  backoffBaseMs: number;
  backoffCapMs: number;
  /** Largest LogChunk payload; tests shrink it to exercise windowing. */
  logChunkBytes: number;
  localCancelGraceMs: number;
  stopNowGraceMs: number;
  /** How long stopGracefully() waits for running builds and their reports before it stops now. */
  drainGraceMs: number;
  /** How long an upload waits for an unreachable cache (a coordinator restarting) before the build fails. */
  cacheWaitMs: number;
  closeTimeoutMs: number;
  /** Memory of one check in MiB, where cgroups allow (`--check-memory-mib`); 0 for no limit. */
  checkMemoryMib: number;
  /** Processes and threads of one check, where cgroups allow (`--check-max-processes`); 0 for no limit. */
  checkMaxProcesses: number;
}

export type AgentOptionsInput = Pick<AgentOptions, 'coordinator' | 'token'> & Partial<AgentOptions>;

/** Fills in defaults and validates; a bad value is a ConfigError naming it. */
export function compileAgentOptions(input: AgentOptionsInput): AgentOptions {
  const options: AgentOptions = {
    agentId: '',
    maxJobs: null,
    systems: null,
    features: null,
    mandatoryFeatures: [],
    nixSandbox: false,
    nixSandboxPaths: DEFAULT_SANDBOX_PATHS,
    store: 'auto',
    daemonSocket: HOST_DAEMON_SOCKET,
    spoolDir: defaultSpoolDir(),
    tlsCaPath: null,
    tlsCertPath: null,
    tlsKeyPath: null,
    logger: input.logger ?? createLogger('ekaci-agent'),
    backoffBaseMs: DEFAULT_BACKOFF_BASE_MS,
    backoffCapMs: DEFAULT_BACKOFF_CAP_MS,
    logChunkBytes: LOG_CHUNK_BYTES,
    localCancelGraceMs: DEFAULT_LOCAL_CANCEL_GRACE_MS,
    stopNowGraceMs: DEFAULT_STOP_NOW_GRACE_MS,
    drainGraceMs: DEFAULT_DRAIN_GRACE_MS,
    cacheWaitMs: DEFAULT_CACHE_WAIT_MS,
    closeTimeoutMs: DEFAULT_CLOSE_TIMEOUT_MS,
    checkMemoryMib: DEFAULT_CHECK_MEMORY_MIB,
    checkMaxProcesses: DEFAULT_CHECK_MAX_PROCESSES,
    ...withoutUndefined(input),
    coordinator: input.coordinator,
    token: input.token,
  };
  coordinatorHost(options.coordinator);
  if (options.token.trim() === '') throw new ConfigError('the agent token is empty');
  if ((options.tlsCertPath === null) !== (options.tlsKeyPath === null)) {
    throw new ConfigError('a TLS client certificate needs its key, and a key its certificate (--tls-cert, --tls-key)');
  }
  if (options.tlsCertPath !== null && options.tlsCaPath === null) {
    throw new ConfigError('a TLS client certificate needs TLS: pass --tls-ca too');
  }
  if (options.maxJobs !== null) positiveInteger('maxJobs', options.maxJobs);
  const positive = [
    'backoffBaseMs',
    'backoffCapMs',
    'logChunkBytes',
    'stopNowGraceMs',
    'drainGraceMs',
    'closeTimeoutMs',
  ] as const;
  for (const key of positive) {
    positiveInteger(key, options[key]);
  }
  for (const key of ['checkMemoryMib', 'checkMaxProcesses'] as const) wholeNumber(key, options[key]);
  if (!Number.isSafeInteger(options.checkMemoryMib * 2 ** 20)) {
    throw new ConfigError(`checkMemoryMib is too large: ${options.checkMemoryMib}`);
  }
  if (options.logChunkBytes > LOG_CHUNK_BYTES) {
    throw new ConfigError(`logChunkBytes must be at most ${LOG_CHUNK_BYTES}, the protocol's limit`);
  }
  if (options.systems?.length === 0) throw new ConfigError('the list of systems is empty');
  return options;
}

/** The host part of `host:port` or `[v6]:port`; a ConfigError if the address has no port. */
export function coordinatorHost(address: string): string {
  const match = /^(?:\[([^\]]+)\]|([^:[\]]+)):(\d{1,5})$/.exec(address);
  if (match === null) throw new ConfigError(`coordinator address '${address}' is not host:port`);
  return match[1] ?? match[2] ?? '';
}

/**
 * Reads an agent token file. Refuses a file that group or others may read: the token lets its holder take builds
 * and write to the cache.
 */
export function readTokenFile(path: string): string {
  let mode: number;
  let text: string;
  try {
    mode = statSync(path).mode & 0o777;
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new ConfigError(`cannot read token file ${path}: ${(err as Error).message}`, { cause: err });
  }
  if ((mode & 0o077) !== 0) {
    throw new ConfigError(
      `token file ${path} is readable by group or others (mode 0${mode.toString(8)}); run 'chmod 600 ${path}'`,
    );
  }
  const token = text.trim();
  if (token === '') throw new ConfigError(`token file ${path} is empty`);
  return token;
}

/** Parses a count flag such as `--max-jobs`. */
export function parseCount(flag: string, value: string, zeroAllowed = false): number {
  if (!/^\d+$/.test(value) || Number(value) < (zeroAllowed ? 0 : 1))
    throw new UsageError(`${flag} must be a ${zeroAllowed ? 'whole number' : 'positive integer'}, not '${value}'`);
  return Number(value);
}

/** Parses a comma- or space-separated list flag such as `--features kvm,big-parallel`. */
export function parseList(value: string): string[] {
  return value.split(/[\s,]+/).filter((x) => x !== '');
}

// systemd's StateDirectory= sets STATE_DIRECTORY; otherwise the XDG state directory of the agent's user.
function defaultSpoolDir(): string {
  const state = process.env.STATE_DIRECTORY?.split(':')[0];
  return join(state ?? join(homedir(), '.local', 'state', 'ekaci-agent'), 'spool');
}

function positiveInteger(key: string, value: number): void {
  if (!Number.isInteger(value) || value < 1) throw new ConfigError(`${key} must be a positive integer, not ${value}`);
}

function wholeNumber(key: string, value: number): void {
  if (!Number.isInteger(value) || value < 0) {
    throw new ConfigError(`${key} must be a whole number (0 for no limit), not ${value}`);
  }
}

function withoutUndefined<T extends object>(input: T): Partial<T> {
  return Object.fromEntries(Object.entries(input).filter(([, v]) => v !== undefined)) as Partial<T>;
}
