import { createPrivateKey } from 'node:crypto';
import { inspect } from 'node:util';
import { z } from 'zod';
import { IllegalStateError } from '../../common/errors.js';
import { registerSecret } from '../../common/redaction.js';
import {
  type CredentialContext,
  Credentials,
  CredentialsError,
  type CredentialsSpec,
  credentialsTable,
} from '../credentials/credentials.js';
import { parseCredentialFile as parseFile } from '../credentials/file-format.js';
import { envVar } from '../credentials/schema.js';
import { GitHubCredentialsError } from './errors.js';

/**
 * Where a GitHub App's id and private key come from: any source of coordinator/credentials (a `credentials` table
 * on the `[[github_apps]]` entry). They live only on the coordinator: nothing here is reachable from a repository's
 * configuration, and no error or log line ever contains the key (or the id's raw value, in case the key was pasted
 * into the wrong variable).
 *
 * - `env`: two environment variables, the app id's then the key's (`vars` is positional here).
 * - `github-app-key-file`: the app id from an environment variable and the `.pem` file GitHub offers for download.
 * - every other source (`file`, `systemd-credential`, `vault`, `aws-secrets-manager`, `aws-profile`,
 *   `instance-metadata`): the values named `GITHUB_APP_ID` and `GITHUB_APP_PRIVATE_KEY`.
 *
 * Local sources (environment, files) are read when the configuration is compiled, so a bad one fails start-up there;
 * remote ones when the coordinator starts (`AppCredentialSource.current`). All are read again when they rotate, the
 * next time the app needs them.
 */
export type CredentialSource =
  | { kind: 'env'; appIdVar: string; privateKeyVar: string }
  | { kind: 'file'; path: string }
  | { kind: 'systemd-credential'; name: string }
  | { kind: 'github-app-key-file'; appIdEnv: string; keyFile: string };

export interface AppCredentials {
  appId: number;
  privateKey: string;
}

export const DEFAULT_APP_ID_VAR = 'GITHUB_APP_ID';
export const DEFAULT_PRIVATE_KEY_VAR = 'GITHUB_APP_PRIVATE_KEY';

type Fail = (problem: string, cause?: unknown) => never;

/** The `credentials` table of a `[[github_apps]]` entry; without one, the two default environment variables. */
export const credentialsSchema = credentialsTable(
  z.object({ vars: z.tuple([envVar, envVar]).default([DEFAULT_APP_ID_VAR, DEFAULT_PRIVATE_KEY_VAR]) }).strict(),
  'exactly one of env, file, systemd-credential or github-app-key-file, ' +
    'or a secret store: vault, aws-secrets-manager, aws-profile or instance-metadata',
).prefault({ env: {} });

export type GitHubCredentialsSpec = z.infer<typeof credentialsSchema>;

export function credentialSource(c: GitHubCredentialsSpec): CredentialSource {
  if (c.file) return { kind: 'file', path: c.file.path };
  if (c['systemd-credential']) return { kind: 'systemd-credential', name: c['systemd-credential'].name };
  const keyFile = c['github-app-key-file'];
  if (keyFile) return { kind: 'github-app-key-file', appIdEnv: keyFile.app_id_env, keyFile: keyFile.key_file };
  const [appIdVar, privateKeyVar] = c.env?.vars ?? [DEFAULT_APP_ID_VAR, DEFAULT_PRIVATE_KEY_VAR];
  return { kind: 'env', appIdVar, privateKeyVar };
}

function specOf(source: CredentialSource): CredentialsSpec {
  switch (source.kind) {
    case 'env':
      return { env: { vars: [source.appIdVar, source.privateKeyVar] } };
    case 'file':
      return { file: { path: source.path } };
    case 'systemd-credential':
      return { 'systemd-credential': { name: source.name } };
    case 'github-app-key-file':
      return { 'github-app-key-file': { app_id_env: source.appIdEnv, key_file: source.keyFile } };
  }
}

/**
 * One app's credentials from its source: `current()` reads (or re-reads, after rotation) and checks them;
 * `credentials` shows the last ones read.
 */
export class AppCredentialSource {
  /** The last credentials read, as a live view: its fields follow rotation. */
  readonly credentials: AppCredentials;
  private last: AppCredentials | undefined;
  private lastRaw: string | undefined;

  private constructor(
    /** The configuration file, for messages. */
    readonly configFile: string,
    private readonly appName: string,
    private readonly source: Credentials,
    private readonly idName: string,
    private readonly keyName: string,
    private readonly valueNames: readonly [string, string],
  ) {
    const view = (): AppCredentials => {
      if (!this.last) {
        throw new IllegalStateError(`GitHub App ${appName}: ${source.description}: read when the coordinator starts`);
      }
      return this.last;
    };
    const live = {} as AppCredentials;
    Object.defineProperty(live, 'appId', { get: () => view().appId, enumerable: true });
    Object.defineProperty(live, 'privateKey', { get: () => view().privateKey, enumerable: true });
    redactedView(live, () => this.last?.appId);
    this.credentials = live;
  }

  /** Checks the table without reading remote sources; `appName` is the configuration's name for the app. */
  static compile(appName: string, spec: GitHubCredentialsSpec, ctx: CredentialContext): AppCredentialSource {
    if (spec['cachix-token'] || spec.none) {
      throw new GitHubCredentialsError(
        `GitHub App ${appName}: ${spec.none ? 'none' : 'cachix-token'} gives no app id and private key`,
      );
    }
    const source = githubError(() => Credentials.compile(`GitHub App ${appName}`, spec, ctx));
    if (spec.env) {
      const [id, key] = spec.env.vars;
      return new AppCredentialSource(ctx.source, appName, source, id, key, [id, key]);
    }
    const names = [DEFAULT_APP_ID_VAR, DEFAULT_PRIVATE_KEY_VAR] as const;
    if (spec['github-app-key-file']) {
      return new AppCredentialSource(
        ctx.source,
        appName,
        source,
        spec['github-app-key-file'].app_id_env,
        'the key file',
        names,
      );
    }
    return new AppCredentialSource(ctx.source, appName, source, DEFAULT_APP_ID_VAR, DEFAULT_PRIVATE_KEY_VAR, names);
  }

  /** Whether `resolveSync` works: environment and local files. */
  get synchronous(): boolean {
    return this.source.synchronous;
  }

  get description(): string {
    return this.source.description;
  }

  /** The credentials of a synchronous source, read now (or again, if they rotated). */
  resolveSync(): AppCredentials {
    return this.accept(githubError(() => this.source.valuesSync()));
  }

  /**
   * The credentials, read again when their source rotated. The same object is returned until they change, so a
   * caller tells a rotation by identity.
   */
  async current(): Promise<AppCredentials> {
    let values: ReadonlyMap<string, string>;
    try {
      values = await this.source.values();
    } catch (err) {
      throw toGitHubError(err);
    }
    return this.accept(values);
  }

  close(): void {
    this.source.close();
  }

  private accept(values: ReadonlyMap<string, string>): AppCredentials {
    const [idValue, keyValue] = this.valueNames;
    const appId = values.get(idValue);
    const privateKey = values.get(keyValue);
    const raw = `${appId}\0${privateKey}`;
    if (this.last && raw === this.lastRaw) return this.last;
    const fail: Fail = (problem, cause) => {
      throw new GitHubCredentialsError(`GitHub App ${this.appName}: ${this.source.description}: ${problem}`, { cause });
    };
    if (appId === undefined || appId.trim() === '') return fail(`${this.idName} is missing or empty`);
    if (privateKey === undefined || privateKey.trim() === '') return fail(`${this.keyName} is missing or empty`);
    if (!/^\s*[1-9][0-9]{0,14}\s*$/.test(appId)) {
      return fail(`${this.idName} is not a GitHub App id (a positive integer)`);
    }
    const checked = redacted({ appId: Number(appId), privateKey: checkPrivateKey(privateKey, this.keyName, fail) });
    // The key as it will be used (newlines restored), beside the raw value the source registered.
    registerSecret(checked.privateKey);
    this.last = checked;
    this.lastRaw = raw;
    return checked;
  }
}

function toGitHubError(err: unknown): unknown {
  if (!(err instanceof CredentialsError)) return err;
  return new GitHubCredentialsError(err.message, { cause: err });
}

function githubError<T>(f: () => T): T {
  try {
    return f();
  } catch (err) {
    throw toGitHubError(err);
  }
}

/**
 * Reads one app's credentials from a local source. `baseDir` anchors relative paths (the configuration file's
 * directory); `appName` is the configuration's name for the app, used only in error messages.
 */
export function resolveCredentials(
  source: CredentialSource,
  env: NodeJS.ProcessEnv,
  baseDir: string,
  appName = '(unnamed)',
): AppCredentials {
  const spec = specOf(source) as GitHubCredentialsSpec;
  return AppCredentialSource.compile(appName, spec, { source: appName, env, baseDir }).resolveSync();
}

/** A JSON object, or `KEY=VALUE` lines (optionally `export`ed, values optionally quoted and spanning lines). */
export function parseCredentialFile(
  text: string,
  fail: Fail = (problem) => {
    throw new GitHubCredentialsError(problem);
  },
): Map<string, string> {
  return parseFile(text, fail);
}

const PEM = /^-----BEGIN ((?:RSA )?PRIVATE KEY)-----\r?\n[A-Za-z0-9+/=\s]+\r?\n-----END \1-----\s*$/;

/**
 * A key as deployments tend to carry it: a PEM, perhaps with its newlines written as `\n` (the usual way to fit it
 * into one environment variable). It must be an RSA key: GitHub signs app JWTs with RS256 only.
 */
function checkPrivateKey(key: string, keyName: string, fail: Fail): string {
  const pem = (key.includes('\n') ? key : key.replace(/\\n/g, '\n')).trim() + '\n';
  if (!PEM.test(pem)) return fail(`${keyName} is not a PEM private key (-----BEGIN RSA PRIVATE KEY----- …)`);
  let type: string | undefined;
  try {
    type = createPrivateKey(pem).asymmetricKeyType;
  } catch (err) {
    // OpenSSL's decoder messages are fixed strings ("unsupported", "bad decrypt"): they carry no key material.
    return fail(`${keyName} is PEM but not a usable private key (${(err as Error).message})`, err);
  }
  if (type !== 'rsa') return fail(`${keyName} is a ${type ?? 'unknown'} key; GitHub Apps use RSA keys`);
  return pem;
}

/** Keeps the key out of JSON (and so out of pino's logs) and out of `console.log`, should options ever be logged. */
function redacted(credentials: AppCredentials): AppCredentials {
  return redactedView(credentials, () => credentials.appId);
}

function redactedView(credentials: AppCredentials, appId: () => number | undefined): AppCredentials {
  const shown = (): object => ({ appId: appId(), privateKey: '[redacted]' });
  Object.defineProperty(credentials, 'toJSON', { value: shown, enumerable: false });
  Object.defineProperty(credentials, inspect.custom, { value: shown, enumerable: false });
  return credentials;
}
