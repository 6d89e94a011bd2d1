import { spawnSync } from 'node:child_process';
import { existsSync, realpathSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { EvaluationError } from '../../common/errors.js';
import { type NixResult, nixErrorText, runNix } from '../../common/nix/cli.js';
import type { EvalEnvironment, NixLauncher } from './eval-environment.js';
import type { EvalPolicy } from './eval-options.js';

export interface Instantiated {
  attr: string;
  drvPath: string;
}

/**
 * Evaluates attributes of a Nix file to `.drv` paths in one `nix-instantiate --eval` process. Each attribute is
 * checked in the language itself (exists? a derivation?) so the answer names the attribute at fault; an error
 * Nix cannot catch (throw, abort) is re-run per attribute to say which one raised it.
 *
 * With no attributes, the file's value is used: a derivation is built as `default`; an attribute set yields
 * its top-level attributes.
 *
 * Evaluation runs like any other (see EvalEnvironment): sandboxed and restricted to the project the file belongs
 * to — the git work tree that holds it, or else its directory — and the store.
 */
export async function instantiate(
  file: string,
  attrs: readonly string[],
  environment: EvalEnvironment,
  policy: EvalPolicy,
): Promise<Instantiated[]> {
  const path = resolve(file);
  if (!existsSync(path)) throw new EvaluationError(`${file}: no such file`);
  if (!statSync(path).isFile() && !existsSync(resolve(path, 'default.nix'))) {
    throw new EvaluationError(`${file}: not a Nix file (and no default.nix inside)`);
  }
  await environment.prepare(policy);
  const launcher = environment.launcher({ roots: projectRoots(path), policy });
  const names = attrs.length > 0 ? attrs : await topLevelNames(launcher, path);
  if (names.length === 0) throw new EvaluationError(`${file}: has no attributes to build`);
  const r = await evalJson(launcher, path, names);
  if (r.ok) {
    const found = interpret(file, names, r.value);
    const isRootDrv = attrs.length === 0 && names.length === 1 && names[0] === 'default';
    await writeDerivations(launcher, path, names, found, isRootDrv);
    return found;
  }
  // Something threw or aborted: find which attribute, and report Nix's own message for it.
  for (const name of names) {
    const single = await evalJson(launcher, path, [name]);
    if (!single.ok) throw new EvaluationError(`${file}: attribute '${name}' failed to evaluate: ${single.error}`);
  }
  throw new EvaluationError(`${file}: evaluation failed: ${r.error}`);
}

/** `--eval` is read-only: it computes drv paths without writing the `.drv` files, which this call does. */
async function writeDerivations(
  launcher: NixLauncher,
  path: string,
  names: readonly string[],
  found: readonly Instantiated[],
  isRootDrv: boolean,
): Promise<void> {
  // The file's own derivation, reported as `default`, is attribute path "" to Nix.
  const selectors = names.map((n, i) => (found[i]!.attr === 'default' && isRootDrv ? '' : n));
  const r = await run(launcher, [path, ...selectors.flatMap((n) => ['-A', n])]);
  if (r.code !== 0) throw new EvaluationError(`${path}: ${nixErrorText(r.stderr)}`);
}

type Verdict = { drv: string } | { missing: string } | { notDrv: string };

function interpret(file: string, names: readonly string[], value: unknown): Instantiated[] {
  const verdicts = value as Verdict[];
  return names.map((attr, i) => {
    const v = verdicts[i]!;
    if ('missing' in v) throw new EvaluationError(`${file}: attribute '${attr}' does not exist (no '${v.missing}')`);
    if ('notDrv' in v) throw new EvaluationError(`${file}: attribute '${attr}' is a ${v.notDrv}, not a derivation`);
    return { attr, drvPath: v.drv };
  });
}

// Walks a dotted path with hasAttr so a missing attribute is an answer, not an uncatchable error.
const EXPRESSION = `
  file: paths:
  let
    raw = import file;
    root = if builtins.isFunction raw then raw {} else raw;
    walk = value: parts: seen:
      if parts == [] then
        (if builtins.isAttrs value && (value.type or null) == "derivation" then { drv = value.drvPath; }
         else { notDrv = if builtins.isAttrs value then "set" else builtins.typeOf value; })
      else
        let head = builtins.head parts; in
        if builtins.isAttrs value && builtins.hasAttr head value
        then walk value.\${head} (builtins.tail parts) (seen ++ [head])
        else { missing = builtins.concatStringsSep "." (seen ++ [head]); };
    split = p: builtins.filter builtins.isString (builtins.split "\\\\." p);
  in map (p: if p == "default" && (root.type or null) == "derivation" then walk root [] [] else walk root (split p) []) paths
`;

async function evalJson(
  launcher: NixLauncher,
  path: string,
  names: readonly string[],
): Promise<{ ok: true; value: unknown } | { ok: false; error: string }> {
  const call = `(${EXPRESSION}) ${nixString(path)} (builtins.fromJSON ${nixString(JSON.stringify(names))})`;
  const r = await run(launcher, ['--eval', '--strict', '--json', '--expr', call]);
  if (r.code !== 0) return { ok: false, error: nixErrorText(r.stderr) };
  return { ok: true, value: JSON.parse(r.stdout) as unknown };
}

/** A Nix string literal: JSON escaping plus `$` so that `${` never starts an interpolation. */
function nixString(s: string): string {
  return JSON.stringify(s).replace(/\$/g, '\\$');
}

function run(launcher: NixLauncher, args: readonly string[]): Promise<NixResult> {
  const c = launcher.command('nix-instantiate', args);
  return runNix(c.file, c.args, { env: c.env });
}

/**
 * The git work tree holding `path`, or its directory: what its expressions may read. Nix checks a path both as
 * written and with symlinks resolved, so both spellings are given.
 */
function projectRoots(path: string): string[] {
  const dir = statSync(path).isDirectory() ? path : dirname(path);
  const r = spawnSync('git', ['-C', dir, 'rev-parse', '--show-toplevel'], { encoding: 'utf8' });
  const top = r.status === 0 && r.stdout.trim() !== '' ? r.stdout.trim() : dir;
  return [...new Set([top, realpathSync(top)])];
}

async function topLevelNames(launcher: NixLauncher, path: string): Promise<string[]> {
  const r = await run(launcher, [
    '--eval',
    '--strict',
    '--json',
    '--expr',
    `let raw = import ${nixString(path)}; v = if builtins.isFunction raw then raw {} else raw; in ` +
      `if (v.type or null) == "derivation" then [ "default" ] else builtins.attrNames v`,
  ]);
  if (r.code !== 0) throw new EvaluationError(`${path}: ${nixErrorText(r.stderr)}`);
  return JSON.parse(r.stdout) as string[];
}
