import { z } from 'zod';

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

const job = z
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

/** One line per issue, each naming the field path (`jobs.hello.atr_path: unknown field`). */
export function describeIssues(issues: readonly z.core.$ZodIssue[]): string[] {
  return issues.flatMap((issue) => {
    if (issue.code === 'unrecognized_keys') {
      return issue.keys.map((key) => `${fieldPath([...issue.path, key])}: unknown field`);
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
