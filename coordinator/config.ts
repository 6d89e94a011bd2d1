import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { parse as parseToml } from 'smol-toml';
import { z } from 'zod';
import { ConfigError } from '../common/errors.js';
import { DEFAULT_GRAPH_LRU_CAPACITY } from './graph/derivation-graph.js';

/**
 * The coordinator's TOML configuration: parsed and validated once at startup into `CoordinatorOptions`, a fully
 * populated object; nothing reads raw configuration later. Unknown keys are errors naming the key.
 *
 * Secrets may come from the environment instead of the file: `EKACI_<KEY>` for a top-level key, and
 * `EKACI_AGENT_TOKEN_<NAME>` for the agent token called NAME (upper case, `-` as `_`).
 */

// An hour of silence or ten hours in total: a nixpkgs build that says nothing for an hour is stuck.
const DEFAULT_NO_OUTPUT_TIMEOUT_S = 3_600;
const DEFAULT_MAX_DURATION_S = 36_000;
// A derivation waits this long for an agent with its system and features to connect before it is unbuildable:
// long enough to ride out an agent restart.
const DEFAULT_UNBUILDABLE_GRACE_S = 300;
// Leases outlive a couple of missed heartbeats; heartbeats are every lease_ttl/4.
const DEFAULT_LEASE_TTL_S = 60;
// An infrastructure failure is retried this many times in all before the derivation is given up as failed.
const DEFAULT_MAX_ATTEMPTS = 3;

const port = z.number().int().min(0).max(65_535);
const seconds = z.number().int().min(0);

const schema = z
  .object({
    data_dir: z.string().min(1).optional(),
    build_no_output_timeout_seconds: seconds.default(DEFAULT_NO_OUTPUT_TIMEOUT_S),
    build_max_duration_seconds: seconds.default(DEFAULT_MAX_DURATION_S),
    unbuildable_grace_seconds: seconds.default(DEFAULT_UNBUILDABLE_GRACE_S),
    lease_ttl_seconds: z.number().positive().default(DEFAULT_LEASE_TTL_S),
    max_attempts: z.number().int().min(1).default(DEFAULT_MAX_ATTEMPTS),
    graph_lru_capacity: z.number().int().min(1).default(DEFAULT_GRAPH_LRU_CAPACITY),
    web: z
      .object({
        address: z.string().default('127.0.0.1'),
        port: port.default(8080),
        public_url: z.string().url().optional(),
      })
      .strict()
      .prefault({}),
    grpc: z
      .object({
        address: z.string().default('127.0.0.1'),
        port: port.default(50051),
        tls_cert_file: z.string().optional(),
        tls_key_file: z.string().optional(),
      })
      .strict()
      .refine((g) => (g.tls_cert_file === undefined) === (g.tls_key_file === undefined), {
        message: 'tls_cert_file and tls_key_file go together',
      })
      .prefault({}),
    local_agent: z
      .object({
        enabled: z.boolean().default(true),
        max_jobs: z.number().int().min(1).optional(),
      })
      .strict()
      .prefault({}),
    cache: z
      .object({
        key_name: z
          .string()
          .regex(/^[A-Za-z0-9._-]+$/)
          .default('ekaci-1'),
      })
      .strict()
      .prefault({}),
    agent_tokens: z
      .array(
        z
          .object({
            name: z.string().regex(/^[A-Za-z0-9._-]+$/, 'letters, digits, ".", "_" and "-" only'),
            token: z.string().min(16).optional(),
            token_file: z.string().optional(),
          })
          .strict(),
      )
      .default([]),
  })
  .strict();

export interface CoordinatorOptions {
  dataDir: string;
  noOutputTimeoutSeconds: number;
  maxDurationSeconds: number;
  unbuildableGraceSeconds: number;
  leaseTtlMs: number;
  maxAttempts: number;
  /** Derivations kept in memory beyond those with pending work (the rest reload from SQLite). */
  graphLruCapacity: number;
  web: { address: string; port: number; publicUrl: string | undefined };
  grpc: { address: string; port: number; tls: { certFile: string; keyFile: string } | undefined };
  localAgent: { enabled: boolean; maxJobs: number | undefined };
  cache: { keyName: string };
  /** Tokens declared in the configuration (more live in the database). */
  agentTokens: Array<{ name: string; token: string }>;
}

export function defaultDataDir(): string {
  const xdg = process.env.XDG_DATA_HOME;
  return join(xdg && isAbsolute(xdg) ? xdg : join(homedir(), '.local', 'share'), 'ekaci');
}

/**
 * Reads and compiles a TOML file; `undefined` compiles the defaults (the embedded system). `defaults` replaces
 * built-in defaults of top-level keys for one kind of run (what the file says still wins).
 */
export function loadCoordinatorConfig(
  file: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
  defaults: Record<string, unknown> = {},
): CoordinatorOptions {
  let raw: unknown = {};
  if (file !== undefined) {
    let text: string;
    try {
      text = readFileSync(file, 'utf8');
    } catch (e) {
      throw new ConfigError(`cannot read configuration file ${file}: ${(e as Error).message}`);
    }
    try {
      raw = parseToml(text);
    } catch (e) {
      throw new ConfigError(`${file} is not valid TOML: ${(e as Error).message}`);
    }
  }
  const layered = typeof raw === 'object' && raw !== null ? { ...defaults, ...(raw as Record<string, unknown>) } : raw;
  return compileCoordinatorConfig(layered, file ?? '(defaults)', env, file ? resolve(file, '..') : process.cwd());
}

export function compileCoordinatorConfig(
  raw: unknown,
  source: string,
  env: NodeJS.ProcessEnv = process.env,
  baseDir = process.cwd(),
): CoordinatorOptions {
  const withEnv = applyEnvOverrides(raw, env);
  const parsed = schema.safeParse(withEnv);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const key = [...issue.path, ...('keys' in issue ? [issue.keys.join(', ')] : [])].join('.');
    throw new ConfigError(`${source}: ${key || '(top level)'}: ${issue.message}`);
  }
  const c = parsed.data;
  const rel = (p: string): string => (isAbsolute(p) ? p : resolve(baseDir, p));
  const agentTokens = c.agent_tokens.map((t) => {
    const fromEnv = env[`EKACI_AGENT_TOKEN_${t.name.toUpperCase().replace(/[-.]/g, '_')}`];
    const token = fromEnv ?? t.token ?? (t.token_file ? readSecretFile(rel(t.token_file), source) : undefined);
    if (!token) throw new ConfigError(`${source}: agent_tokens.${t.name}: needs token, token_file or env`);
    return { name: t.name, token };
  });
  return {
    dataDir: c.data_dir ? rel(c.data_dir) : defaultDataDir(),
    noOutputTimeoutSeconds: c.build_no_output_timeout_seconds,
    maxDurationSeconds: c.build_max_duration_seconds,
    unbuildableGraceSeconds: c.unbuildable_grace_seconds,
    leaseTtlMs: Math.round(c.lease_ttl_seconds * 1000),
    maxAttempts: c.max_attempts,
    graphLruCapacity: c.graph_lru_capacity,
    web: { address: c.web.address, port: c.web.port, publicUrl: c.web.public_url },
    grpc: {
      address: c.grpc.address,
      port: c.grpc.port,
      tls: c.grpc.tls_cert_file
        ? { certFile: rel(c.grpc.tls_cert_file), keyFile: rel(c.grpc.tls_key_file!) }
        : undefined,
    },
    localAgent: { enabled: c.local_agent.enabled, maxJobs: c.local_agent.max_jobs },
    cache: { keyName: c.cache.key_name },
    agentTokens,
  };
}

/** `EKACI_<TOP_LEVEL_KEY>` replaces a top-level scalar, so secrets and paths can stay out of the file. */
function applyEnvOverrides(raw: unknown, env: NodeJS.ProcessEnv): unknown {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return raw;
  const out: Record<string, unknown> = { ...(raw as Record<string, unknown>) };
  const numeric = new Set([
    'build_no_output_timeout_seconds',
    'build_max_duration_seconds',
    'unbuildable_grace_seconds',
    'lease_ttl_seconds',
    'max_attempts',
  ]);
  for (const key of ['data_dir', ...numeric]) {
    const value = env[`EKACI_${key.toUpperCase()}`];
    if (value === undefined) continue;
    if (numeric.has(key) && !Number.isFinite(Number(value))) {
      throw new ConfigError(`EKACI_${key.toUpperCase()}: expected a number, got "${value}"`);
    }
    out[key] = numeric.has(key) ? Number(value) : value;
  }
  return out;
}

function readSecretFile(path: string, source: string): string {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch (e) {
    throw new ConfigError(`${source}: cannot read ${path}: ${(e as Error).message}`);
  }
}
