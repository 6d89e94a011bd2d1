import { createHash } from 'node:crypto';
import { open, realpath } from 'node:fs/promises';
import { join } from 'node:path';
import { type CheckoutPath, resolveInCheckout } from './checkout-path.js';
import { RepoConfigError } from './errors.js';
import { jsonErrorPosition } from './json-position.js';
import { type FLAKE_OUTPUTS, type RawJob, describeIssues, repoConfigSchema } from './schema.js';

/**
 * A repository's own eka-ci configuration, read from its checkout: raw JSON → schema (with defaults) → the
 * compiled `RepoConfig` below, which is all the rest of the coordinator reads. Every path in it is a real path
 * inside the real path of the checkout (`realpath(checkoutDir)`), already checked to exist.
 */

/**
 * Where the config may live, in order of precedence. Both spellings exist in the wild; when a repository has both,
 * `.eka-ci/config.json` wins and `.ekaci/config.json` is not read at all.
 */
export const CONFIG_LOCATIONS = ['.eka-ci/config.json', '.ekaci/config.json'] as const;

// A real config is a few kilobytes. The cap keeps a hostile pull request from making the coordinator read and
// parse something enormous, and leaves room for generated configs listing hundreds of jobs.
export const MAX_CONFIG_BYTES = 1024 * 1024;

// Appended to every "not found" and "outside" message: `/etc/passwd` in a config means `<checkout>/etc/passwd`.
const PATH_RULE = 'paths are relative to the repository root';

export type FlakeOutput = (typeof FLAKE_OUTPUTS)[number];

export interface SizeCheck {
  maxIncreasePercent: number;
  /** Branch whose closure sizes are the baseline; `undefined` means the pull request's base branch. */
  baseBranch: string | undefined;
}

/**
 * How much of a change a job builds: `max_rebuild_count` and `skip_build_paths` (see review/build-limits.ts). A pull
 * request follows its base's (`buildRulesFromText` reads them from the base commit).
 */
export interface JobBuildRules {
  /** `undefined` when the job sets none; 0 means no limit of the job's own. */
  maxRebuildCount: number | undefined;
  /** Globs (path-globs.ts), each valid; `undefined` when the job sets none. */
  skipBuildPaths: string[] | undefined;
}

interface JobCommon extends JobBuildRules {
  name: string;
  /** `undefined` means no filter: whatever systems evaluation produces. */
  systems: string[] | undefined;
  allowEvalFailures: boolean;
  caches: string[];
  sizeCheck: SizeCheck | undefined;
}

export interface FileJob extends JobCommon {
  kind: 'file';
  /** Real absolute path of the Nix file; a directory in the config becomes its `default.nix`. */
  file: string;
  /** `file` relative to the checkout root. */
  relativeFile: string;
  /** `attr_path` split on dots; empty means the file's whole value. */
  attrPath: string[];
}

export interface FlakeJob extends JobCommon {
  kind: 'flake';
  outputs: FlakeOutput[];
}

export type RepoJob = FileJob | FlakeJob;

export interface RepoCheck {
  name: string;
  command: string;
  /**
   * The shell derivation whose environment the command runs in: an attribute path in `job`'s file (from the file's
   * top, whatever the job's `attr_path`), or `devShells.<system>.<shell>` of a flake job. Undefined: the builder host's /bin and /usr/bin.
   */
  shell: { attrPath: string[]; job: RepoJob } | undefined;
  allowNetwork: boolean;
  /** Paths relative to the checkout root, each an existing file or directory inside it (checked here). */
  roBind: string[];
  timeoutSeconds: number | undefined;
  /** `undefined`: the coordinator's default system. */
  systems: string[] | undefined;
}

export interface RepoConfig {
  /** The config file relative to the checkout, e.g. `.eka-ci/config.json`. */
  source: string;
  /** SHA-256 of the file's name and bytes: two commits with the same digest have the same configuration. */
  digest: string;
  jobs: RepoJob[];
  checks: RepoCheck[];
}

/**
 * Reads the config of the checkout at `checkoutDir`. Resolves to `undefined` when the repository has no config
 * file in either location — "not an eka-ci repository", which the caller decides how to report — and rejects
 * with `RepoConfigError` when a config exists but cannot be used. A checkout directory that itself cannot be read
 * rejects with the plain filesystem error: that is an infrastructure failure, not the repository's fault.
 */
export async function loadRepoConfig(checkoutDir: string): Promise<RepoConfig | undefined> {
  const root = await realpath(checkoutDir);
  for (const source of CONFIG_LOCATIONS) {
    const found = await resolveInCheckout(root, source);
    if (found.kind === 'missing') continue;
    if (found.kind !== 'file') throw new RepoConfigError(source, [pathProblem('the config file', found)]);
    const text = await readLimited(found.absolute, source);
    const digest = createHash('sha256').update(`${source}\0${text}`).digest('hex');
    return compileRepoConfig(parseJson(text, source), source, root, digest);
  }
  return undefined;
}

/** Validates already-parsed JSON and resolves its paths against the checkout; `source` names it in errors. */
export async function compileRepoConfig(
  raw: unknown,
  source: string,
  checkoutDir: string,
  digest = '',
): Promise<RepoConfig> {
  const parsed = repoConfigSchema.safeParse(raw);
  if (!parsed.success) throw new RepoConfigError(source, describeIssues(parsed.error.issues));
  const root = await realpath(checkoutDir);
  const problems: string[] = [];

  const jobs: RepoJob[] = [];
  for (const [name, job] of Object.entries(parsed.data.jobs)) {
    const common: JobCommon = {
      name,
      systems: job.systems,
      allowEvalFailures: job.allow_eval_failures,
      caches: job.caches,
      sizeCheck: job.size_check && {
        maxIncreasePercent: job.size_check.max_increase_percent,
        baseBranch: job.size_check.base_branch,
      },
      ...buildRulesOf(job),
    };
    if (job.flake) {
      jobs.push({ ...common, kind: 'flake', outputs: [...new Set(job.flake.outputs)] });
      continue;
    }
    const file = await resolveJobFile(root, name, job);
    if (typeof file === 'string') problems.push(file);
    else jobs.push({ ...common, kind: 'file', ...file, attrPath: job.attr_path?.split('.') ?? [] });
  }

  const checks: RepoCheck[] = [];
  for (const [name, check] of Object.entries(parsed.data.checks)) {
    const roBind: string[] = [];
    for (const path of check.ro_bind) {
      const subject = `check ${name}: ro_bind path ${path}`;
      const found = await resolveInCheckout(root, path);
      if (found.kind === 'file' || found.kind === 'directory') roBind.push(found.relative);
      else problems.push(pathProblem(subject, found));
    }
    let shell: RepoCheck['shell'];
    if (check.shell !== undefined) {
      const jobName = check.job ?? (jobs.length === 1 ? jobs[0]!.name : undefined);
      const job = jobs.find((j) => j.name === jobName);
      if (job !== undefined) shell = { attrPath: check.shell.split('.'), job };
      else if (check.job !== undefined) problems.push(`check ${name}: job ${check.job} is not a job of this file`);
      else {
        problems.push(
          `check ${name}: shell ${check.shell} needs the job whose file or flake it is in: ` +
            `name it with "job" (jobs: ${jobs.map((j) => j.name).join(', ') || 'none'})`,
        );
      }
    } else if (check.job !== undefined) {
      problems.push(`check ${name}: job is only read with shell`);
    }
    // Upstream eka-ci's shell_nix chose where shell is looked up; here the check's job decides. Where the two agree
    // (false: a flake's devShells) it is accepted, otherwise the message says how to say it here.
    if (check.shell_nix === true) {
      problems.push(
        `check ${name}: shell_nix: shell is looked up in a job's file or flake: for an attribute of shell.nix, add ` +
          `a job whose file is shell.nix (e.g. "shells": {"file": "shell.nix", "attr_path": "${check.shell ?? 'NAME'}"}), ` +
          'name it with "job", and remove shell_nix',
      );
    } else if (check.shell_nix === false && shell?.job.kind === 'file') {
      problems.push(
        `check ${name}: shell_nix: false means a flake's devShells, but job ${shell.job.name} is a file job: name ` +
          'a flake job with "job", or remove shell_nix to use an attribute of the file',
      );
    }
    checks.push({
      name,
      command: check.command,
      shell,
      allowNetwork: check.allow_network,
      roBind,
      timeoutSeconds: check.timeout_seconds,
      systems: check.systems,
    });
  }

  if (problems.length > 0) throw new RepoConfigError(source, problems);
  return { source, digest, jobs, checks };
}

/**
 * Each job's build rules in a config file's text (`source` names it in errors): what a pull request's base says,
 * read from the base commit without a checkout. Rejects with `RepoConfigError` as `loadRepoConfig` would.
 */
export function buildRulesFromText(text: string, source: string): Map<string, JobBuildRules> {
  const size = Buffer.byteLength(text);
  if (size > MAX_CONFIG_BYTES) {
    throw new RepoConfigError(source, [`is ${size} bytes; the limit is ${MAX_CONFIG_BYTES} bytes (1 MiB)`]);
  }
  const parsed = repoConfigSchema.safeParse(parseJson(text, source));
  if (!parsed.success) throw new RepoConfigError(source, describeIssues(parsed.error.issues));
  return new Map(Object.entries(parsed.data.jobs).map(([name, job]) => [name, buildRulesOf(job)]));
}

function buildRulesOf(job: RawJob): JobBuildRules {
  return { maxRebuildCount: job.max_rebuild_count, skipBuildPaths: job.skip_build_paths };
}

/** The job's Nix file, or the problem with it as a message. */
async function resolveJobFile(
  root: string,
  name: string,
  job: RawJob,
): Promise<{ file: string; relativeFile: string } | string> {
  const subject = `job ${name}: file ${job.file!}`;
  let found = await resolveInCheckout(root, job.file!);
  if (found.kind === 'directory') {
    // Nix imports a directory through its default.nix; resolve that too, since it may itself be a link.
    found = await resolveInCheckout(root, join(found.relative, 'default.nix'));
    if (found.kind === 'missing') return `${subject} is a directory without default.nix`;
  }
  if (found.kind === 'file') return { file: found.absolute, relativeFile: found.relative };
  return pathProblem(subject, found);
}

function pathProblem(subject: string, found: Exclude<CheckoutPath, { kind: 'file' }>): string {
  switch (found.kind) {
    case 'missing':
      return `${subject} does not exist in the repository (${PATH_RULE})`;
    case 'escapes':
      return found.via === undefined
        ? `${subject} is outside the repository: ".." goes above the repository root (${PATH_RULE})`
        : `${subject} is outside the repository: symbolic link ${found.via} leads out of it (${PATH_RULE})`;
    case 'invalid':
      return `${subject} ${found.reason}`;
    case 'directory':
      return `${subject} is a directory, not a file`;
    case 'other':
      return `${subject} is neither a regular file nor a directory`;
  }
}

async function readLimited(path: string, source: string): Promise<string> {
  let handle;
  try {
    handle = await open(path, 'r');
  } catch (e) {
    throw new RepoConfigError(source, [`cannot be read (${(e as NodeJS.ErrnoException).code ?? String(e)})`]);
  }
  try {
    const { size } = await handle.stat();
    if (size > MAX_CONFIG_BYTES) {
      throw new RepoConfigError(source, [`is ${size} bytes; the limit is ${MAX_CONFIG_BYTES} bytes (1 MiB)`]);
    }
    return await handle.readFile('utf8');
  } finally {
    await handle.close();
  }
}

function parseJson(text: string, source: string): unknown {
  // Editors on Windows like to save a byte order mark, which JSON.parse rejects.
  const json = text.startsWith('\uFEFF') ? text.slice(1) : text;
  try {
    return JSON.parse(json) as unknown;
  } catch (e) {
    const at = jsonErrorPosition(json);
    const where = at ? ` at line ${at.line}, column ${at.column} (position ${at.offset})` : '';
    // V8 quotes a multi-line snippet of the input; the position says more, and a problem must stay on one line.
    const reason = (e as Error).message.replace(/, (?:\.\.\.)?".*" is not valid JSON$/s, '').replace(/\s+/g, ' ');
    throw new RepoConfigError(source, [`invalid JSON${where}: ${reason}`], { cause: e });
  }
}
