import { z } from 'zod';
import { ConfigError } from '../../common/errors.js';
import { Credentials, credentialsSchema } from '../credentials/credentials.js';
import { type AppPermissions, compilePermissions, permissionsSchema } from '../github/permissions.js';

/**
 * Post-build hooks (`[[hooks]]` in the coordinator's TOML): commands the operator runs on the coordinator after a
 * build's result is recorded. They are trusted server configuration; a repository never defines one.
 *
 * ```toml
 * [[hooks]]
 * id = "push-outputs"
 * command = ["/run/current-system/sw/bin/nix", "copy", "--to", "file:///srv/cache", "$OUT_PATHS"]
 * env = { NIX_REMOTE = "daemon", WHERE = "$REPO@$BRANCH" }
 * credentials = { env = { vars = ["CACHE_TOKEN"] } }   # each value exported under its own name
 * timeout_seconds = 600                                # at most [security] max_hook_timeout_seconds
 * on = ["success", "failure"]                          # default: "success"
 * permissions = { allowed_repos = ["my-org/*"], allowed_branches = ["main"] }
 * ```
 *
 * `command` is an argv, run without a shell. An argument that is exactly `$NAME` or `${NAME}` of a hook variable
 * (`HOOK_VARIABLES`) is replaced by its value — `$OUT_PATHS` by one argument per output path; any other argument is
 * passed as written, so a `/bin/sh -c '…"$ATTR"…'` script reads the variables from its environment, where the shell
 * never parses their values as code (ATTR is named by repository code, which may be a stranger's). `env` values are
 * data: `$NAME` and `${NAME}` in them are replaced, `$$` is a `$`. A `$NAME` that is no hook variable, as a whole
 * argument or in an env value, is a startup error: nothing else is in a hook's environment, and a credential is
 * exported as a variable of its own name only, never put in an argv (which every user reads through `ps`).
 */

/** Variables every hook run gets, in its environment and for `$NAME` in its command and env. */
export const HOOK_VARIABLES = [
  // Nix's post-build-hook names.
  'DRV_PATH',
  'OUT_PATHS',
  // Which build this was: the attribute (`<job>.<attr>`) a run asked for, its repository and branch, the outcome.
  'ATTR',
  'REPO',
  'BRANCH',
  'RESULT',
  // Upstream eka-ci's names.
  'EKA_JOB_NAME',
  'EKA_SYSTEM',
  'EKA_COMMIT_SHA',
  'EKA_IS_FOD',
  'EKA_BUILD_LOG_PATH',
  // The build's state: `succeeded`, `failed` or `timed-out` (RESULT says only success or failure).
  'EKA_BUILD_STATE',
] as const;
export type HookVariable = (typeof HOOK_VARIABLES)[number];

export type HookResult = 'success' | 'failure';

// Long enough to push a large closure over a slow link; a hook that needs longer says so with timeout_seconds.
const DEFAULT_HOOK_TIMEOUT_S = 300;
// An hour: a hook still running after that is stuck, and it holds one of the few slots hooks share.
const DEFAULT_MAX_HOOK_TIMEOUT_S = 3_600;
// A Node timer waits at most 2^31 - 1 ms and fires at once when asked for longer.
const MAX_TIMER_SECONDS = Math.floor((2 ** 31 - 1) / 1000);

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;
// `$$`, `${NAME}` or `$NAME`; a `$` before anything else stays a `$`.
const REFERENCE = /\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))/g;
// An argument that is one reference and nothing else.
const WHOLE_REFERENCE = /^\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))$/;

/** Keys of `[security]` that belong to hooks. */
export const hookSecurityKeys = {
  /** No hook may run longer: a hook's timeout_seconds above it is a startup error. */
  max_hook_timeout_seconds: z
    .number()
    .int()
    .positive()
    .max(MAX_TIMER_SECONDS, `at most ${MAX_TIMER_SECONDS} (24.8 days, the longest a timer waits)`)
    .default(DEFAULT_MAX_HOOK_TIMEOUT_S),
  /** Every hook run (started, finished, skipped) is written to the audit log. */
  audit_hooks: z.boolean().default(true),
};

const result = z.enum(['success', 'failure']);

const hookSchema = z
  .object({
    id: z.string().regex(/^[A-Za-z0-9._-]+$/, 'letters, digits, ".", "_" and "-" only'),
    command: z
      .array(z.string())
      .min(1, 'an argv: the program, then its arguments')
      .refine((c) => c[0] !== '', {
        message: 'the program (the first element) is empty',
      }),
    env: z.record(z.string().regex(ENV_NAME, 'a variable name: letters, digits and "_"'), z.string()).default({}),
    credentials: credentialsSchema.optional(),
    timeout_seconds: z.number().int().positive().optional(),
    on: z
      .union([result, z.array(result).min(1, 'name success, failure or both')])
      .default('success')
      .transform((o) => new Set<HookResult>([o].flat())),
    permissions: permissionsSchema,
  })
  .strict();

/** The `[[hooks]]` list. */
export const hooksSchema = z
  .array(hookSchema)
  .default([])
  .refine((hooks) => new Set(hooks.map((h) => h.id)).size === hooks.length, { message: 'two hooks share an id' });

export interface HookSpec {
  id: string;
  /** The argv as configured, `$NAME`s unexpanded (see `expandCommand`). */
  command: readonly string[];
  env: Readonly<Record<string, string>>;
  /** Server-side only; values are read when a run starts and exported under their own names. */
  credentials: Credentials | undefined;
  timeoutSeconds: number;
  on: ReadonlySet<HookResult>;
  permissions: AppPermissions;
}

export interface HooksOptions {
  hooks: HookSpec[];
  /** `[security] max_hook_timeout_seconds`. */
  maxTimeoutSeconds: number;
  /** `[security] audit_hooks`. */
  audit: boolean;
}

/** Compiles `[[hooks]]` against `[security]`; every mistake is a ConfigError naming the hook and its key. */
export function compileHooks(
  raw: z.infer<typeof hooksSchema>,
  security: { max_hook_timeout_seconds: number; audit_hooks: boolean },
  ctx: { source: string; env: NodeJS.ProcessEnv; baseDir: string },
): HooksOptions {
  const max = security.max_hook_timeout_seconds;
  const hooks = raw.map((h): HookSpec => {
    const where = `${ctx.source}: hooks.${h.id}`;
    if (h.timeout_seconds !== undefined && h.timeout_seconds > max) {
      throw new ConfigError(
        `${where}.timeout_seconds: ${h.timeout_seconds} is more than security.max_hook_timeout_seconds (${max}): ` +
          'shorten the hook, or raise the cap',
      );
    }
    h.command.forEach((arg, i) => {
      const name = wholeReference(arg);
      if (name !== undefined && !isHookVariable(name)) unknownVariable(name, `${where}.command[${i}]`);
    });
    for (const [name, value] of Object.entries(h.env)) {
      if ((HOOK_VARIABLES as readonly string[]).includes(name)) {
        throw new ConfigError(`${where}.env.${name}: set by eka-ci for every run; pick another name`);
      }
      checkReferences(value, `${where}.env.${name}`);
    }
    // A CredentialsError names `where` and the source, never a value. `none` is no credentials (for the fork rule too).
    const credentials =
      h.credentials === undefined || h.credentials.none !== undefined
        ? undefined
        : Credentials.compile(`${where}.credentials`, h.credentials, ctx);
    return {
      id: h.id,
      command: h.command,
      env: h.env,
      credentials,
      timeoutSeconds: h.timeout_seconds ?? Math.min(DEFAULT_HOOK_TIMEOUT_S, max),
      on: h.on,
      permissions: compilePermissions(h.permissions),
    };
  });
  return { hooks, maxTimeoutSeconds: max, audit: security.audit_hooks };
}

function isHookVariable(name: string): name is HookVariable {
  return (HOOK_VARIABLES as readonly string[]).includes(name);
}

function wholeReference(arg: string): string | undefined {
  const m = WHOLE_REFERENCE.exec(arg);
  return m ? (m[1] ?? m[2]) : undefined;
}

function checkReferences(template: string, where: string): void {
  for (const m of template.matchAll(REFERENCE)) {
    const name = m[2] ?? m[3];
    if (name !== undefined && !isHookVariable(name)) unknownVariable(name, where);
  }
}

function unknownVariable(name: string, where: string): never {
  throw new ConfigError(
    `${where}: $${name} is not a hook variable (${HOOK_VARIABLES.join(', ')}); a credential reaches the hook as an ` +
      'environment variable of its own name, never through its command or env; in env, $$ is a literal $',
  );
}

/** `template` with the hook variables put in (`$NAME`, `${NAME}`; `$$` is `$`). */
export function expandTemplate(template: string, vars: Readonly<Record<HookVariable, string>>): string {
  return template.replace(REFERENCE, (whole, dollar: string | undefined, braced?: string, bare?: string) => {
    if (dollar !== undefined) return '$';
    const name = braced ?? bare ?? '';
    return isHookVariable(name) ? vars[name] : whole;
  });
}

/** The argv of a run: an argument that is exactly a hook variable replaced (`$OUT_PATHS`: one per output path). */
export function expandCommand(
  command: readonly string[],
  vars: Readonly<Record<HookVariable, string>>,
  outPaths: readonly string[],
): string[] {
  return command.flatMap((arg) => {
    const name = wholeReference(arg);
    if (name === undefined || !isHookVariable(name)) return [arg];
    return name === 'OUT_PATHS' ? [...outPaths] : [vars[name]];
  });
}
