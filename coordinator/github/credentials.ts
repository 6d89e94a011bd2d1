import { createPrivateKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { inspect } from 'node:util';
import { isAbsolute, resolve } from 'node:path';
import { z } from 'zod';
import { GitHubCredentialsError } from './errors.js';
import { systemdCredentialPath } from '../secrets.js';

/**
 * Where a GitHub App's id and private key come from. They live only on the coordinator: nothing here is reachable
 * from a repository's configuration, and no error or log line ever contains the key (or the id's raw value, in
 * case the key was pasted into the wrong variable).
 *
 * - `env`: two environment variables, the app id's then the key's.
 * - `file`: a file holding `GITHUB_APP_ID` and `GITHUB_APP_PRIVATE_KEY`, as a JSON object or as `KEY=VALUE` lines.
 * - `systemd-credential`: the same format, read from `$CREDENTIALS_DIRECTORY/NAME` (systemd's `LoadCredential=`).
 * - `github-app-key-file`: the app id from an environment variable and the `.pem` file GitHub offers for download.
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

const envVar = z.string().regex(/^[A-Za-z_][A-Za-z0-9_]*$/, 'an environment variable name');

/** The `credentials` table of a `[[github_apps]]` entry; without one, the two default environment variables. */
export const credentialsSchema = z
  .object({
    env: z
      .object({ vars: z.tuple([envVar, envVar]).default([DEFAULT_APP_ID_VAR, DEFAULT_PRIVATE_KEY_VAR]) })
      .strict()
      .optional(),
    file: z
      .object({ path: z.string().min(1) })
      .strict()
      .optional(),
    'systemd-credential': z
      .object({ name: z.string().min(1) })
      .strict()
      .optional(),
    'github-app-key-file': z
      .object({ app_id_env: envVar, key_file: z.string().min(1) })
      .strict()
      .optional(),
  })
  .strict()
  .refine((c) => Object.values(c).filter((v) => v !== undefined).length === 1, {
    message: 'exactly one of env, file, systemd-credential or github-app-key-file',
  })
  .prefault({ env: {} });

export function credentialSource(c: z.infer<typeof credentialsSchema>): CredentialSource {
  if (c.file) return { kind: 'file', path: c.file.path };
  if (c['systemd-credential']) return { kind: 'systemd-credential', name: c['systemd-credential'].name };
  const keyFile = c['github-app-key-file'];
  if (keyFile) return { kind: 'github-app-key-file', appIdEnv: keyFile.app_id_env, keyFile: keyFile.key_file };
  const [appIdVar, privateKeyVar] = c.env?.vars ?? [DEFAULT_APP_ID_VAR, DEFAULT_PRIVATE_KEY_VAR];
  return { kind: 'env', appIdVar, privateKeyVar };
}

const PEM = /^-----BEGIN ((?:RSA )?PRIVATE KEY)-----\r?\n[A-Za-z0-9+/=\s]+\r?\n-----END \1-----\s*$/;

/**
 * Reads one app's credentials. `baseDir` anchors relative paths (the configuration file's directory); `appName` is
 * the configuration's name for the app, used only in error messages.
 */
export function resolveCredentials(
  source: CredentialSource,
  env: NodeJS.ProcessEnv,
  baseDir: string,
  appName = '(unnamed)',
): AppCredentials {
  const where = describeSource(source, baseDir);
  const fail: Fail = (problem, cause) => {
    throw new GitHubCredentialsError(`GitHub App ${appName}: ${where}: ${problem}`, { cause });
  };
  let appId: string | undefined;
  let privateKey: string | undefined;
  let idName = DEFAULT_APP_ID_VAR;
  let keyName = DEFAULT_PRIVATE_KEY_VAR;
  switch (source.kind) {
    case 'env':
      [idName, keyName] = [source.appIdVar, source.privateKeyVar];
      appId = env[source.appIdVar];
      privateKey = env[source.privateKeyVar];
      break;
    case 'file':
    case 'systemd-credential': {
      const values = parseCredentialFile(readSecret(credentialPath(source, env, baseDir, fail), fail), fail);
      appId = values.get(DEFAULT_APP_ID_VAR);
      privateKey = values.get(DEFAULT_PRIVATE_KEY_VAR);
      break;
    }
    case 'github-app-key-file':
      idName = source.appIdEnv;
      keyName = 'the key file';
      appId = env[source.appIdEnv];
      privateKey = readSecret(anchored(source.keyFile, baseDir), fail);
      break;
  }
  if (appId === undefined || appId.trim() === '') return fail(`${idName} is missing or empty`);
  if (privateKey === undefined || privateKey.trim() === '') return fail(`${keyName} is missing or empty`);
  if (!/^\s*[1-9][0-9]{0,14}\s*$/.test(appId)) return fail(`${idName} is not a GitHub App id (a positive integer)`);
  return redacted({ appId: Number(appId), privateKey: checkPrivateKey(privateKey, keyName, fail) });
}

/** Where `source` looks, for messages: names and paths only. */
function describeSource(source: CredentialSource, baseDir: string): string {
  switch (source.kind) {
    case 'env':
      return `environment variables ${source.appIdVar} and ${source.privateKeyVar}`;
    case 'file':
      return `credentials file ${anchored(source.path, baseDir)}`;
    case 'systemd-credential':
      return `systemd credential ${source.name}`;
    case 'github-app-key-file':
      return `app id from ${source.appIdEnv}, key file ${anchored(source.keyFile, baseDir)}`;
  }
}

function credentialPath(
  source: Extract<CredentialSource, { kind: 'file' | 'systemd-credential' }>,
  env: NodeJS.ProcessEnv,
  baseDir: string,
  fail: Fail,
): string {
  if (source.kind === 'file') return anchored(source.path, baseDir);
  return systemdCredentialPath(source.name, env, fail);
}

function anchored(path: string, baseDir: string): string {
  return isAbsolute(path) ? path : resolve(baseDir, path);
}

function readSecret(path: string, fail: Fail): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    // Node's message names the path and the errno, never the content.
    return fail(`cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, err);
  }
}

/** A JSON object, or `KEY=VALUE` lines (optionally `export`ed, values optionally quoted and spanning lines). */
export function parseCredentialFile(
  text: string,
  fail: Fail = (problem) => {
    throw new GitHubCredentialsError(problem);
  },
): Map<string, string> {
  const trimmed = text.trim();
  if (trimmed.startsWith('{')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(trimmed);
    } catch {
      // JSON.parse quotes the text around the error, which could be part of the key.
      return fail('starts with "{" but is not valid JSON');
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return fail('is not a JSON object');
    const values = new Map<string, string>();
    for (const [key, value] of Object.entries(parsed)) {
      if (typeof value === 'string' || typeof value === 'number') values.set(key, String(value));
    }
    return values;
  }
  return parseKeyValueLines(text, fail);
}

function parseKeyValueLines(text: string, fail: Fail): Map<string, string> {
  const values = new Map<string, string>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    if (line.trim() === '' || line.trim().startsWith('#')) continue;
    const match = /^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/.exec(line);
    if (!match) return fail(`line ${i + 1} is not KEY=VALUE`);
    const [, key, rest] = match as unknown as [string, string, string];
    const quote = rest[0];
    if (quote !== '"' && quote !== "'") {
      values.set(key, rest.trim());
      continue;
    }
    // A quoted value may span lines: that is how a PEM fits into a dotenv file.
    const first = i;
    let quoted = rest.slice(1);
    while (closingQuote(quoted, quote) < 0) {
      if (++i >= lines.length) return fail(`line ${first + 1}: the value of ${key} has no closing ${quote}`);
      quoted += `\n${lines[i]}`;
    }
    const close = closingQuote(quoted, quote);
    if (!/^\s*(#.*)?$/.test(quoted.slice(close + 1))) return fail(`line ${i + 1}: text after the quoted ${key}`);
    values.set(key, quote === '"' ? unescape(quoted.slice(0, close)) : quoted.slice(0, close));
  }
  return values;
}

function closingQuote(text: string, quote: string): number {
  for (let i = 0; i < text.length; i++) {
    if (quote === '"' && text[i] === '\\') i++;
    else if (text[i] === quote) return i;
  }
  return -1;
}

function unescape(raw: string): string {
  return raw.replace(/\\(.)/g, (_, c: string) => (c === 'n' ? '\n' : c === 'r' ? '\r' : c === 't' ? '\t' : c));
}

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
  const shown = (): object => ({ appId: credentials.appId, privateKey: '[redacted]' });
  Object.defineProperty(credentials, 'toJSON', { value: shown, enumerable: false });
  Object.defineProperty(credentials, inspect.custom, { value: shown, enumerable: false });
  return credentials;
}
