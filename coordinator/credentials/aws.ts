/**
 * AWS sources, through the AWS SDK: Secrets Manager's GetSecretValue (JSON 1.1 protocol, SigV4) and the shared
 * config files' profiles (`~/.aws/credentials` and `~/.aws/config`, or $AWS_SHARED_CREDENTIALS_FILE and
 * $AWS_CONFIG_FILE).
 *
 * Secrets Manager is called with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (/ AWS_SESSION_TOKEN) from the
 * environment when both are set, else with `profile`'s credentials when one is named, else with the SDK's default
 * chain (which ends at the instance's role).
 */
import { homedir } from 'node:os';
import { join } from 'node:path';
import { GetSecretValueCommand, SecretsManagerClient } from '@aws-sdk/client-secrets-manager';
import { fromIni, fromNodeProviderChain } from '@aws-sdk/credential-providers';
import type { SecretsManagerSpec } from './schema.js';
import { isObject, REQUEST_TIMEOUT_MS, stringFields, type Reading, type Source, type SourceContext } from './source.js';

// A rotated secret has no expiry to wait for: it is read again this often (Secrets Manager's rotation schedules are
// hours to days apart; five minutes costs one request per secret per five minutes).
const DEFAULT_REFRESH_MS = 5 * 60_000;
// Reading local files is cheap: a changed profile is seen within a minute.
const PROFILE_REFRESH_MS = 60_000;
// One retry of a throttled or failed call; the consumer retries beyond that with its own backoff.
const MAX_ATTEMPTS = 2;

type Identity = { accessKeyId: string; secretAccessKey: string; sessionToken?: string; expiration?: Date };

function sharedFiles(env: NodeJS.ProcessEnv): { filepath: string; configFilepath: string } {
  const home = env.HOME ?? homedir();
  return {
    filepath: env.AWS_SHARED_CREDENTIALS_FILE ?? join(home, '.aws', 'credentials'),
    configFilepath: env.AWS_CONFIG_FILE ?? join(home, '.aws', 'config'),
  };
}

/** An AWS error's name and status (the SDK maps Secrets Manager's `__type` to the name); never a value. */
function awsProblem(err: unknown): string {
  const e = err as Error & { $metadata?: { httpStatusCode?: number }; code?: string };
  const status = e.$metadata?.httpStatusCode;
  return `${e.name}${status ? ` (HTTP ${status})` : ''}${e.message && e.message !== e.name ? `: ${e.message}` : ''}`;
}

export function secretsManagerSource(
  spec: SecretsManagerSpec,
  ctx: SourceContext,
  describe: (d: string) => void,
): Source {
  const region = spec.region ?? ctx.env.AWS_REGION ?? ctx.env.AWS_DEFAULT_REGION;
  const description =
    `aws-secrets-manager secret ${spec.secret_name} in ${region ?? '(no region)'}` +
    (spec.endpoint ? ` at ${spec.endpoint}` : '');
  describe(description);
  if (!region) ctx.fail('no region: give region, or set AWS_REGION');
  const credentials = (): (() => Promise<Identity>) | Identity => {
    const { AWS_ACCESS_KEY_ID: accessKeyId, AWS_SECRET_ACCESS_KEY: secretAccessKey } = ctx.env;
    if (accessKeyId && secretAccessKey) {
      const sessionToken = ctx.env.AWS_SESSION_TOKEN;
      return { accessKeyId, secretAccessKey, ...(sessionToken ? { sessionToken } : {}) };
    }
    if (spec.profile) return fromIni({ profile: spec.profile, ...sharedFiles(ctx.env), ignoreCache: true });
    return fromNodeProviderChain();
  };
  let client: SecretsManagerClient | undefined;

  const read = async (): Promise<Reading> => {
    client ??= new SecretsManagerClient({
      region,
      ...(spec.endpoint ? { endpoint: spec.endpoint } : {}),
      credentials: credentials(),
      maxAttempts: MAX_ATTEMPTS,
      requestHandler: { requestTimeout: REQUEST_TIMEOUT_MS, connectionTimeout: REQUEST_TIMEOUT_MS },
    });
    let answer;
    try {
      answer = await client.send(new GetSecretValueCommand({ SecretId: spec.secret_name }));
    } catch (err) {
      const name = (err as Error).name;
      if (name === 'ResourceNotFoundException') return ctx.fail(`secret not found (${awsProblem(err)})`, err);
      if (/Signature|UnrecognizedClient|ExpiredToken|AccessDenied|InvalidClientTokenId/.test(name)) {
        return ctx.fail(
          `AWS refused the request: ${awsProblem(err)}; check the AWS credentials and that they may ` +
            `secretsmanager:GetSecretValue this secret`,
          err,
        );
      }
      return ctx.fail(`GetSecretValue failed: ${awsProblem(err)}`, err);
    }
    if (answer.SecretString === undefined) {
      return ctx.fail('the secret has no SecretString (a binary secret): store the values as a string');
    }
    let values: Map<string, string>;
    try {
      const parsed: unknown = JSON.parse(answer.SecretString);
      values = isObject(parsed) ? stringFields(parsed) : new Map([[spec.secret_name, answer.SecretString]]);
    } catch {
      values = new Map([[spec.secret_name, answer.SecretString]]);
    }
    return { values, readAt: ctx.now(), fingerprint: answer.VersionId };
  };

  return {
    description,
    synchronous: false,
    refreshMs: (spec.refresh_seconds ?? DEFAULT_REFRESH_MS / 1000) * 1000,
    read,
    close: () => client?.destroy(),
  };
}

/** A profile's keys, read through the SDK (credential_process, SSO and assumed roles work as the SDK does them). */
export function awsProfileSource(profile: string, ctx: SourceContext): Source {
  const read = async (): Promise<Reading> => {
    let identity: Identity;
    try {
      identity = await fromIni({ profile, ...sharedFiles(ctx.env), ignoreCache: true })();
    } catch (err) {
      return ctx.fail(`cannot get the profile's credentials: ${awsProblem(err)}`, err);
    }
    const values = new Map([
      ['AWS_ACCESS_KEY_ID', identity.accessKeyId],
      ['AWS_SECRET_ACCESS_KEY', identity.secretAccessKey],
    ]);
    if (identity.sessionToken) values.set('AWS_SESSION_TOKEN', identity.sessionToken);
    return { values, readAt: ctx.now(), expiresAt: identity.expiration?.getTime() };
  };
  return { description: `aws-profile ${profile}`, synchronous: false, refreshMs: PROFILE_REFRESH_MS, read };
}
