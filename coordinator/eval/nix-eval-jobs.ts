import { spawn } from 'node:child_process';
import { mkdir } from 'node:fs/promises';
import { createInterface } from 'node:readline';
import { EvaluationError } from '../../common/errors.js';
import { lastLines, runNix } from '../../common/nix/cli.js';
import { nixString } from './eval-expression.js';
import { type CompiledEvaluatorOptions, type EvalMeta, type EvalResult, derivationProblem } from './eval-result.js';

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
  const select = o.attrPath.map((n) => `.${nixString(n)}`).join('');
  const expr =
    `let raw = import ${nixString(o.file)}; top = if builtins.isFunction raw then raw {} else raw; ` +
    `in top${select}`;
  return [
    '--workers',
    String(o.workers),
    '--max-memory-size',
    String(o.maxMemoryMiB),
    '--gc-roots-dir',
    o.gcRootsDir,
    '--meta',
    '--expr',
    expr,
  ];
}

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
  const j = JSON.parse(line) as JobLine;
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
  const meta = j.meta ?? {};
  result.meta = pickMeta(meta);
  const platforms = meta.platforms;
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

/** Streams `nix-eval-jobs` results line by line; a run that fails before any result is an EvaluationError. */
export async function* evaluateWithNixEvalJobs(o: CompiledEvaluatorOptions): AsyncGenerator<EvalResult> {
  // The sandbox binds the roots directory, which must exist first; nix-eval-jobs writes its roots there.
  await mkdir(o.gcRootsDir, { recursive: true });
  const c = o.launcher.command('nix-eval-jobs', nixEvalJobsArgs(o), { writable: [o.gcRootsDir] });
  const child = spawn(c.file, c.args, { env: c.env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (s: string) => (stderr = (stderr + s).slice(-64 * 1024)));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  let count = 0;
  try {
    for await (const line of createInterface({ input: child.stdout })) {
      if (line.trim() === '') continue;
      count++;
      yield parseNixEvalJobsLine(line, o.systems);
    }
    const code = await exited;
    // A run that died half-way did not evaluate the rest: those attributes are not "removed", the run failed.
    if (code !== 0) {
      throw new EvaluationError(
        `nix-eval-jobs failed (exit ${code}) after ${count} attributes: ${lastLines(stderr, 6)}`,
      );
    }
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
}
