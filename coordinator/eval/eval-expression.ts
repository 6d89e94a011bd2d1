/**
 * The Nix side of the built-in evaluator: helper bindings defined once in each `nix repl` worker, and the
 * requests sent to it. Every request is one line.
 *
 * Results travel as `builtins.trace` messages that start with a marker holding the worker's secret nonce (see
 * `resultMarker`) and name the attribute path they answer. Package code can trace anything it likes, but it cannot
 * know the nonce (it is never in the file system, the environment or anything an expression can reach), so it can
 * neither forge a result nor shift one onto another attribute.
 *
 * Each attribute answers twice: first what it builds (`r`: drv path, system, outputs, or recurse/ignore/failed),
 * then its `meta` (`m`). Meta comes second and field by field, so a `meta` that throws or aborts never hides the
 * derivation: an abort after the `r` answer of an attribute is blamed on its meta.
 */

/** What an attribute builds. `failed` means `tryEval` caught a throw or failed assert; the message comes from a re-run. */
export type AttrReply =
  { failed: true } | { ignore: true } | { recurse: string[] } | { drvPath: unknown; system: unknown; outputs: unknown };

/** One meta field as evaluated: its value, or `{ failed: true }` when it threw (re-run alone for the message). */
export type MetaField<T> = T | { __ekaciFailed: true };

export interface MetaReply {
  pname: MetaField<unknown>;
  version: MetaField<unknown>;
  license: MetaField<unknown>;
  maintainers: MetaField<unknown>;
  githubMaintainers: MetaField<unknown>;
  platforms: MetaField<unknown>;
  broken: MetaField<unknown>;
  /** Whether `meta.platforms` excludes the derivation's system; null when platforms failed. */
  unsupported: MetaField<unknown>;
}

/** The meta fields eka-ci reads, in the order they are reported. */
export const META_FIELDS: ReadonlyArray<keyof MetaReply> = [
  'pname',
  'version',
  'license',
  'maintainers',
  'githubMaintainers',
  'platforms',
  'broken',
  'unsupported',
];

/** One result trace: the path it answers and either `r` (what it builds) or `m` (its meta). */
export type ResultTrace = { p: string[]; r: AttrReply } | { p: string[]; m: MetaReply };

/** A Nix string literal: JSON escaping plus `$`, so that `${` never starts an interpolation. */
export function nixString(s: string): string {
  return JSON.stringify(s).replace(/\$/g, '\\$');
}

function nixJson(value: unknown): string {
  return `(builtins.fromJSON ${nixString(JSON.stringify(value))})`;
}

/** The prefix of every result trace of a worker whose nonce is `nonce`. */
export function resultMarker(nonce: string): string {
  return `__ekaciResult_${nonce} `;
}

/**
 * Bindings for a worker. Repl bindings are lazy: nothing is imported until the first request, so an error in the
 * file shows up as that request's error. A derivation's `meta.platforms` may hold patterns (attribute sets) as
 * well as system strings; a pattern counts as supported, since only Nixpkgs' lib can match it.
 */
export function setupLines(file: string, attrPath: readonly string[], nonce: string, requestDir: string): string[] {
  const marker = nixString(resultMarker(nonce));
  // Each meta field alone in tryEval: one that throws is reported failed while the others still answer.
  const field = (name: string, expr: string): string =>
    `${name} = let x = builtins.tryEval (builtins.deepSeq (${expr}) (${expr})); in if x.success then x.value else { __ekaciFailed = true; };`;
  return [
    `__ekaciRaw = import ${nixString(file)}`,
    `__ekaciTop = if builtins.isFunction __ekaciRaw then __ekaciRaw {} else __ekaciRaw`,
    `__ekaciRoot = builtins.foldl' (s: n: builtins.getAttr n s) __ekaciTop ${nixJson(attrPath)}`,
    `__ekaciAt = p: builtins.foldl' (s: n: builtins.getAttr n s) __ekaciRoot p`,
    [
      `__ekaciMetaExprs = v: let`,
      `m = v.meta or {};`,
      `lic = l: if builtins.isString l then l else if builtins.isAttrs l then (l.spdxId or l.shortName or null) else null;`,
      `who = x: if builtins.isString x then x else if builtins.isAttrs x then (x.github or x.name or null) else null;`,
      `gh = x: if builtins.isAttrs x && x ? github && builtins.isString x.github then [ x.github ] else [];`,
      `in {`,
      `pname = v.pname or null; version = v.version or null;`,
      `license = if m ? license then (if builtins.isList m.license then map lic m.license else lic m.license) else null;`,
      `maintainers = if m ? maintainers then map who m.maintainers else null;`,
      `githubMaintainers = if m ? maintainers && builtins.isList m.maintainers then builtins.concatMap gh m.maintainers else [];`,
      `platforms = if m ? platforms then builtins.filter builtins.isString m.platforms else null;`,
      `broken = m.broken or null;`,
      `unsupported = m ? platforms && !(builtins.any (p: !(builtins.isString p) || p == v.system) m.platforms);`,
      `}`,
    ].join(' '),
    [`__ekaciMeta = v: let e = __ekaciMetaExprs v; in {`, ...META_FIELDS.map((f) => field(f, `e.${f}`)), `}`].join(' '),
    [
      `__ekaciInfo = v: if !(builtins.isAttrs v) then { ignore = true; }`,
      `else if (v.type or null) == "derivation" then`,
      `{ drvPath = v.drvPath; system = v.system; outputs = builtins.listToAttrs (map (o: { name = o; value = (builtins.getAttr o v).outPath; }) (v.outputs or [ "out" ])); }`,
      `else if (v.recurseForDerivations or false) == true then { recurse = builtins.attrNames v; }`,
      `else { ignore = true; }`,
    ].join(' '),
    `__ekaciTrace = x: builtins.trace (${marker} + builtins.toJSON x) null`,
    [
      `__ekaciOne = p: let`,
      `v = __ekaciAt p; i = __ekaciInfo v; r = builtins.tryEval (builtins.deepSeq i i);`,
      `info = if r.success then r.value else { failed = true; };`,
      `in builtins.seq (__ekaciTrace { inherit p; r = info; })`,
      `(if info ? drvPath then __ekaciTrace { inherit p; m = __ekaciMeta v; } else null)`,
    ].join(' '),
    // A request's argument: the JSON file `<n>.json` in the request directory (see `chunkRequest`).
    `__ekaciArg = n: builtins.fromJSON (builtins.readFile (${nixString(requestDir)} + "/" + toString n + ".json"))`,
    `__ekaciChunk = n: builtins.toJSON (builtins.foldl' (acc: p: builtins.seq (__ekaciOne p) acc) null (__ekaciArg n))`,
    `__ekaciRoots = n: builtins.toJSON (builtins.toFile "ekaci-eval-roots" (builtins.concatStringsSep "\\n" (map (p: builtins.unsafeDiscardOutputDependency (__ekaciAt p).drvPath) (__ekaciArg n))))`,
    `__ekaciSingle = n: builtins.toJSON (__ekaciInfo (__ekaciAt (__ekaciArg n)))`,
    `__ekaciField = n: f: builtins.toJSON (builtins.getAttr f (__ekaciMetaExprs (__ekaciAt (__ekaciArg n))))`,
  ];
}

/** null when the selected value is itself a derivation, else its attribute names. */
export const LIST_REQUEST =
  'builtins.toJSON (if builtins.isAttrs __ekaciRoot && (__ekaciRoot.type or null) == "derivation" then null else builtins.attrNames __ekaciRoot)';

/*
 * Requests. Each is a short line naming a helper bound in `setupLines` and the number `n` of its argument, a JSON file
 * `<n>.json` in the run's request directory: the repl reads its input a character at a time, three system calls
 * each, so a request line of 250 characters cost fifteen times the repl's time of one of 20 (measured: 1.8 ms
 * against 0.12 ms), as much as Nix took to evaluate a few packages.
 */

/**
 * Both answers of each path in the argument (a list of paths), in order, traced as soon as known, with throw and
 * assert caught per attribute and per meta field. An abort or type error ends the request, but the traces before it
 * say how far it got.
 */
export function chunkRequest(n: number): string {
  return `__ekaciChunk ${n}`;
}

/**
 * One store file that references the `.drv` of every path in the argument, each of which answered with a
 * derivation in this worker: rooting that file keeps them all, where a root per derivation cost two `symlink` calls
 * each (as much time as Nix spent evaluating a small package). `unsafeDiscardOutputDependency` makes each a plain
 * reference to the `.drv` file rather than to its outputs, which `toFile` refuses. The paths' values are memoised in
 * the worker, so this evaluates nothing again.
 */
export function rootsRequest(n: number): string {
  return `__ekaciRoots ${n}`;
}

/** What the attribute at the argument's path builds, without `tryEval`, so its error reaches stderr with Nix's message. */
export function singleRequest(n: number): string {
  return `__ekaciSingle ${n}`;
}

/** One meta field of the attribute at the argument's path, without `tryEval`, for Nix's own message. */
export function metaFieldRequest(n: number, fieldName: keyof MetaReply): string {
  return `__ekaciField ${n} ${nixString(fieldName)}`;
}
