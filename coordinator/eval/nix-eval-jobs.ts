import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EvaluationError } from '../../common/errors.js';
import { lastLines, runNix } from '../../common/nix/cli.js';
import { nixString } from './eval-expression.js';
import { type CompiledEvaluatorOptions, type EvalMeta, type EvalResult, derivationProblem } from './eval-result.js';

// Enough of nix-eval-jobs' stderr to hold the error that ended a run, with its trace.
const MAX_STDERR_CHARS = 64 * 1024;

let found: Promise<boolean> | undefined;

/**
 * True when `nix-eval-jobs` is on PATH; it is then preferred over the built-in evaluator. Asked once per process:
 * a coordinator evaluating many commits should not start a process per evaluation to learn the same answer.
 */
export function hasNixEvalJobs(): Promise<boolean> {
  found ??= runNix('which', ['nix-eval-jobs']).then(
    (r) => r.code === 0,
    () => false,
  );
  return found;
}

/**
 * Arguments for one `nix-eval-jobs` run over the selected attribute of the file; the launcher adds the
 * restrictions and the store (see EvalEnvironment).
 */
export function nixEvalJobsArgs(o: CompiledEvaluatorOptions): string[] {
  return [...runArgs(o), '--meta', '--expr', `${topExpression(o)} in top${select(o.attrPath)}`];
}

/**
 * Arguments for the second run over attributes that failed with `--meta` (see `recoverFromMeta`): without meta,
 * over an attribute set `{ a0 = <path 0>; a1 = <path 1>; … }` read from `file` (a long list would not fit on a command
 * line).
 */
export function withoutMetaArgs(o: CompiledEvaluatorOptions, file: string): string[] {
  return [...runArgs(o), '--expr', `import ${nixString(file)}`];
}

/** The Nix file `withoutMetaArgs` reads: each of `paths` (relative to the selected attribute) as `a<index>`. */
export function withoutMetaExpression(o: CompiledEvaluatorOptions, paths: readonly (readonly string[])[]): string {
  const attrs = paths.map((p, i) => `${retryName(i)} = root${select(p)};`).join('\n  ');
  return `${topExpression(o)} root = top${select(o.attrPath)}; in {\n  ${attrs}\n}\n`;
}

function runArgs(o: CompiledEvaluatorOptions): string[] {
  return ['--workers', String(o.workers), '--max-memory-size', String(o.maxMemoryMiB), '--gc-roots-dir', o.gcRootsDir];
}

function topExpression(o: CompiledEvaluatorOptions): string {
  return `let raw = import ${nixString(o.file)}; top = if builtins.isFunction raw then raw {} else raw;`;
}

function select(path: readonly string[]): string {
  return path.map((n) => `.${nixString(n)}`).join('');
}

// An identifier, so that every version of nix-eval-jobs prints it unquoted as the attribute's name.
const retryName = (i: number): string => `a${i}`;

interface JobLine {
  attr?: string;
  attrPath?: string[];
  drvPath?: string;
  system?: string;
  outputs?: Record<string, string | null>;
  meta?: Record<string, unknown>;
  error?: string;
}

/** One JSON line of `nix-eval-jobs` output as an `EvalResult`. */
export function parseNixEvalJobsLine(
  line: string,
  systems?: readonly string[],
  exists?: (path: string) => boolean,
): EvalResult {
  return toEvalResult(parseJobLine(line), systems, exists);
}

function parseJobLine(line: string): JobLine {
  let j: unknown;
  try {
    j = JSON.parse(line);
  } catch {
    throw new EvaluationError(`nix-eval-jobs printed a line that is not JSON: ${line.slice(0, 200)}`);
  }
  if (typeof j !== 'object' || j === null || Array.isArray(j)) {
    throw new EvaluationError(`nix-eval-jobs printed a line that is not a JSON object: ${line.slice(0, 200)}`);
  }
  return j;
}

function toEvalResult(j: JobLine, systems?: readonly string[], exists?: (path: string) => boolean): EvalResult {
  const attr = j.attr ?? j.attrPath?.join('.') ?? '';
  if (j.error !== undefined) return { attr, error: j.error };
  const problem = derivationProblem({ drvPath: j.drvPath, system: j.system, outputs: j.outputs }, exists);
  if (problem !== undefined) return { attr, error: `not a derivation eka-ci can build: ${problem}` };
  const result: EvalResult = { attr, drvPath: j.drvPath, system: j.system };
  if (j.outputs) {
    result.outputs = Object.fromEntries(
      Object.entries(j.outputs).filter((e): e is [string, string] => typeof e[1] === 'string'),
    );
  }
  if (j.meta !== undefined) result.meta = pickMeta(j.meta);
  const platforms = j.meta?.platforms;
  const unsupported =
    (Array.isArray(platforms) &&
      j.system !== undefined &&
      !platforms.some((p) => typeof p !== 'string' || p === j.system)) ||
    (systems !== undefined && j.system !== undefined && !systems.includes(j.system));
  if (unsupported) result.skipped = 'unsupported-platform';
  return result;
}

function pickMeta(m: Record<string, unknown>): EvalMeta {
  const out: EvalMeta = {};
  if (typeof m.name === 'string') {
    const v = /^(.*?)-(\d.*)$/.exec(m.name);
    if (v) [out.pname, out.version] = [v[1]!, v[2]!];
  }
  if (typeof m.pname === 'string') out.pname = m.pname;
  if (typeof m.version === 'string') out.version = m.version;
  const lic = (l: unknown): string | undefined =>
    typeof l === 'string'
      ? l
      : l !== null && typeof l === 'object'
        ? (stringField(l, 'spdxId') ?? stringField(l, 'shortName'))
        : undefined;
  if (Array.isArray(m.license)) out.license = m.license.map(lic).filter((x) => x !== undefined);
  else if (m.license !== undefined) out.license = lic(m.license);
  if (Array.isArray(m.maintainers)) {
    out.maintainers = m.maintainers
      .map((x: unknown) =>
        typeof x === 'string'
          ? x
          : x !== null && typeof x === 'object'
            ? (stringField(x, 'github') ?? stringField(x, 'name'))
            : undefined,
      )
      .filter((x) => x !== undefined);
    const handles = m.maintainers.flatMap((x: unknown) => {
      const h = x !== null && typeof x === 'object' ? stringField(x, 'github') : undefined;
      return h === undefined ? [] : [h];
    });
    if (handles.length > 0) out.githubMaintainers = [...new Set(handles)];
  }
  if (Array.isArray(m.platforms)) out.platforms = m.platforms.filter((p) => typeof p === 'string');
  if (typeof m.broken === 'boolean') out.broken = m.broken;
  return dropUndefined(out);
}

function stringField(o: object, key: string): string | undefined {
  const v = (o as Record<string, unknown>)[key];
  return typeof v === 'string' ? v : undefined;
}

function dropUndefined<T extends object>(o: T): T {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T;
}

/**
 * Streams `nix-eval-jobs` results as they come. An attribute that failed is held back until the run ends and, if
 * its meta was what failed, reported with its derivation (see `recoverFromMeta`). A run that fails before every
 * attribute was reported is an EvaluationError (see `jobLines`), never a shorter list.
 */
export async function* evaluateWithNixEvalJobs(o: CompiledEvaluatorOptions): AsyncGenerator<EvalResult> {
  // The sandbox binds the roots directory, which must exist first; nix-eval-jobs writes its roots there.
  await mkdir(o.gcRootsDir, { recursive: true });
  const failed: FailedJob[] = [];
  for await (const j of jobLines(o, nixEvalJobsArgs(o))) {
    const result = toEvalResult(j, o.systems);
    const path = j.attrPath ?? j.attr?.split('.');
    if (j.error !== undefined && path !== undefined) failed.push({ path, result });
    else yield result;
  }
  yield* recoverFromMeta(o, failed);
}

interface FailedJob {
  /** Relative to the selected attribute path. */
  path: readonly string[];
  result: EvalResult;
}

/**
 * nix-eval-jobs evaluates `meta` together with the derivation, so an attribute whose meta (or one meta field) throws
 * comes back as an error without its derivation. The failed attributes are evaluated once more without `--meta`: one
 * that now gives a derivation is reported with it, and the first run's error beside it as the failure of its meta
 * (`metaErrors.meta`: nix-eval-jobs does not say which field failed). The others keep their error.
 */
async function* recoverFromMeta(o: CompiledEvaluatorOptions, failed: readonly FailedJob[]): AsyncGenerator<EvalResult> {
  if (failed.length === 0) return;
  const dir = await mkdtemp(join(tmpdir(), 'ekaci-eval-jobs-'));
  const again = new Map<string, JobLine>();
  try {
    const file = join(dir, 'without-meta.nix');
    const paths = failed.map((f) => f.path);
    await writeFile(file, withoutMetaExpression(o, paths));
    for await (const j of jobLines(o, withoutMetaArgs(o, file), [dir])) {
      if (j.attr !== undefined) again.set(j.attr, j);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  for (const [i, f] of failed.entries()) {
    const j = again.get(retryName(i));
    const recovered = j && j.error === undefined ? toEvalResult({ ...j, attr: f.result.attr }, o.systems) : undefined;
    if (recovered === undefined || recovered.error !== undefined) yield f.result;
    else yield { ...recovered, metaErrors: { meta: f.result.error ?? '' } };
  }
}

/**
 * The JSON lines of one `nix-eval-jobs` run, as they come. The run must end well: a non-zero exit, a kill or output
 * that ends mid-line means it died half-way, and the attributes it never reported were not evaluated — they are not
 * "removed". That is an EvaluationError for the whole run, thrown after the lines it did print.
 */
async function* jobLines(
  o: CompiledEvaluatorOptions,
  args: readonly string[],
  roots: readonly string[] = [],
): AsyncGenerator<JobLine> {
  const c = o.launcher.command('nix-eval-jobs', args, { writable: [o.gcRootsDir], roots });
  const child = spawn(c.file, c.args, { env: c.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => (stderr = (stderr + s).slice(-MAX_STDERR_CHARS)));
  const exited = new Promise<string | undefined>((resolve) => {
    child.on('close', (code, signal) =>
      resolve(code === 0 ? undefined : signal ? `killed by ${signal}` : `exit ${code}`),
    );
    child.on('error', (e) => resolve(`could not run: ${e.message}`));
  });
  let count = 0;
  let pending = '';
  const failure = (why: string): EvaluationError =>
    new EvaluationError(`nix-eval-jobs failed (${why}) after ${count} attributes: ${lastLines(stderr, 6)}`);
  try {
    child.stdout.setEncoding('utf8');
    for await (const chunk of child.stdout as AsyncIterable<string>) {
      const lines = (pending + chunk).split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) {
        if (line.trim() === '') continue;
        count++;
        yield parseJobLine(line);
      }
    }
    const died = await exited;
    if (died !== undefined) throw failure(died);
    if (pending.trim() !== '') throw failure('its output ended mid-line');
  } finally {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}
