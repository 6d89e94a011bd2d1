/**
 * Sources on this machine: environment variables, files, systemd credentials, GitHub's `.pem` download. They read
 * synchronously; files are read again when their inode, size or mtime changes (a `stat` per use, no watcher), which is
 * what an operator (or systemd, or a Vault agent writing a sink file) does when rotating one.
 */
import { readFileSync, statSync } from 'node:fs';
import { isAbsolute, resolve } from 'node:path';
import { systemdCredentialPath } from '../secrets.js';
import { parseCredentialFile } from './file-format.js';
import type { Reading, Source, SourceContext } from './source.js';

export function anchored(path: string, baseDir: string): string {
  return isAbsolute(path) ? path : resolve(baseDir, path);
}

/** "environment variable A", "environment variables A and B", "environment variables A, B and C". */
export function describeVariables(vars: readonly string[]): string {
  if (vars.length === 1) return `environment variable ${vars[0]}`;
  return `environment variables ${vars.slice(0, -1).join(', ')} and ${vars.at(-1)}`;
}

function envValue(name: string, ctx: SourceContext): string {
  const value = ctx.env[name];
  if (value === undefined || value.trim() === '') return ctx.fail(`${name} is missing or empty`);
  return value;
}

/** A file's identity and version: a rotated file (written in place or renamed over) changes at least one of these. */
function fingerprint(path: string, ctx: SourceContext): string {
  try {
    const s = statSync(path, { bigint: true });
    return `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}`;
  } catch (err) {
    return ctx.fail(`cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, err);
  }
}

function fileChanged(path: string, reading: Reading): boolean {
  try {
    const s = statSync(path, { bigint: true });
    return `${s.dev}:${s.ino}:${s.size}:${s.mtimeNs}` !== reading.fingerprint;
  } catch {
    // Gone or unreadable: read again, and let the read say why.
    return true;
  }
}

function readText(path: string, ctx: SourceContext): string {
  try {
    return readFileSync(path, 'utf8');
  } catch (err) {
    // Node's message names the path and the errno, never the content.
    return ctx.fail(`cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`, err);
  }
}

/** A synchronous source from its description and one synchronous read. */
function local(description: string, readSync: () => Reading, changed?: (r: Reading) => boolean): Source {
  return {
    description,
    synchronous: true,
    readSync,
    read: () => Promise.resolve().then(readSync),
    ...(changed ? { changed } : {}),
  };
}

/** `env = { vars = [...] }`: each variable under its own name. Read on every use: nothing to cache. */
export function envSource(vars: readonly string[], ctx: SourceContext): Source {
  return local(
    describeVariables(vars),
    () => ({ values: new Map(vars.map((v) => [v, envValue(v, ctx)])), readAt: ctx.now() }),
    () => true,
  );
}

/** `cachix-token = { env_var }`: the variable's value as CACHIX_AUTH_TOKEN. */
export function cachixTokenSource(envVar: string, ctx: SourceContext): Source {
  return local(
    `Cachix token from environment variable ${envVar}`,
    () => ({ values: new Map([['CACHIX_AUTH_TOKEN', envValue(envVar, ctx)]]), readAt: ctx.now() }),
    () => true,
  );
}

/** `none = {}`: a public cache. */
export function noneSource(ctx: SourceContext): Source {
  return local('no credentials', () => ({ values: new Map(), readAt: ctx.now() }));
}

/** A file of KEY=VALUE lines or a JSON object (`file`, `systemd-credential`): its keys. */
function credentialFile(description: string, path: string, ctx: SourceContext): Source {
  return local(
    description,
    () => {
      const before = fingerprint(path, ctx);
      const values = parseCredentialFile(readText(path, ctx), ctx.fail);
      return { values, readAt: ctx.now(), fingerprint: before };
    },
    (r) => fileChanged(path, r),
  );
}

export function fileSource(path: string, ctx: SourceContext): Source {
  const full = anchored(path, ctx.baseDir);
  return credentialFile(`credentials file ${full}`, full, ctx);
}

/** `$CREDENTIALS_DIRECTORY/NAME`, what systemd's `LoadCredential=` provides; checked when compiled. */
export function systemdCredentialSource(name: string, ctx: SourceContext): Source {
  const fail = (problem: string): never => ctx.fail(problem);
  const path = systemdCredentialPath(name, ctx.env, fail);
  return credentialFile(`systemd credential ${name}`, path, ctx);
}

/** GITHUB_APP_ID from a variable, GITHUB_APP_PRIVATE_KEY from the `.pem` file GitHub offers for download. */
export function githubAppKeyFileSource(appIdEnv: string, keyFile: string, ctx: SourceContext): Source {
  const path = anchored(keyFile, ctx.baseDir);
  return local(
    `app id from ${appIdEnv}, key file ${path}`,
    () => {
      const before = fingerprint(path, ctx);
      const key = readText(path, ctx);
      const values = new Map([
        ['GITHUB_APP_ID', envValue(appIdEnv, ctx)],
        ['GITHUB_APP_PRIVATE_KEY', key],
      ]);
      return { values, readAt: ctx.now(), fingerprint: before };
    },
    (r) => fileChanged(path, r),
  );
}
