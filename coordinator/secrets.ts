import { readFileSync } from 'node:fs';
import { basename, isAbsolute, resolve } from 'node:path';
import { ConfigError } from '../common/errors.js';
import { registerSecret } from '../common/redaction.js';

/**
 * Where the coordinator's secrets come from. Every secret in the configuration may be given three ways, under one
 * key with suffixes: `KEY` (the value in the file, for tests), `KEY_file` (a path, relative to the configuration
 * file) or `KEY_credential` (a systemd credential name: the file `$CREDENTIALS_DIRECTORY/NAME` that
 * `LoadCredential=NAME:/path` provides, so the secret is never in the Nix store or the unit). Values are read once
 * at start-up and trimmed; no message ever contains one, and the logger redacts every one it is handed.
 */
export interface SecretSource {
  value?: string | undefined;
  file?: string | undefined;
  credential?: string | undefined;
}

/** The path of systemd credential `name`; `fail` receives the problem when there is none. */
export function systemdCredentialPath(name: string, env: NodeJS.ProcessEnv, fail: (problem: string) => never): string {
  if (basename(name) !== name || name === '..' || name === '.' || name === '') {
    return fail(`credential name ${JSON.stringify(name)} is not a plain file name`);
  }
  const dir = env.CREDENTIALS_DIRECTORY;
  if (!dir) {
    return fail(
      `CREDENTIALS_DIRECTORY is not set: run the coordinator as a systemd service with ` +
        `LoadCredential=${name}:/path/to/file, or give the secret as a file`,
    );
  }
  return resolve(dir, name);
}

/**
 * The secret called `field` (e.g. `webhook_secret`) in the table at `where` (e.g. `security`, for messages), or
 * `undefined` when none of its forms is given. Two forms at once are an error: which one wins would be a guess.
 */
export function readSecret(
  where: string,
  field: string,
  from: SecretSource,
  ctx: { source: string; env: NodeJS.ProcessEnv; baseDir: string },
): string | undefined {
  const given = (['value', 'file', 'credential'] as const).filter((k) => from[k] !== undefined);
  const fail = (problem: string): never => {
    throw new ConfigError(`${ctx.source}: ${where}.${field}: ${problem}`);
  };
  if (given.length > 1) {
    const names = given.map((k) => (k === 'value' ? field : `${field}_${k}`));
    return fail(`give one of ${names.join(' and ')}, not both`);
  }
  if (from.value !== undefined) {
    registerSecret(from.value);
    return from.value;
  }
  let path: string;
  if (from.file !== undefined) path = isAbsolute(from.file) ? from.file : resolve(ctx.baseDir, from.file);
  else if (from.credential !== undefined) path = systemdCredentialPath(from.credential, ctx.env, fail);
  else return undefined;
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    // The errno and the path, never the content.
    return fail(`cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const value = text.trim();
  if (value === '') return fail(`${path} is empty`);
  registerSecret(value);
  return value;
}
