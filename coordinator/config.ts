import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { parse as parseToml } from 'smol-toml';
import { z } from 'zod';
import { CacheError, ConfigError } from '../common/errors.js';
import { AppCredentialSource, credentialsSchema, type AppCredentials } from './github/credentials.js';
import { GitHubCredentialsError } from './github/errors.js';
import { compilePermissions, permissionsSchema, type AppPermissions } from './github/permissions.js';
import { DEFAULT_GRAPH_LRU_CAPACITY } from './graph/derivation-graph.js';
import { type EvaluationOptions, compileEvaluationOptions, evaluationSchema } from './eval/eval-options.js';
import { readSecret } from './secrets.js';
import { Credentials, credentialsSchema as credentialSourceSchema } from './credentials/credentials.js';
import { registerSecret } from '../common/redaction.js';
import { translateUpstreamKeys } from './upstream-keys.js';
import { signingKeyFromSecret } from './cache/signing-key.js';
import { type CacheOptions, cachesSchema, compileCaches } from './caches/cache-config.js';
import { type HooksOptions, compileHooks, hookSecurityKeys, hooksSchema } from './hooks/hook-config.js';

/**
 * The coordinator's TOML configuration: parsed and validated once at startup into `CoordinatorOptions`, a fully
 * populated object; nothing reads raw configuration later. Unknown keys are errors naming the key.
 *
 * Secrets may come from the environment instead of the file: `EKACI_<KEY>` for a top-level key,
 * `EKACI_AGENT_TOKEN_<NAME>` for the agent token called NAME (upper case, `-` as `_`), `GITHUB_WEBHOOK_SECRET` for
 * the webhook secret; GitHub App credentials name their own sources (see github/credentials.ts).
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
// Check runs are updated at most this often per run: a 5,000-derivation rebuild finishes builds faster than GitHub's
// API rate limit (5,000 requests an hour per installation) allows one update each, and a person reading the check
// does not need it fresher.
const DEFAULT_CHECK_RUN_UPDATE_INTERVAL_S = 5;
const DEFAULT_GITHUB_API_URL = 'https://api.github.com';
// GitHub generates no webhook secret itself; a short one is guessable offline from any one signed delivery.
const MIN_WEBHOOK_SECRET_LENGTH = 16;
// An agent says Hello as soon as its stream opens; a stream silent for this long is not an agent worth a slot.
const DEFAULT_HELLO_TIMEOUT_S = 10;
// A Node timer waits at most 2^31 - 1 ms (24.8 days) and fires after 1 ms when asked for longer: a longer Hello
// timeout would close every agent's stream at once. The lease TTL also travels to agents as uint32 milliseconds.
const MAX_TIMER_SECONDS = Math.floor((2 ** 31 - 1) / 1000);
// Build limits travel to agents as uint32 seconds in each lease; a larger one made every lease fail to encode.
const MAX_LEASE_SECONDS = 2 ** 32 - 1;
// lru-cache allocates its index for the whole capacity at start: ten million slots (fifty times the default) cost
// 160 MB and seconds; a billion ran the coordinator out of memory before it served anything.
const MAX_GRAPH_LRU_CAPACITY = 10_000_000;
// Log bytes stored per build attempt (and Nix's max-build-log-size on the agents): a build that prints more fails. A
// compiler's warnings for a big package stay well under it; a build stuck printing in a loop reaches it quickly.
const DEFAULT_MAX_LOG_BYTES = 64 * 1024 ** 2;
// A check is a formatter or a linter: its output is read by people, and a few MiB is already far too much to read.
const DEFAULT_CHECK_MAX_LOG_BYTES = 4 * 1024 ** 2;
const DEFAULT_CHECK_TIMEOUT_S = 1_800;
// The largest NAR an agent may upload (one output): the largest outputs in nixpkgs are a few GiB.
const DEFAULT_MAX_NAR_UPLOAD_BYTES = 16 * 1024 ** 3;

const port = z.number().int().min(0).max(65_535);

const tokenList = z
  .array(
    z
      .object({
        name: z.string().regex(/^[A-Za-z0-9._-]+$/, 'letters, digits, ".", "_" and "-" only'),
        token: z.string().min(16).optional(),
        token_file: z.string().min(1).optional(),
        token_credential: z.string().min(1).optional(),
      })
      .strict(),
  )
  .default([]);
const seconds = z.number().int().min(0);
const leaseSeconds = seconds.max(MAX_LEASE_SECONDS, `at most ${MAX_LEASE_SECONDS} (what a lease can carry)`);
const timerSeconds = z
  .number()
  .max(MAX_TIMER_SECONDS, `at most ${MAX_TIMER_SECONDS} (24.8 days, the longest a timer waits)`);

const githubApp = z
  .object({
    id: z.string().regex(/^[A-Za-z0-9._-]+$/, 'letters, digits, ".", "_" and "-" only'),
    credentials: credentialsSchema,
    permissions: permissionsSchema,
    api_url: z
      .string()
      .url()
      .refine((u) => /^https?:\/\//.test(u), 'an http(s) URL')
      .default(DEFAULT_GITHUB_API_URL),
  })
  .strict();

const schema = z
  .object({
    data_dir: z.string().min(1).optional(),
    build_no_output_timeout_seconds: leaseSeconds.default(DEFAULT_NO_OUTPUT_TIMEOUT_S),
    build_max_duration_seconds: leaseSeconds.default(DEFAULT_MAX_DURATION_S),
    build_max_log_bytes: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).default(DEFAULT_MAX_LOG_BYTES),
    unbuildable_grace_seconds: seconds.default(DEFAULT_UNBUILDABLE_GRACE_S),
    check_max_log_bytes: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER).default(DEFAULT_CHECK_MAX_LOG_BYTES),
    check_timeout_seconds: leaseSeconds.positive().default(DEFAULT_CHECK_TIMEOUT_S),
    lease_ttl_seconds: timerSeconds.positive().default(DEFAULT_LEASE_TTL_S),
    max_attempts: z.number().int().min(1).default(DEFAULT_MAX_ATTEMPTS),
    graph_lru_capacity: z.number().int().min(1).max(MAX_GRAPH_LRU_CAPACITY).default(DEFAULT_GRAPH_LRU_CAPACITY),
    agent_hello_timeout_seconds: timerSeconds.positive().default(DEFAULT_HELLO_TIMEOUT_S),
    web: z
      .object({
        address: z.string().default('127.0.0.1'),
        port: port.default(8080),
        public_url: z.string().url().optional(),
        /** Anonymous callers may read public repositories' data (never private ones'). */
        public: z.boolean().default(true),
        /** API token names whose holders may drain and resume agents and read the audit log. */
        admins: z.array(z.string().min(1)).default([]),
        /** Origins (`https://dash.example.org`) of other sites whose pages may call the API. */
        cors_origins: z.array(z.string().regex(/^https?:\/\/[^/]+$/, 'an origin: scheme://host[:port]')).default([]),
      })
      .strict()
      .prefault({}),
    grpc: z
      .object({
        address: z.string().default('127.0.0.1'),
        port: port.default(50051),
        tls_cert_file: z.string().optional(),
        tls_key_file: z.string().optional(),
        /** With TLS: agents must present a client certificate signed by this CA (mutual TLS). */
        client_ca_file: z.string().optional(),
      })
      .strict()
      .refine((g) => (g.tls_cert_file === undefined) === (g.tls_key_file === undefined), {
        message: 'tls_cert_file and tls_key_file go together',
      })
      .refine((g) => g.client_ca_file === undefined || g.tls_cert_file !== undefined, {
        message: 'client_ca_file needs tls_cert_file and tls_key_file (mutual TLS is TLS first)',
      })
      .prefault({}),
    local_agent: z
      .object({
        enabled: z.boolean().default(true),
        max_jobs: z.number().int().min(1).optional(),
        /** Build in Nix's sandbox even where the host's nix.conf says sandbox = false (Debian's default). */
        sandbox: z.boolean().default(false),
      })
      .strict()
      .prefault({}),
    cache: z
      .object({
        key_name: z
          .string()
          .regex(/^[A-Za-z0-9._-]+$/)
          .default('ekaci-1'),
        /**
         * The signing key (`name:base64`, as `nix-store --generate-binary-cache-key` writes it) from a file or a
         * systemd credential; without either, a key is created in the data directory on first start.
         */
        secret_key_file: z.string().min(1).optional(),
        secret_key_credential: z.string().min(1).optional(),
        max_nar_upload_bytes: z
          .number()
          .int()
          .min(1)
          .max(Number.MAX_SAFE_INTEGER)
          .default(DEFAULT_MAX_NAR_UPLOAD_BYTES),
      })
      .strict()
      .prefault({}),
    agent_tokens: tokenList,
    api_tokens: tokenList,
    /** GitHub OAuth login for the web UI (an OAuth App's, or a GitHub App's, client id and secret). */
    oauth: z
      .object({
        client_id: z.string().min(1),
        client_secret: z.string().min(1).optional(),
        client_secret_file: z.string().min(1).optional(),
        client_secret_credential: z.string().min(1).optional(),
        /** Where GitHub sends the browser back: this coordinator's `/auth/callback`. */
        redirect_url: z.string().url(),
        /** Signs session cookies; 32 characters at least. */
        jwt_secret: z.string().min(32, 'at least 32 characters').optional(),
        jwt_secret_file: z.string().min(1).optional(),
        jwt_secret_credential: z.string().min(1).optional(),
        /** Both secrets from any credential source, as OAUTH_CLIENT_SECRET and OAUTH_JWT_SECRET. */
        credentials: credentialSourceSchema.optional(),
        github_url: z.string().url().default('https://github.com'),
        api_url: z.string().url().default('https://api.github.com'),
        /** GitHub logins that operate the coordinator: drain and resume agents, read the audit log. */
        admins: z.array(z.string().min(1)).default([]),
        session_hours: z
          .number()
          .positive()
          .max(24 * 90)
          .default(24 * 7),
      })
      .strict()
      .optional(),
    github_apps: z
      .array(githubApp)
      .default([])
      .refine((apps) => new Set(apps.map((a) => a.id)).size === apps.length, { message: 'two apps share an id' }),
    security: z
      .object({
        webhook_secret: z.string().min(MIN_WEBHOOK_SECRET_LENGTH).optional(),
        webhook_secret_file: z.string().min(1).optional(),
        webhook_secret_credential: z.string().min(1).optional(),
        allow_insecure_webhooks: z.boolean().default(false),
        require_approval: z.boolean().default(false),
        approved_users: z.array(z.string().min(1)).default([]),
        /** Untrusted pull-request code may build on agents whose Nix sandbox is off (it then sees the host). */
        allow_unsandboxed_untrusted_builds: z.boolean().default(false),
        /** Repositories (owner/name) whose untrusted pull requests' checks get the network they ask for. */
        untrusted_check_network_repos: z.array(z.string().regex(/^[^/\s]+\/[^/\s]+$/, 'owner/name')).default([]),
        /** Repositories (owner/name) whose untrusted pull requests still push to the caches their jobs name. */
        untrusted_cache_push_repos: z.array(z.string().regex(/^[^/\s]+\/[^/\s]+$/, 'owner/name')).default([]),
        /** Caches on loopback, private or link-local addresses are refused unless this is set (tests, a LAN cache). */
        allow_private_cache_hosts: z.boolean().default(false),
        ...hookSecurityKeys,
      })
      .strict()
      .prefault({}),
    evaluation: evaluationSchema,
    caches: cachesSchema,
    hooks: hooksSchema,
    rebuild: z
      .object({
        /** Above this many rebuilds of a job on a system, build only attributes named (review/build-limits.ts). */
        max_rebuild_count: z.number().int('a whole number of derivations').min(0).default(0),
      })
      .strict()
      .prefault({}),
    github: z
      .object({
        build_draft_pull_requests: z.boolean().default(false),
        check_run_update_interval_seconds: timerSeconds.min(0).default(DEFAULT_CHECK_RUN_UPDATE_INTERVAL_S),
      })
      .strict()
      .prefault({}),
  })
  .strict();

export interface GitHubAppOptions {
  /** The configuration's name for the app. */
  id: string;
  /**
   * Server-side only: never handed to anything a repository controls. Read at compile time from local sources; from
   * remote ones (Vault, AWS, instance metadata) when the coordinator starts (`resolveGitHubAppCredentials`).
   */
  credentials: AppCredentials;
  /**
   * Where the credentials come from, read again when they rotate. Not enumerable: options are compared and logged
   * as plain data. Absent in options built by hand (tests), whose credentials are fixed.
   */
  readonly credentialSource?: AppCredentialSource;
  permissions: AppPermissions;
  /** REST API root without a trailing `/`: `https://api.github.com`, or `https://HOST/api/v3` for GHES. */
  apiUrl: string;
}

export interface CoordinatorOptions {
  dataDir: string;
  noOutputTimeoutSeconds: number;
  maxDurationSeconds: number;
  /** `build_max_log_bytes`: log bytes per build attempt; 0 for no limit. */
  maxLogBytes: number;
  unbuildableGraceSeconds: number;
  /** Repository checks: output cap (`check_max_log_bytes`, 0: none) and the timeout of a check that sets none. */
  checks: { maxLogBytes: number; timeoutSeconds: number };
  leaseTtlMs: number;
  maxAttempts: number;
  /** Derivations kept in memory beyond those with pending work (the rest reload from SQLite). */
  graphLruCapacity: number;
  /** A stream that sends no Hello within this time is closed. */
  helloTimeoutMs: number;
  web: {
    address: string;
    port: number;
    publicUrl: string | undefined;
    public: boolean;
    admins: string[];
    corsOrigins: string[];
  };
  grpc: {
    address: string;
    port: number;
    tls: { certFile: string; keyFile: string; clientCaFile: string | undefined } | undefined;
  };
  localAgent: { enabled: boolean; maxJobs: number | undefined; sandbox: boolean };
  /** `secretKey` from the configuration's secret_key_file/credential; undefined: the data directory's own key. */
  cache: { keyName: string; secretKey: string | undefined; maxNarUploadBytes: number };
  /** Tokens declared in the configuration (more live in the database). */
  agentTokens: Array<{ name: string; token: string }>;
  apiTokens: Array<{ name: string; token: string }>;
  /** GitHub OAuth login (`[oauth]`), when configured. */
  oauth: OAuthOptions | undefined;
  githubApps: GitHubAppOptions[];
  security: {
    /** Undefined only with `allowInsecureWebhooks` or without GitHub Apps. */
    webhookSecret: string | undefined;
    allowInsecureWebhooks: boolean;
    requireApproval: boolean;
    approvedUsers: string[];
    allowUnsandboxedUntrustedBuilds: boolean;
    /** Repositories whose untrusted pull requests' checks still get the network they ask for (`owner/name`). */
    untrustedCheckNetworkRepos: string[];
    /** Repositories whose untrusted pull requests still push to their jobs' caches (`owner/name`). */
    untrustedCachePushRepos: string[];
    allowPrivateCacheHosts: boolean;
  };
  github: { buildDraftPullRequests: boolean; checkRunUpdateIntervalMs: number };
  /**
   * `[rebuild] max_rebuild_count`: a pull request's job with more rebuilds than this on a system builds there only the
   * attributes named by commands and commit titles; a job's own limit may be lower (review/build-limits.ts). 0: none.
   */
  rebuild: { maxRebuildCount: number };
  /** How repository code is evaluated: sandbox, store, limits, and what repositories may fetch. */
  evaluation: EvaluationOptions;
  /** `[[caches]]`: binary caches jobs may push to. */
  caches: CacheOptions[];
  /** `[[hooks]]` and the `[security]` keys that bound them (coordinator/hooks). */
  hooks: HooksOptions;
}

export interface OAuthOptions {
  clientId: string;
  /** Set at start-up (resolveOAuthSecrets) when `credentials` is a source that needs the network. */
  clientSecret: string;
  redirectUrl: string;
  jwtSecret: string;
  /** `[oauth] credentials`, when the secrets come from a credential source. */
  credentials?: Credentials;
  githubUrl: string;
  apiUrl: string;
  admins: string[];
  sessionSeconds: number;
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
  const withEnv = applyEnvOverrides(translateUpstreamKeys(raw, source, env), env);
  const parsed = schema.safeParse(withEnv);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const key = [...issue.path, ...('keys' in issue ? [issue.keys.join(', ')] : [])].join('.');
    throw new ConfigError(`${source}: ${key || '(top level)'}: ${issue.message}`);
  }
  const c = parsed.data;
  const rel = (p: string): string => (isAbsolute(p) ? p : resolve(baseDir, p));
  const ctx = { source, env, baseDir };
  const tokens = (
    list: typeof c.agent_tokens,
    key: string,
    envPrefix: string,
  ): Array<{ name: string; token: string }> =>
    list.map((t) => {
      const fromEnv = env[`${envPrefix}${t.name.toUpperCase().replace(/[-.]/g, '_')}`];
      const fromConfig = readSecret(
        `${key}.${t.name}`,
        'token',
        {
          value: t.token,
          file: t.token_file,
          credential: t.token_credential,
        },
        ctx,
      );
      const token = fromEnv ?? fromConfig;
      registerSecret(token);
      if (!token) {
        throw new ConfigError(`${source}: ${key}.${t.name}: needs token, token_file, token_credential or env`);
      }
      return { name: t.name, token };
    });
  const agentTokens = tokens(c.agent_tokens, 'agent_tokens', 'EKACI_AGENT_TOKEN_');
  const apiTokens = tokens(c.api_tokens, 'api_tokens', 'EKACI_API_TOKEN_');
  const githubApps = c.github_apps.map((app) => compileGitHubApp(app, source, env, baseDir));
  const webhookFromConfig = readSecret(
    'security',
    'webhook_secret',
    {
      value: c.security.webhook_secret,
      file: c.security.webhook_secret_file,
      credential: c.security.webhook_secret_credential,
    },
    ctx,
  );
  const webhookSecret = env.GITHUB_WEBHOOK_SECRET || webhookFromConfig;
  registerSecret(webhookSecret);
  if (webhookSecret !== undefined && webhookSecret.length < MIN_WEBHOOK_SECRET_LENGTH) {
    const from = env.GITHUB_WEBHOOK_SECRET ? 'GITHUB_WEBHOOK_SECRET' : `${source}: security.webhook_secret`;
    throw new ConfigError(`${from}: shorter than ${MIN_WEBHOOK_SECRET_LENGTH} characters`);
  }
  if (githubApps.length > 0 && webhookSecret === undefined && !c.security.allow_insecure_webhooks) {
    throw new ConfigError(
      `${source}: security.webhook_secret: GitHub Apps are configured but no webhook secret is: set ` +
        'security.webhook_secret or GITHUB_WEBHOOK_SECRET to the secret in the app settings (or, for a local test ' +
        'only, security.allow_insecure_webhooks = true)',
    );
  }
  return {
    dataDir: c.data_dir ? rel(c.data_dir) : defaultDataDir(),
    noOutputTimeoutSeconds: c.build_no_output_timeout_seconds,
    maxDurationSeconds: c.build_max_duration_seconds,
    maxLogBytes: c.build_max_log_bytes,
    unbuildableGraceSeconds: c.unbuildable_grace_seconds,
    checks: { maxLogBytes: c.check_max_log_bytes, timeoutSeconds: c.check_timeout_seconds },
    leaseTtlMs: Math.round(c.lease_ttl_seconds * 1000),
    maxAttempts: c.max_attempts,
    graphLruCapacity: c.graph_lru_capacity,
    helloTimeoutMs: Math.round(c.agent_hello_timeout_seconds * 1000),
    web: {
      address: c.web.address,
      port: c.web.port,
      publicUrl: c.web.public_url,
      public: c.web.public,
      admins: c.web.admins,
      corsOrigins: c.web.cors_origins,
    },
    grpc: {
      address: c.grpc.address,
      port: c.grpc.port,
      tls: c.grpc.tls_cert_file
        ? {
            certFile: rel(c.grpc.tls_cert_file),
            keyFile: rel(c.grpc.tls_key_file!),
            clientCaFile: c.grpc.client_ca_file ? rel(c.grpc.client_ca_file) : undefined,
          }
        : undefined,
    },
    localAgent: { enabled: c.local_agent.enabled, maxJobs: c.local_agent.max_jobs, sandbox: c.local_agent.sandbox },
    cache: withoutSecretInJson(
      {
        keyName: c.cache.key_name,
        secretKey: checkedSigningKey(
          readSecret(
            'cache',
            'secret_key',
            { file: c.cache.secret_key_file, credential: c.cache.secret_key_credential },
            ctx,
          ),
          source,
        ),
        maxNarUploadBytes: c.cache.max_nar_upload_bytes,
      },
      'secretKey',
    ),
    agentTokens,
    apiTokens,
    oauth: c.oauth ? compileOAuth(c.oauth, ctx) : undefined,
    githubApps,
    security: withoutSecretInJson(
      {
        webhookSecret,
        allowInsecureWebhooks: c.security.allow_insecure_webhooks,
        requireApproval: c.security.require_approval,
        approvedUsers: c.security.approved_users,
        allowUnsandboxedUntrustedBuilds: c.security.allow_unsandboxed_untrusted_builds,
        untrustedCheckNetworkRepos: c.security.untrusted_check_network_repos,
        untrustedCachePushRepos: c.security.untrusted_cache_push_repos,
        allowPrivateCacheHosts: c.security.allow_private_cache_hosts,
      },
      'webhookSecret',
    ),
    github: {
      buildDraftPullRequests: c.github.build_draft_pull_requests,
      checkRunUpdateIntervalMs: Math.round(c.github.check_run_update_interval_seconds * 1000),
    },
    rebuild: { maxRebuildCount: c.rebuild.max_rebuild_count },
    evaluation: compileEvaluationOptions(c.evaluation),
    caches: compileCaches(c.caches, ctx, { allowPrivateHosts: c.security.allow_private_cache_hosts }),
    hooks: compileHooks(c.hooks, c.security, ctx),
  };
}

function compileOAuth(
  o: NonNullable<z.infer<typeof schema>['oauth']>,
  ctx: Parameters<typeof readSecret>[3],
): OAuthOptions {
  const credentials = o.credentials ? Credentials.compile('oauth.credentials', o.credentials, ctx) : undefined;
  const secret = (field: 'client_secret' | 'jwt_secret'): string => {
    const value = readSecret(
      'oauth',
      field,
      { value: o[field], file: o[`${field}_file`], credential: o[`${field}_credential`] },
      ctx,
    );
    if (value !== undefined) return checkedOAuthSecret(field, value, ctx.source);
    // A source that needs the network is read when the coordinator starts (resolveOAuthSecrets).
    if (credentials && !credentials.synchronous) return '';
    if (credentials) return oauthSecretFrom(credentials.valuesSync(), field, credentials, ctx.source);
    throw new ConfigError(
      `${ctx.source}: oauth.${field}: required (or ${field}_file, ${field}_credential, or oauth.credentials)`,
    );
  };
  const options: OAuthOptions = {
    clientId: o.client_id,
    clientSecret: secret('client_secret'),
    redirectUrl: o.redirect_url,
    jwtSecret: secret('jwt_secret'),
    githubUrl: o.github_url.replace(/\/+$/, ''),
    apiUrl: o.api_url.replace(/\/+$/, ''),
    admins: o.admins,
    sessionSeconds: Math.round(o.session_hours * 3600),
  };
  Object.defineProperty(options, 'credentials', { value: credentials, enumerable: false, writable: false });
  Object.defineProperty(options, 'toJSON', {
    value: () => ({ ...options, clientSecret: '[redacted]', jwtSecret: '[redacted]' }),
    enumerable: false,
  });
  return options;
}

const OAUTH_SECRET_NAMES = { client_secret: 'OAUTH_CLIENT_SECRET', jwt_secret: 'OAUTH_JWT_SECRET' } as const;

function oauthSecretFrom(
  values: ReadonlyMap<string, string>,
  field: 'client_secret' | 'jwt_secret',
  credentials: Credentials,
  source: string,
): string {
  const value = values.get(OAUTH_SECRET_NAMES[field]);
  if (value === undefined || value === '') {
    throw new ConfigError(
      `${source}: oauth.credentials: ${credentials.description} has no ${OAUTH_SECRET_NAMES[field]} (for ${field})`,
    );
  }
  return checkedOAuthSecret(field, value, source);
}

function checkedOAuthSecret(field: 'client_secret' | 'jwt_secret', value: string, source: string): string {
  if (field === 'jwt_secret' && value.length < 32) {
    throw new ConfigError(`${source}: oauth.jwt_secret: at least 32 characters`);
  }
  return value;
}

/**
 * Reads `[oauth]` secrets whose credential source needs the network (Vault, AWS, instance metadata): called when the
 * coordinator starts, before it serves a login. A source that cannot be read, or lacks a secret, stops the start.
 */
export async function resolveOAuthSecrets(o: OAuthOptions | undefined, source = 'the configuration'): Promise<void> {
  const credentials = o?.credentials;
  if (!o || !credentials || credentials.synchronous) return;
  let values: ReadonlyMap<string, string>;
  try {
    values = await credentials.values();
  } catch (err) {
    throw new ConfigError(`${source}: oauth.credentials: ${(err as Error).message}`, { cause: err });
  }
  if (o.clientSecret === '') o.clientSecret = oauthSecretFrom(values, 'client_secret', credentials, source);
  if (o.jwtSecret === '') o.jwtSecret = oauthSecretFrom(values, 'jwt_secret', credentials, source);
}

function compileGitHubApp(
  app: z.infer<typeof githubApp>,
  source: string,
  env: NodeJS.ProcessEnv,
  baseDir: string,
): GitHubAppOptions {
  const configError = (err: unknown): never => {
    if (!(err instanceof GitHubCredentialsError)) throw err;
    throw new ConfigError(`${source}: github_apps.${app.id}.credentials: ${err.message}`, { cause: err });
  };
  let credentialSource: AppCredentialSource;
  try {
    credentialSource = AppCredentialSource.compile(app.id, app.credentials, { source, env, baseDir });
    // Local sources fail here, at compile time, as they always did; remote ones when the coordinator starts.
    if (credentialSource.synchronous) credentialSource.resolveSync();
  } catch (err) {
    return configError(err);
  }
  const options: GitHubAppOptions = {
    id: app.id,
    credentials: credentialSource.credentials,
    permissions: compilePermissions(app.permissions),
    apiUrl: app.api_url.replace(/\/+$/, ''),
  };
  Object.defineProperty(options, 'credentialSource', { value: credentialSource, enumerable: false });
  return options;
}

/**
 * Reads the credentials of every app whose source is remote (Vault, AWS, instance metadata): the coordinator awaits
 * this before it starts, and fails with a ConfigError naming the app and the source when one cannot be read.
 */
export async function resolveGitHubAppCredentials(apps: readonly GitHubAppOptions[]): Promise<void> {
  for (const app of apps) {
    const from = app.credentialSource;
    try {
      await from?.current();
    } catch (err) {
      if (!(err instanceof GitHubCredentialsError) || !from) throw err;
      throw new ConfigError(`${from.configFile}: github_apps.${app.id}.credentials: ${err.message}`, { cause: err });
    }
  }
}

/** A configured signing key is checked at start-up, where a bad one is a configuration error. */
function checkedSigningKey(secret: string | undefined, source: string): string | undefined {
  if (secret === undefined) return undefined;
  try {
    signingKeyFromSecret(secret, 'the configured key');
  } catch (err) {
    if (!(err instanceof CacheError)) throw err;
    throw new ConfigError(`${source}: cache.secret_key: ${err.message}`, { cause: err });
  }
  return secret;
}

/** Options get logged when debugging start-up; secrets must not be, so JSON (and pino) show `field` redacted. */
function withoutSecretInJson<K extends string, T extends Record<K, string | undefined>>(table: T, field: K): T {
  const shown = (): object => ({ ...table, [field]: table[field] ? '[redacted]' : undefined });
  Object.defineProperty(table, 'toJSON', { value: shown, enumerable: false });
  return table;
}

/** `EKACI_<TOP_LEVEL_KEY>` replaces a top-level scalar, so secrets and paths can stay out of the file. */
function applyEnvOverrides(raw: unknown, env: NodeJS.ProcessEnv): unknown {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return raw;
  const out: Record<string, unknown> = { ...(raw as Record<string, unknown>) };
  const numeric = new Set([
    'build_no_output_timeout_seconds',
    'build_max_duration_seconds',
    'build_max_log_bytes',
    'check_max_log_bytes',
    'check_timeout_seconds',
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
