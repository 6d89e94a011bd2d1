import { Minimatch, type MinimatchOptions } from 'minimatch';
import { z } from 'zod';

/**
 * Which repositories and branches a GitHub App serves with the coordinator's privileges (its caches and secrets).
 * This is server-side configuration: a repository cannot widen it. Fork pull requests never get secrets whatever
 * this says; that rule belongs to the caller, which knows where the head commit comes from.
 *
 * Globs follow GitHub's branch-protection patterns: `*` stops at `/`, `**` crosses it, `{a,b}` alternates.
 * Repository globs ignore case, as GitHub's names do; branch globs do not, as git's refs do not.
 */
export interface AppPermissions {
  allowAll: boolean;
  /** `OWNER/NAME` globs, e.g. `my-org/*`. */
  allowedRepos: readonly string[];
  /** Branch globs, e.g. `main`, `release-*`; undefined: every branch. */
  allowedBranches: readonly string[] | undefined;
}

/** The `permissions` table of a `[[github_apps]]` entry. An app that serves no repository is a mistake. */
export const permissionsSchema = z
  .object({
    allow_all: z.boolean().default(false),
    allowed_repos: z
      .array(z.string().regex(/^[^/\s]+\/[^/\s]+$/, 'a repository glob is OWNER/NAME, e.g. "my-org/*"'))
      .default([]),
    // Absent: every branch. An empty list would serve no branch at all, which is never what someone meant.
    allowed_branches: z
      .array(z.string().min(1))
      .min(1, 'an empty list allows no branch: list branch globs, or leave allowed_branches out for every branch')
      .optional(),
  })
  .strict()
  .refine((p) => p.allow_all || p.allowed_repos.length > 0, {
    message: 'allows no repository: list allowed_repos, or set allow_all = true',
  })
  .prefault({});

export function compilePermissions(p: z.infer<typeof permissionsSchema>): AppPermissions {
  return { allowAll: p.allow_all, allowedRepos: p.allowed_repos, allowedBranches: p.allowed_branches };
}

// Leading dots are ordinary in repository names (`org/.github`) and branch names are not paths: `*` should match
// them. `!` and `#` have no meaning in a permission list, so they stay literal instead of negating or commenting.
const GLOB_OPTIONS: MinimatchOptions = { dot: true, nonegate: true, nocomment: true, noext: true };

interface Compiled {
  repos: Minimatch[];
  branches: Minimatch[] | undefined;
}

const compiled = new WeakMap<AppPermissions, Compiled>();

/**
 * Whether `repoFullName` (`OWNER/NAME`) is served, and, when `branch` is given, whether that branch is privileged
 * too (a push to it, or a pull request into it).
 */
export function isAllowed(permissions: AppPermissions, repoFullName: string, branch?: string): boolean {
  if (permissions.allowAll) return true;
  const { repos, branches } = compile(permissions);
  if (!repos.some((m) => m.match(repoFullName))) return false;
  return branch === undefined || branches === undefined || branches.some((m) => m.match(branch));
}

function compile(permissions: AppPermissions): Compiled {
  let c = compiled.get(permissions);
  if (!c) {
    c = {
      repos: permissions.allowedRepos.map((g) => new Minimatch(g, { ...GLOB_OPTIONS, nocase: true })),
      branches: permissions.allowedBranches?.map((g) => new Minimatch(g, GLOB_OPTIONS)),
    };
    compiled.set(permissions, c);
  }
  return c;
}
