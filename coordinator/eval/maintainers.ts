import { realpath } from 'node:fs/promises';
import { EvaluationError } from '../../common/errors.js';
import { NO_SUBSTITUTERS, nixErrorText, runNix } from '../../common/nix/cli.js';
import { resolveInCheckout } from '../repo-config/checkout-path.js';

export interface MaintainersOptions {
  checkoutDir: string;
  /** The job's Nix file relative to the checkout (a FileJob's `relativeFile`); a directory means its default.nix. */
  file: string;
  /** The job's `attr_path` (`pkgs`, `a.b`), under which `attrs` are looked up; absent means the file's value. */
  attrPath?: string;
  /** Dotted attribute paths (`python3Packages.requests`). */
  attrs: readonly string[];
}

/**
 * The GitHub handles in `meta.maintainers` of each attribute, for deciding who may merge a pull request.
 *
 * Only `meta` is evaluated, in one `nix-instantiate --eval` for all attributes. Maintainers without a `github`
 * handle are left out, and an attribute that is missing, has no `meta`, or fails to evaluate maps to `[]` — it has
 * no maintainer who could vouch for it. Rejects with `EvaluationError` only when the file itself (or `attrPath`
 * inside it) cannot be evaluated, since then no attribute's answer would mean anything.
 *
 * The repository is untrusted: attribute names reach Nix as JSON data through `--argstr`, never as code, and the
 * file must lie inside the checkout.
 */
export async function maintainersOf(options: MaintainersOptions): Promise<Map<string, string[]>> {
  const attrs = [...new Set(options.attrs)];
  if (attrs.length === 0) return new Map();
  const file = await jobFile(options.checkoutDir, options.file);
  const prefix = options.attrPath === undefined || options.attrPath === '' ? [] : options.attrPath.split('.');
  const run = (subset: readonly string[]): Promise<Reply> => evalHandles(file, prefix, subset);

  const all = await run(attrs);
  const handles = all.ok ? all.value : await isolateFailures(run, attrs, all);
  return new Map(attrs.map((attr, i) => [attr, handles[i]!]));
}

type Reply = { ok: true; value: string[][] } | { ok: false; error: string };

/**
 * `tryEval` catches `throw` and `assert` per attribute, but an `abort` or a type error ends the whole call. Then
 * the file is checked on its own; if it is sound, halving the list finds the attributes at fault in a few calls
 * each, and only those map to [].
 */
async function isolateFailures(
  run: (subset: readonly string[]) => Promise<Reply>,
  attrs: readonly string[],
  failure: Reply & { ok: false },
): Promise<string[][]> {
  const root = await run([]);
  if (!root.ok) throw new EvaluationError(root.error);
  const bisect = async (subset: readonly string[]): Promise<string[][]> => {
    const r = subset === attrs ? failure : await run(subset);
    if (r.ok) return r.value;
    if (subset.length === 1) return [[]];
    const half = Math.ceil(subset.length / 2);
    return [...(await bisect(subset.slice(0, half))), ...(await bisect(subset.slice(half)))];
  };
  return bisect(attrs);
}

async function jobFile(checkoutDir: string, file: string): Promise<string> {
  const root = await realpath(checkoutDir);
  let found = await resolveInCheckout(root, file);
  if (found.kind === 'directory') found = await resolveInCheckout(root, `${file}/default.nix`);
  if (found.kind === 'file') return found.absolute;
  const why =
    found.kind === 'missing'
      ? 'does not exist'
      : found.kind === 'escapes'
        ? 'lies outside the checkout'
        : found.kind === 'invalid'
          ? found.reason
          : 'is not a file';
  throw new EvaluationError(`${file}: ${why}`);
}

// A constant: everything from the repository arrives as `--argstr` strings. The root (file and prefix) is forced
// outside `tryEval`, so a broken file fails the call instead of passing for "no maintainers".
const EXPRESSION = `
{ file, prefix, paths }:
let
  raw = import (/. + file);
  top = if builtins.isFunction raw then raw {} else raw;
  walk = v: parts:
    if parts == [] then { found = v; }
    else let h = builtins.head parts; in
      if builtins.isAttrs v && builtins.hasAttr h v then walk (builtins.getAttr h v) (builtins.tail parts) else {};
  rootAt = walk top (builtins.fromJSON prefix);
  root = if rootAt ? found then rootAt.found
    else throw "attribute path '\${builtins.concatStringsSep "." (builtins.fromJSON prefix)}' does not exist";
  github = m: if builtins.isAttrs m && m ? github && builtins.isString m.github then [ m.github ] else [];
  handles = v:
    let
      meta = if builtins.isAttrs v && v ? meta && builtins.isAttrs v.meta then v.meta else {};
      list = meta.maintainers or [];
    in if builtins.isList list then builtins.concatMap github list else [];
  one = path:
    let
      at = walk root path;
      hs = if at ? found then handles at.found else [];
      r = builtins.tryEval (builtins.deepSeq hs hs);
    in if r.success then r.value else [];
in builtins.seq root (map one (builtins.fromJSON paths))
`;

async function evalHandles(file: string, prefix: readonly string[], attrs: readonly string[]): Promise<Reply> {
  const r = await runNix('nix-instantiate', [
    ...NO_SUBSTITUTERS,
    '--eval',
    '--strict',
    '--json',
    '--expr',
    EXPRESSION,
    '--argstr',
    'file',
    file,
    '--argstr',
    'prefix',
    JSON.stringify(prefix),
    '--argstr',
    'paths',
    JSON.stringify(attrs.map((a) => a.split('.'))),
  ]);
  if (r.code !== 0) return { ok: false, error: `${file}: ${nixErrorText(r.stderr)}` };
  const value = JSON.parse(r.stdout) as string[][];
  return { ok: true, value: value.map((hs) => [...new Set(hs)]) };
}
