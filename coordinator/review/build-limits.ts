import type { CheckSpec } from '../checks/check-manager.js';
import type { CommitEvaluation } from '../eval/repo-evaluation.js';
import type { FetchOptions, FileAtCommit } from '../git/git-mirrors.js';
import type { StoredJobDiff } from '../graph/diff-store.js';
import { RepoConfigError } from '../repo-config/errors.js';
import { compilePathGlob } from '../repo-config/path-globs.js';
import { count, plural } from './numbers.js';
import { CONFIG_LOCATIONS, type JobBuildRules, buildRulesFromText } from '../repo-config/repo-config.js';
import { codeSpan } from './markdown.js';

/**
 * How much of a change a review builds. Two rules hold builds back while the review still evaluates the change and
 * counts its rebuilds:
 *
 * - **Mass rebuilds.** A job whose rebuild count on a system — the derivations of that system its head closure needs
 *   and its base's did not — exceeds its `max_rebuild_count` builds nothing on that system. The limit is the smaller
 *   of the job's own (`jobs.<name>.max_rebuild_count`) and the server's (`[rebuild] max_rebuild_count`), 0 or absent
 *   meaning none: a repository may lower the operator's limit, never lift it. Counted per job and system because
 *   builders are per system, and one system's mass rebuild (a darwin stdenv change) need not stop the others.
 * - **Paths.** A job whose `skip_build_paths` globs match every file the change touches (a documentation-only
 *   change) builds nothing. An empty change, or one touching any other file, builds as usual; one that rebuilds
 *   nothing of the job is not reported as held back.
 *
 * Attributes named by `@eka-ci build` commands and OfBorg-style commit titles are built whatever the limits: someone
 * asked for them. The rules are the base commit's, like every gate of a pull request (ARCHITECTURE.md §7); a push
 * (no base) builds everything. `reviewRoots` applies them, and `limitReport` says what they held back.
 */

export interface BuildRules {
  /** `jobs.<name>` of the base's configuration; a job only the head has is not here (the server's limit alone). */
  jobs: ReadonlyMap<string, JobBuildRules>;
  /** `[rebuild] max_rebuild_count`; 0: none. */
  serverMaxRebuildCount: number;
  /** The files the change touches; undefined when no job has `skip_build_paths` (nothing needs them). */
  changedFiles: readonly string[] | undefined;
}

export type BuildLimit =
  | {
      kind: 'max-rebuild-count';
      job: string;
      system: string;
      rebuilds: number;
      limit: number;
      /** Whose limit it is: the base's `jobs.<name>.max_rebuild_count`, or the server's `[rebuild]` one. */
      from: 'job' | 'server';
    }
  | {
      kind: 'skip-build-paths';
      job: string;
      /** How many files the change touches, all matched. */
      files: number;
      /** The globs that matched, each with how many of the files it matched first. */
      globs: Array<{ glob: string; files: number }>;
    };

/** A limit with the attributes built despite it (named by a command or commit title): `job.attr` on `system`. */
export interface AppliedLimit {
  limit: BuildLimit;
  built: Array<{ attr: string; system: string }>;
}

/** The limit that applies to a job: the smaller of its own and the server's (0 or undefined: none). */
export function maxRebuildCountOf(
  job: JobBuildRules | undefined,
  server: number,
): { limit: number; from: 'job' | 'server' } | undefined {
  const own = job?.maxRebuildCount ?? 0;
  if (own > 0 && (server === 0 || own <= server)) return { limit: own, from: 'job' };
  return server > 0 ? { limit: server, from: 'server' } : undefined;
}

/** The limits a change's rebuild diff meets under `rules`, in job order. */
export function decideBuildLimits(diffs: readonly StoredJobDiff[], rules: BuildRules): BuildLimit[] {
  const limits: BuildLimit[] = [];
  for (const diff of diffs) {
    const job = rules.jobs.get(diff.name);
    const max = maxRebuildCountOf(job, rules.serverMaxRebuildCount);
    for (const [system, rebuilds] of Object.entries(diff.rebuildCountBySystem).sort(([a], [b]) => (a < b ? -1 : 1))) {
      if (max && rebuilds > max.limit) {
        limits.push({ kind: 'max-rebuild-count', job: diff.name, system, rebuilds, limit: max.limit, from: max.from });
      }
    }
    // A change that rebuilds nothing of the job has nothing to hold back: its checks stay as they were.
    const rebuilds = Object.values(diff.rebuildCountBySystem).reduce((a, b) => a + b, 0);
    const matched = rebuilds > 0 ? allMatched(job?.skipBuildPaths ?? [], rules.changedFiles ?? []) : undefined;
    if (matched)
      limits.push({ kind: 'skip-build-paths', job: diff.name, files: rules.changedFiles!.length, globs: matched });
  }
  return limits;
}

/** Per glob, the files it matched first — when every file matched one; undefined otherwise (and for no files). */
function allMatched(
  globs: readonly string[],
  files: readonly string[],
): Array<{ glob: string; files: number }> | undefined {
  if (globs.length === 0 || files.length === 0) return undefined;
  const compiled = globs.map(compilePathGlob);
  const counts = new Map<string, number>();
  for (const file of files) {
    const glob = compiled.find((g) => g.matches(file))?.glob;
    if (glob === undefined) return undefined;
    counts.set(glob, (counts.get(glob) ?? 0) + 1);
  }
  return globs.flatMap((glob) => (counts.has(glob) ? [{ glob, files: counts.get(glob)! }] : []));
}

/** Rebuilds per system over every job of a change. */
export function rebuildsBySystem(diffs: readonly StoredJobDiff[]): Record<string, number> {
  const sum: Record<string, number> = {};
  for (const d of diffs) {
    for (const [system, n] of Object.entries(d.rebuildCountBySystem)) sum[system] = (sum[system] ?? 0) + n;
  }
  return sum;
}

/** Whether a limit holds back the builds of `job` on `system`. */
export function holdsBack(limit: BuildLimit, job: string, system: string): boolean {
  return limit.job === job && appliesOn(limit, system);
}

/** Whether a limit holds back builds on `system` (of its job): a path rule holds back every system. */
function appliesOn(limit: BuildLimit, system: string): boolean {
  return limit.kind === 'skip-build-paths' || limit.system === system;
}

/** A repository check a limit kept from running: `name` on `system`. */
export interface HeldCheck {
  name: string;
  system: string;
}

/** A held-back check as reports name it (markdown). */
export function heldCheckName(c: HeldCheck): string {
  return `${codeSpan(c.name)} on ${codeSpan(c.system)}`;
}

/**
 * The checks a change may run under its limits. Running a check builds its shell first; on a system a limit holds
 * back (a mass rebuild there, or a change touching only `skip_build_paths`), a check whose shell is not the base's
 * — which the base's own runs built — would build what the limit holds back, so it does not run and is reported as
 * held back. A check without a shell, or with the base's, builds nothing new and runs as usual.
 */
export function limitChecks(
  specs: readonly CheckSpec[],
  base: Pick<CommitEvaluation, 'checks'> | undefined,
  applied: readonly AppliedLimit[],
): { run: CheckSpec[]; held: HeldCheck[] } {
  const heldSystem = (system: string): boolean => applied.some(({ limit }) => appliesOn(limit, system));
  const baseShell = (name: string, system: string): string | undefined =>
    base?.checks?.find((p) => p.name === name)?.systems.find((s) => s.system === system)?.shellDrv;
  const run: CheckSpec[] = [];
  const held: HeldCheck[] = [];
  for (const spec of specs) {
    const builds = spec.shellDrv !== undefined && spec.shellDrv !== baseShell(spec.name, spec.system);
    if (builds && heldSystem(spec.system)) held.push({ name: spec.name, system: spec.system });
    else run.push(spec);
  }
  return { run, held };
}

/** What `readBuildRules` reads from: the coordinator's git mirrors. */
export interface RulesSource {
  fileAt(url: string, rev: string, path: string, options?: FetchOptions): Promise<FileAtCommit>;
  changedFiles(url: string, base: string, head: string, options?: FetchOptions): Promise<string[]>;
}

/**
 * The build rules of a change from `base` to `head`: each job's, from the base commit's configuration file (read
 * from the mirror of `baseUrl`, no worktree), and the files the change touches when a job has `skip_build_paths`
 * (from the mirror of `headUrl`, which for a fork borrows the base's objects: pass `headFetch.objectsFrom`).
 */
export async function readBuildRules(
  git: RulesSource,
  o: {
    baseUrl: string;
    headUrl: string;
    base: string;
    head: string;
    serverMaxRebuildCount: number;
    baseFetch?: FetchOptions;
    headFetch?: FetchOptions;
  },
): Promise<BuildRules> {
  let jobs = new Map<string, JobBuildRules>();
  for (const location of CONFIG_LOCATIONS) {
    const file = await git.fileAt(o.baseUrl, o.base, location, o.baseFetch);
    if (file.kind === 'missing') continue;
    const source = `${location} at the base ${o.base.slice(0, 12)}`;
    if (file.kind === 'other') throw new RepoConfigError(source, [`is ${file.what}, not a file`]);
    jobs = buildRulesFromText(file.text, source);
    break;
  }
  const needFiles = [...jobs.values()].some((j) => (j.skipBuildPaths?.length ?? 0) > 0);
  const changedFiles = needFiles ? await git.changedFiles(o.headUrl, o.base, o.head, o.headFetch) : undefined;
  return { jobs, serverMaxRebuildCount: o.serverMaxRebuildCount, changedFiles };
}

/** What the limits held back, for a check run (title and markdown lines) and `ekaci review`'s output. */
export interface LimitReport {
  title: string;
  lines: string[];
}

/** What a review's builds left out, as its JSON says it: the whole change's report and the limits behind it. */
export interface HeldBack extends LimitReport {
  limits: AppliedLimit[];
  /** The repository checks not run because their shells would build what the limits hold back; absent when none. */
  checks?: HeldCheck[];
}

/** The review's `heldBack`: undefined when no limit held anything back. */
export function heldBackOf(
  applied: readonly AppliedLimit[],
  rebuildCountBySystem: Readonly<Record<string, number>>,
  checks: readonly HeldCheck[] = [],
): HeldBack | undefined {
  const report = limitReport(applied, { rebuildCountBySystem, checks });
  const limits = applied.map(({ limit, built }) => ({
    limit,
    // An attribute built on both sides is listed once, by name and system.
    built: [...new Map(built.map(({ attr, system }) => [`${attr}\0${system}`, { attr, system }])).values()],
  }));
  return report && { ...report, limits, ...(checks.length > 0 ? { checks: [...checks] } : {}) };
}

// Attributes listed by name in a report; the rest are counted.
const MAX_LISTED_ATTRS = 20;

/**
 * The report of the limits a review met: for one system's build check (`system`: only the limits on it), or for the
 * whole change (the summary check, `ekaci review`), with the rebuild counts per system when given. Undefined when
 * no limit held anything back there.
 */
export function limitReport(
  applied: readonly AppliedLimit[],
  o: {
    system?: string;
    rebuildCountBySystem?: Readonly<Record<string, number>>;
    /** Checks held back, listed for the whole change (not in one system's build check). */
    checks?: readonly HeldCheck[];
  } = {},
): LimitReport | undefined {
  const here = applied.filter((a) => o.system === undefined || appliesOn(a.limit, o.system));
  const first = here[0];
  if (first === undefined) return undefined;
  const built = new Map<string, { attr: string; system: string }>();
  for (const a of here) {
    for (const b of a.built)
      if (o.system === undefined || b.system === o.system) built.set(`${b.attr}\0${b.system}`, b);
  }
  const attrs = [...new Set([...built.values()].map((b) => b.attr))].sort();
  const more = here.length > 1 ? ` (and ${plural(here.length - 1, 'more limit')})` : '';
  const tail =
    attrs.length > 0
      ? `built only the ${plural(attrs.length, 'attribute')} named by commands/commit titles`
      : 'built nothing';
  const lines = [
    '**Builds held back.** The change was evaluated and its rebuilds counted, but not built:',
    '',
    ...here.map((a) => `- ${describe(a.limit, 'line')}`),
    '',
    attrs.length > 0
      ? `Built only the attributes named by commands or commit titles (${count(attrs.length)}): ` +
        listed(attrs.map(codeSpan))
      : 'Nothing was built. `@eka-ci build ATTR`, or a commit title such as `ATTR: 1.0 -> 2.0`, builds an attribute anyway.',
  ];
  if ((o.checks?.length ?? 0) > 0) {
    const checks = o.checks!.map(heldCheckName);
    lines.push('', `Checks not run, their shells would build what is held back: ${listed(checks)}.`);
  }
  const counts = Object.entries(o.rebuildCountBySystem ?? {}).sort(([a], [b]) => (a < b ? -1 : 1));
  if (counts.length > 0)
    lines.push('', `Rebuilds per system: ${counts.map(([s, n]) => `${codeSpan(s)} ${count(n)}`).join(', ')}.`);
  return { title: `${describe(first.limit, 'title')}${more}; ${tail}`, lines };
}

function listed(items: readonly string[]): string {
  const shown = items.slice(0, MAX_LISTED_ATTRS).join(', ');
  return items.length > MAX_LISTED_ATTRS ? `${shown} and ${count(items.length - MAX_LISTED_ATTRS)} more` : shown;
}

function describe(limit: BuildLimit, form: 'title' | 'line'): string {
  if (limit.kind === 'max-rebuild-count') {
    // A derivation's system is the repository's to write: quoted in the markdown line (a title is plain text).
    const on = form === 'title' ? limit.system : codeSpan(limit.system);
    const what = `${count(limit.rebuilds)} rebuilds on ${on} exceed max_rebuild_count ${count(limit.limit)}`;
    if (form === 'title') return `Mass rebuild: ${what}`;
    const whose =
      limit.from === 'job'
        ? `the base's jobs.${limit.job}.max_rebuild_count`
        : "the server's [rebuild] max_rebuild_count";
    return `job \`${limit.job}\`: ${what} (${whose})`;
  }
  const globs = limit.globs.map((g) =>
    form === 'title' ? `${g.glob} matched ${count(g.files)}` : `\`${g.glob}\` (${count(g.files)})`,
  );
  if (form === 'title') {
    return `Only files matching skip_build_paths changed: ${plural(limit.files, 'file')} (${globs.join(', ')})`;
  }
  const every = limit.files === 1 ? 'the one changed file matches' : `all ${count(limit.files)} changed files match`;
  return `job \`${limit.job}\`: ${every} its skip_build_paths: ${globs.join(', ')}`;
}
