/**
 * Credentials for everything the coordinator talks to on the operator's behalf — GitHub Apps, binary caches, hooks —
 * from any of the sources upstream eka-ci documents. A `credentials` table names exactly one source:
 *
 * | source | table | named values |
 * |---|---|---|
 * | environment | `env = { vars = ["A", "B"] }` | each variable under its own name |
 * | file | `file = { path = "creds.env" }` (JSON object or KEY=VALUE lines; relative to the config file) | its keys |
 * | systemd | `systemd-credential = { name = "n" }` (`$CREDENTIALS_DIRECTORY/n`, same formats) | its keys |
 * | Vault KV v2 | `vault = { address, secret_path, token_env = "VAULT_TOKEN" \| token_file, namespace, refresh_seconds }` | the secret's keys (`.data.data`) |
 * | AWS Secrets Manager | `aws-secrets-manager = { secret_name, region, endpoint, profile, refresh_seconds }` | the SecretString's JSON keys; a SecretString that is not a JSON object is one value named after the secret (`secret_name` as written) |
 * | instance metadata | `instance-metadata = { provider = "aws" \| "gcp" \| "azure", endpoint, role, service_account, resource }`, or the string `"instance-metadata"` | aws: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN; gcp, azure: ACCESS_TOKEN |
 * | AWS profile | `aws-profile = { profile = "p" }` (`~/.aws/credentials` and `config`, through the SDK) | AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (, AWS_SESSION_TOKEN) |
 * | GitHub's key download | `github-app-key-file = { app_id_env, key_file }` | GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY |
 * | Cachix | `cachix-token = { env_var }` | CACHIX_AUTH_TOKEN |
 * | nothing | `none = {}`, or the string `"none"` | none |
 *
 * Values are cached and read again when they rotate: local files when their inode, size or mtime changes (a stat per
 * use); Vault, Secrets Manager and metadata every `refresh_seconds` and before the values expire (5 minutes ahead);
 * Vault's token is renewed before its TTL runs out. Every value read is registered for redaction (common/redaction.ts),
 * so no log line carries it; no error message does either.
 */
import { registerSecret } from '../../common/redaction.js';
import { awsProfileSource, secretsManagerSource } from './aws.js';
import { CredentialsError } from './errors.js';
import { instanceMetadataSource } from './instance-metadata.js';
import {
  cachixTokenSource,
  envSource,
  fileSource,
  githubAppKeyFileSource,
  noneSource,
  systemdCredentialSource,
} from './local.js';
import type { Reading, Source, SourceContext } from './source.js';
import { vaultSource } from './vault.js';
import type { CredentialsSpec } from './schema.js';

export { CredentialsError };
export { credentialsSchema, credentialsTable, type CredentialsSpec } from './schema.js';

// Values that expire (AWS session credentials, metadata tokens) are fetched again this long before they do, so a
// request signed just before never arrives with credentials that ran out in flight. AWS's own SDKs use 5 minutes.
export const EXPIRY_MARGIN_MS = 5 * 60_000;
// AWS SDK clients ask a credential provider again only when its answer carries an expiration; one that never expires
// would be asked once and rotation never seen. Answers without one say they expire this much later (the SDK asks
// again 5 minutes before), so a rotated file or secret reaches the SDK within about 10 minutes.
const PROVIDER_RECHECK_MS = 15 * 60_000;

export interface CredentialContext {
  /** The configuration file, for messages. */
  source: string;
  env: NodeJS.ProcessEnv;
  /** Anchors relative paths: the configuration file's directory. */
  baseDir: string;
  /** The clock for refresh intervals and expiry (ms since the epoch); tests move it. Default Date.now. */
  now?: () => number;
}

/** One compiled `credentials` table. */
export class Credentials {
  private reading: Reading | undefined;
  private pending: Promise<Reading> | undefined;

  private constructor(
    private readonly source: Source,
    private readonly now: () => number,
  ) {}

  /**
   * Checks the table without waiting for anything (paths anchored, `$CREDENTIALS_DIRECTORY` set, a Vault token
   * available, a region known); reads nothing remote. `where` names the table for messages, e.g.
   * `caches.prod-s3.credentials`.
   */
  static compile(where: string, spec: CredentialsSpec, ctx: CredentialContext): Credentials {
    const now = ctx.now ?? Date.now;
    let description = 'credentials';
    const sourceCtx: SourceContext = {
      env: ctx.env,
      baseDir: ctx.baseDir,
      now,
      fail: (problem, cause) => {
        throw new CredentialsError(`${where}: ${description}: ${problem}`, { cause });
      },
    };
    const source = compileSource(spec, sourceCtx, (d) => (description = d));
    description = source.description;
    return new Credentials(source, now);
  }

  /** Where the values come from — "vault https://vault:8200 secret/data/x" — never a value. */
  get description(): string {
    return this.source.description;
  }

  /** Whether `valuesSync` works: the source is local (environment, files). */
  get synchronous(): boolean {
    return this.source.synchronous;
  }

  /** When the current values expire, if they do and have been read. */
  get expiresAt(): Date | undefined {
    return this.reading?.expiresAt === undefined ? undefined : new Date(this.reading.expiresAt);
  }

  /** The named values: cached, read again when they rotated or are about to expire. Fails with a CredentialsError. */
  async values(): Promise<ReadonlyMap<string, string>> {
    if (this.reading && !this.stale(this.reading)) return this.reading.values;
    this.pending ??= this.source.read().finally(() => (this.pending = undefined));
    return this.accept(await this.pending);
  }

  /** `values` for a synchronous source, without waiting. */
  valuesSync(): ReadonlyMap<string, string> {
    if (!this.source.readSync) throw new CredentialsError(`${this.description} cannot be read synchronously`);
    if (this.reading && !this.stale(this.reading)) return this.reading.values;
    return this.accept(this.source.readSync());
  }

  /** Forgets the cached values: the next `values` reads the source again (after a consumer saw them refused). */
  invalidate(): void {
    this.reading = undefined;
  }

  /** Stops timers (Vault token renewal); the object is not used afterwards. */
  close(): void {
    this.source.close?.();
  }

  private stale(reading: Reading): boolean {
    const now = this.now();
    if (reading.expiresAt !== undefined && now >= reading.expiresAt - EXPIRY_MARGIN_MS) return true;
    if (this.source.refreshMs !== undefined && now - reading.readAt >= this.source.refreshMs) return true;
    return this.source.changed?.(reading) ?? false;
  }

  private accept(reading: Reading): ReadonlyMap<string, string> {
    registerSecret(...reading.values.values());
    this.reading = reading;
    return reading.values;
  }
}

function compileSource(spec: CredentialsSpec, ctx: SourceContext, describe: (d: string) => void): Source {
  if (spec.env) return envSource(spec.env.vars, ctx);
  if (spec.file) return fileSource(spec.file.path, ctx);
  if (spec['systemd-credential']) {
    describe(`systemd credential ${spec['systemd-credential'].name}`);
    return systemdCredentialSource(spec['systemd-credential'].name, ctx);
  }
  if (spec['github-app-key-file']) {
    const k = spec['github-app-key-file'];
    return githubAppKeyFileSource(k.app_id_env, k.key_file, ctx);
  }
  if (spec.vault) return vaultSource(spec.vault, ctx, describe);
  if (spec['aws-secrets-manager']) return secretsManagerSource(spec['aws-secrets-manager'], ctx, describe);
  if (spec['instance-metadata']) return instanceMetadataSource(spec['instance-metadata'], ctx, describe);
  if (spec['aws-profile']) return awsProfileSource(spec['aws-profile'].profile, ctx);
  if (spec['cachix-token']) return cachixTokenSource(spec['cachix-token'].env_var, ctx);
  return noneSource(ctx);
}

export interface AwsCredentialIdentity {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
  expiration?: Date;
}

/**
 * An AWS SDK credential provider over `c`'s AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN (from
 * any source: env, a file, Vault, instance metadata, a profile). Each answer carries an expiration, so the SDK asks
 * again and sees rotated values.
 */
export function awsCredentialProvider(c: Credentials): () => Promise<AwsCredentialIdentity> {
  return async () => {
    const values = await c.values();
    const accessKeyId = values.get('AWS_ACCESS_KEY_ID');
    const secretAccessKey = values.get('AWS_SECRET_ACCESS_KEY');
    if (!accessKeyId || !secretAccessKey) {
      const missing = accessKeyId ? 'AWS_SECRET_ACCESS_KEY' : 'AWS_ACCESS_KEY_ID';
      throw new CredentialsError(`${c.description}: no ${missing} among the values (AWS credentials need both keys)`);
    }
    const sessionToken = values.get('AWS_SESSION_TOKEN');
    const expiration = c.expiresAt ?? new Date(Date.now() + PROVIDER_RECHECK_MS);
    return { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}), expiration };
  };
}
