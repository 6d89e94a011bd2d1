/**
 * The Nix side of the built-in evaluator: helper bindings defined once in each `nix repl` worker, and the
 * requests sent to it. Every request is one line and prints `builtins.toJSON` of its answer.
 */

/** How one attribute answered. `failed` means `tryEval` caught a throw or failed assert; the message comes from a re-run. */
export type AttrReply =
  | { failed: true }
  | { ignore: true }
  | { recurse: string[] }
  | {
      drvPath: string;
      system: string;
      outputs: Record<string, string>;
      unsupported: boolean;
      meta: {
        pname: string | null;
        version: string | null;
        license: string | null | (string | null)[];
        maintainers: (string | null)[] | null;
        platforms: string[] | null;
        broken: boolean | null;
      };
    };

/** A Nix string literal: JSON escaping plus `$`, so that `${` never starts an interpolation. */
export function nixString(s: string): string {
  return JSON.stringify(s).replace(/\$/g, '\\$');
}

function nixJson(value: unknown): string {
  return `(builtins.fromJSON ${nixString(JSON.stringify(value))})`;
}

/**
 * Bindings for a worker. Repl bindings are lazy: nothing is imported until the first request, so an error in the
 * file shows up as that request's error. A derivation's `meta.platforms` may hold patterns (attribute sets) as
 * well as system strings; a pattern counts as supported, since only Nixpkgs' lib can match it.
 */
export function setupLines(file: string, attrPath: readonly string[]): string[] {
  return [
    `__ekaciRaw = import ${nixString(file)}`,
    `__ekaciTop = if builtins.isFunction __ekaciRaw then __ekaciRaw {} else __ekaciRaw`,
    `__ekaciRoot = builtins.foldl' (s: n: builtins.getAttr n s) __ekaciTop ${nixJson(attrPath)}`,
    `__ekaciAt = p: builtins.foldl' (s: n: builtins.getAttr n s) __ekaciRoot p`,
    [
      `__ekaciDrv = v: let`,
      `m = v.meta or {};`,
      `lic = l: if builtins.isString l then l else if builtins.isAttrs l then (l.spdxId or l.shortName or null) else null;`,
      `who = x: if builtins.isString x then x else if builtins.isAttrs x then (x.github or x.name or null) else null;`,
      `in {`,
      `drvPath = v.drvPath; system = v.system;`,
      `outputs = builtins.listToAttrs (map (o: { name = o; value = (builtins.getAttr o v).outPath; }) (v.outputs or [ "out" ]));`,
      `unsupported = m ? platforms && !(builtins.any (p: !(builtins.isString p) || p == v.system) m.platforms);`,
      `meta = {`,
      `pname = v.pname or null; version = v.version or null;`,
      `license = if m ? license then (if builtins.isList m.license then map lic m.license else lic m.license) else null;`,
      `maintainers = if m ? maintainers then map who m.maintainers else null;`,
      `platforms = if m ? platforms then builtins.filter builtins.isString m.platforms else null;`,
      `broken = m.broken or null;`,
      `}; }`,
    ].join(' '),
    [
      `__ekaciInfo = v: if !(builtins.isAttrs v) then { ignore = true; }`,
      `else if (v.type or null) == "derivation" then __ekaciDrv v`,
      `else if (v.recurseForDerivations or false) == true then { recurse = builtins.attrNames v; }`,
      `else { ignore = true; }`,
    ].join(' '),
    `__ekaciOne = p: let i = __ekaciInfo (__ekaciAt p); r = builtins.tryEval (builtins.deepSeq i i); in if r.success then r.value else { failed = true; }`,
  ];
}

/** null when the selected value is itself a derivation, else its attribute names. */
export const LIST_REQUEST =
  'builtins.toJSON (if builtins.isAttrs __ekaciRoot && (__ekaciRoot.type or null) == "derivation" then null else builtins.attrNames __ekaciRoot)';

/** Marks the traces that carry results, apart from any `builtins.trace` of the package set itself. */
export const RESULT_TRACE = '__ekaciResult ';

/**
 * One `AttrReply` per path, in order, each printed as a trace (`RESULT_TRACE` + JSON) as soon as it is known,
 * with throw and assert caught per attribute. An abort or type error ends the request, but the traces before it
 * say how far it got: the next path is the one that failed.
 */
export function chunkRequest(paths: readonly (readonly string[])[]): string {
  return (
    `builtins.toJSON (builtins.foldl' (acc: p: builtins.seq (builtins.trace ("${RESULT_TRACE}" + builtins.toJSON (__ekaciOne p)) null) acc) ` +
    `null ${nixJson(paths)})`
  );
}

/** One attribute without `tryEval`, so that its error reaches stderr with Nix's own message. */
export function singleRequest(path: readonly string[]): string {
  return `builtins.toJSON (__ekaciInfo (__ekaciAt ${nixJson(path)}))`;
}
