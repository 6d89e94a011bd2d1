import { z } from 'zod';
import { globProblem } from './path-globs.js';

/**
 * The raw shape of `.eka-ci/config.json`, exactly as users write it (snake_case). Every object is strict so a
 * misspelt key is an error naming it rather than an option silently ignored. `compileRepoConfig` turns the parsed
 * value into the camelCase `RepoConfig` that the rest of the coordinator reads.
 */

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;
const name = z
  .string()
  .regex(NAME, 'names start with a letter or digit and contain only letters, digits, ".", "_", "-"');

export const FLAKE_OUTPUTS = ['checks', 'packages', 'hydraJobs'] as const;

const sizeCheck = z
  .object({
    max_increase_percent: z.number().min(0),
    base_branch: z.string().min(1).optional(),
  })
  .strict();

const pathGlob = z.string().superRefine((glob, ctx) => {
  const problem = globProblem(glob);
  if (problem !== undefined) ctx.addIssue({ code: 'custom', message: problem });
});

// Upstream eka-ci reads this spelling too, meaning the same.
const UPSTREAM_JOB_ALIASES: Readonly<Record<string, string>> = { 'allow-eval-failures': 'allow_eval_failures' };

const jobObject = z
  .object({
    file: z.string().min(1).optional(),
    attr_path: z
      .string()
      .regex(/^[^.]+(\.[^.]+)*$/, 'a dotted attribute path such as "hello" or "pkgs.hello", with no empty parts')
      .optional(),
    flake: z
      .object({ outputs: z.array(z.enum(FLAKE_OUTPUTS)).min(1, 'list at least one of checks, packages, hydraJobs') })
      .strict()
      .optional(),
    allow_eval_failures: z.boolean().default(false),
    caches: z.array(z.string().min(1)).default([]),
    size_check: sizeCheck.optional(),
    systems: z.array(z.string().min(1)).min(1, 'list at least one system, or leave systems out').optional(),
    /** Above this many rebuilds on a system, build only attributes named by commands and commit titles; 0: none. */
    max_rebuild_count: z.number().int('a whole number of derivations').min(0).optional(),
    /** A change touching only files these globs match builds nothing of the job (see path-globs.ts). */
    skip_build_paths: z.array(pathGlob).optional(),
  })
  .strict()
  .superRefine((j, ctx) => {
    if (j.file !== undefined && j.flake !== undefined) {
      ctx.addIssue({ code: 'custom', message: 'give either file or flake, not both' });
    } else if (j.file === undefined && j.flake === undefined) {
      ctx.addIssue({ code: 'custom', message: 'needs file (a Nix file in the repository) or flake (flake outputs)' });
    } else if (j.flake !== undefined && j.attr_path !== undefined) {
      ctx.addIssue({ code: 'custom', path: ['attr_path'], message: 'only file jobs take attr_path' });
    }
  });

const job = z.preprocess((raw) => {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) return raw;
  const out: Record<string, unknown> = { ...(raw as Record<string, unknown>) };
  for (const [alias, key] of Object.entries(UPSTREAM_JOB_ALIASES)) {
    // Both spellings at once: the alias stays, and is reported as written twice.
    if (alias in out && !(key in out)) {
      out[key] = out[alias];
      delete out[alias];
    }
  }
  return out;
}, jobObject);

// What `shell` meant before it named a shell derivation: an interpreter. A config still saying so gets an error
// that says what changed, rather than a failed attempt to evaluate an attribute called "bash".
const INTERPRETERS = new Set(['bash', 'sh', 'dash', 'zsh', 'fish', 'ksh', 'csh', 'tcsh']);
const ATTR_PATH = /^[^.]+(\.[^.]+)*$/;

const check = z
  .object({
    command: z.string().min(1),
    shell: z
      .string()
      .regex(ATTR_PATH, 'an attribute path such as "lint" or "shells.lint", with no empty parts')
      .optional(),
    job: name.optional(),
    allow_network: z.boolean().default(false),
    /** Upstream eka-ci's switch between a flake's devShells (false) and shell.nix (true); see compileRepoConfig. */
    shell_nix: z.boolean().optional(),
    ro_bind: z.array(z.string().min(1)).default([]),
    timeout_seconds: z.number().int().positive().max(86_400).optional(),
    systems: z.array(z.string().min(1)).min(1, 'list at least one system, or leave systems out').optional(),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.shell !== undefined && (INTERPRETERS.has(c.shell) || c.shell.startsWith('/'))) {
      ctx.addIssue({
        code: 'custom',
        path: ['shell'],
        message:
          `"${c.shell}" reads as an interpreter, but shell names the shell derivation whose environment the command ` +
          "runs in (an attribute of the job's file, or devShells.<system>.<name> of a flake); the command always " +
          "runs with bash -c. Leave shell out to run with the builder host's /bin and /usr/bin",
      });
    }
  });

export const repoConfigSchema = z
  .object({
    jobs: z.record(name, job).default({}),
    checks: z.record(name, check).default({}),
  })
  .strict();

export type RawRepoConfig = z.infer<typeof repoConfigSchema>;
export type RawJob = RawRepoConfig['jobs'][string];

const HOOKS_ADVICE =
  'a repository cannot run commands on the server (upstream eka-ci ran these): ask the server operator for a ' +
  '[[hooks]] entry whose permissions name this repository, or push outputs with caches';

/**
 * Upstream eka-ci's keys that mean nothing here, each with what to write instead; keyed by position: top level, or
 * inside one job.
 */
const UPSTREAM_ADVICE: { top: Readonly<Record<string, string>>; job: Readonly<Record<string, string>> } = {
  top: {
    flake:
      'write a job instead: "jobs": {"flake": {"flake": {"outputs": ["checks", "packages"]}}} (the outputs that ' +
      "upstream eka-ci's flake.checks.enable and flake.packages.enable turned on)",
    package_change_summary: "eka-ci's review always lists the changed packages; remove it",
    rebuild_impact: "eka-ci's review always shows each change's rebuild count and blast radius; remove it",
  },
  job: {
    post_build_hooks: HOOKS_ADVICE,
    fod_post_build_hooks: HOOKS_ADVICE,
    'allow-eval-failures': 'written twice, as allow-eval-failures and allow_eval_failures; keep allow_eval_failures',
  },
};

function upstreamAdvice(path: readonly PropertyKey[]): string | undefined {
  const key = String(path.at(-1));
  let table: Readonly<Record<string, string>> = {};
  if (path.length === 1) table = UPSTREAM_ADVICE.top;
  else if (path.length === 3 && path[0] === 'jobs') table = UPSTREAM_ADVICE.job;
  return Object.hasOwn(table, key) ? table[key] : undefined;
}

/** One line per issue, each naming the field path (`jobs.hello.atr_path: unknown field`). */
export function describeIssues(issues: readonly z.core.$ZodIssue[]): string[] {
  return issues.flatMap((issue) => {
    if (issue.code === 'unrecognized_keys') {
      return issue.keys.map((key) => {
        const path = [...issue.path, key];
        return `${fieldPath(path)}: ${upstreamAdvice(path) ?? 'unknown field'}`;
      });
    }
    const message = issue.code === 'invalid_key' ? (issue.issues[0]?.message ?? issue.message) : issue.message;
    return [`${fieldPath(issue.path)}: ${message}`];
  });
}

function fieldPath(path: readonly PropertyKey[]): string {
  if (path.length === 0) return '(top level)';
  return path
    .map((part, i) => {
      if (typeof part === 'number') return `[${part}]`;
      const key = String(part);
      // Job names may contain dots; quoting them keeps `jobs["a.b"].file` from reading as three levels.
      const plain = /^[A-Za-z0-9_-]+$/.test(key);
      return plain ? (i === 0 ? key : `.${key}`) : `[${JSON.stringify(key)}]`;
    })
    .join('');
}
