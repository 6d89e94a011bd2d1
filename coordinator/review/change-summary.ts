/**
 * What a change does to the packages themselves, read from both sides' evaluations rather than from their builds:
 * version bumps and renames, packages added and removed, and changes of `meta.license`, `meta.maintainers`,
 * `meta.platforms` and `meta.broken`. Meta is not part of a derivation, so a license-only change leaves the drv — and
 * the rebuild diff — untouched; the summary therefore looks at every attribute of both evaluations, not only those
 * the diff lists. One pass over each side and a map per job: a nixpkgs change (≈100,000 attributes a side) costs the
 * same per attribute as a small one.
 */

import { splitDrvName } from './closure-diff.js';
import { runSteps } from '../../common/turn.js';

/** The attribute a package change is about. */
export interface PackageRef {
  job: string;
  attr: string;
  /** The head's system (the base's for a removed package). */
  system: string | null;
}

/**
 * A package's name and version: `pname` and `version` as evaluated, or where the derivation has neither, its name
 * split as `builtins.parseDrvName` does (`hello-2.12` → `hello`, `2.12`). null where neither says, or the field failed.
 */
export interface PackageVersion {
  pname: string | null;
  version: string | null;
}

/** The version changed (same or unknown `pname`), or the package was renamed (both `pname`s known and different). */
export interface VersionChange extends PackageRef {
  base: PackageVersion;
  head: PackageVersion;
}

/** A package (an attribute with a derivation) on one side only. */
export interface PackageEntry extends PackageRef, PackageVersion {}

/** `meta.license` as a list on each side (a single license is a list of one; none is []), compared as sets. */
export interface LicenseChange extends PackageRef {
  base: string[];
  head: string[];
}

/** What came and went between two lists compared as sets (`meta.maintainers`, `meta.platforms`). */
export interface SetChange extends PackageRef {
  added: string[];
  removed: string[];
}

/** `meta.broken` (absent is false) turned on or off. */
export interface BrokenChange extends PackageRef {
  base: boolean;
  head: boolean;
}

/** The fields the summary compares; `meta` stands for the whole set where the evaluator could not tell which failed. */
export type ComparedField = 'pname' | 'version' | 'license' | 'maintainers' | 'platforms' | 'broken' | 'meta';

/**
 * A compared field that failed to evaluate on one side and evaluated on the other: reported as such, and never
 * compared (a maintainer list that throws did not lose its maintainers). A field failing on both sides is no change.
 */
export interface MetaFieldError extends PackageRef {
  field: ComparedField;
  /** The side where it failed. */
  side: 'base' | 'head';
  error: string;
}

/** Every list sorted by job, then attribute (code-unit order, the same on every machine). */
export interface ChangeSummary {
  versions: VersionChange[];
  added: PackageEntry[];
  removed: PackageEntry[];
  licenses: LicenseChange[];
  maintainers: SetChange[];
  platforms: SetChange[];
  broken: BrokenChange[];
  metaErrors: MetaFieldError[];
}

/**
 * What the summary reads of an evaluated attribute: coordinator/eval's `EvalResult` fits it. Declared here so that the
 * web UI, which shares this module's types and grouping, never reaches the evaluator's Node-only code.
 */
export interface EvaluatedAttr {
  attr: string;
  drvPath?: string;
  system?: string;
  meta?: EvaluatedMeta;
  metaErrors?: Record<string, string>;
}

export interface EvaluatedMeta {
  pname?: string;
  version?: string;
  license?: string | string[];
  maintainers?: string[];
  platforms?: string[];
  broken?: boolean;
}

export interface ChangeSummaryJob {
  name: string;
  base: readonly EvaluatedAttr[];
  head: readonly EvaluatedAttr[];
}

// Attributes compared between two yields of `changeSummarySteps` (the review's event-loop turns, review-builder).
const STEP_ATTRS = 2_000;

const COMPARED_FIELDS: readonly ComparedField[] = ['pname', 'version', 'license', 'maintainers', 'platforms', 'broken'];

/** The change summary of both sides' evaluations, job by job. */
export function changeSummary(jobs: readonly ChangeSummaryJob[]): ChangeSummary {
  return runSteps(changeSummarySteps(jobs));
}

/** A summary of no changes, to fill in. */
export function emptyChangeSummary(): ChangeSummary {
  return {
    versions: [],
    added: [],
    removed: [],
    licenses: [],
    maintainers: [],
    platforms: [],
    broken: [],
    metaErrors: [],
  };
}

/**
 * The same computation, yielding every STEP_ATTRS attributes so that a caller on the event loop can let it turn
 * (a nixpkgs review must not stall agents and webhooks while it compares 200,000 attributes).
 */
export function* changeSummarySteps(jobs: readonly ChangeSummaryJob[]): Generator<void, ChangeSummary> {
  const s = emptyChangeSummary();
  let n = 0;
  for (const job of jobs) {
    const base = new Map<string, EvaluatedAttr>();
    for (const b of job.base) {
      base.set(b.attr, b);
      if (++n % STEP_ATTRS === 0) yield;
    }
    for (const h of job.head) {
      const b = base.get(h.attr);
      if (b === undefined) {
        if (h.drvPath) s.added.push({ ...ref(job.name, h), ...versionOf(h, failedFields(h)) });
      } else {
        base.delete(h.attr);
        // A side that did not evaluate to a derivation has no meta to compare: its error is in the review's attrs.
        if (b.drvPath && h.drvPath && !plainlyAlike(b, h)) compare(s, ref(job.name, h, b), b, h);
      }
      if (++n % STEP_ATTRS === 0) yield;
    }
    for (const b of base.values()) {
      if (b.drvPath) s.removed.push({ ...ref(job.name, b), ...versionOf(b, failedFields(b)) });
    }
  }
  for (const list of Object.values(s) as PackageRef[][]) list.sort(byRef);
  return s;
}

/** Whether the summary holds no change at all. */
export function isEmptySummary(s: ChangeSummary): boolean {
  return (Object.values(s) as unknown[][]).every((list) => list.length === 0);
}

function ref(job: string, r: EvaluatedAttr, other?: EvaluatedAttr): PackageRef {
  return { job, attr: r.attr, system: r.system ?? other?.system ?? null };
}

type Failed = ReadonlyMap<ComparedField, string>;
const NOTHING_FAILED: Failed = new Map();

/**
 * The compared fields that failed on one side, with Nix's message. `meta` (the whole set failed) fails every meta
 * field; `pname` and `version` are the derivation's own attributes, and fail only by name.
 */
function failedFields(r: EvaluatedAttr): Failed {
  const errors = r.metaErrors;
  if (errors === undefined) return NOTHING_FAILED;
  const failed = new Map<ComparedField, string>();
  for (const field of COMPARED_FIELDS) {
    const error = errors[field] ?? (field === 'pname' || field === 'version' ? undefined : errors.meta);
    if (error !== undefined) failed.set(field, error);
  }
  if (errors.meta !== undefined) failed.set('meta', errors.meta);
  return failed;
}

const NO_META: EvaluatedMeta = {};
const NONE: readonly string[] = [];

/**
 * The common case, decided without allocating: no field failed and nothing compared differs, element for element
 * (a reordered list or a renamed-but-equal license set is left to `compare`). Most of a nixpkgs change is this.
 */
function plainlyAlike(b: EvaluatedAttr, h: EvaluatedAttr): boolean {
  if (b.metaErrors !== undefined || h.metaErrors !== undefined) return false;
  const [bm, hm] = [b.meta ?? NO_META, h.meta ?? NO_META];
  const sameLicense =
    bm.license === hm.license ||
    (Array.isArray(bm.license) && Array.isArray(hm.license) && sameList(bm.license, hm.license));
  return (
    bm.pname === hm.pname &&
    bm.version === hm.version &&
    (bm.broken === true) === (hm.broken === true) &&
    sameLicense &&
    sameList(bm.maintainers ?? NONE, hm.maintainers ?? NONE) &&
    sameList(bm.platforms ?? NONE, hm.platforms ?? NONE) &&
    // Where meta lacks pname or version, the derivation's name supplies it.
    ((bm.pname !== undefined && bm.version !== undefined) || drvName(b.drvPath) === drvName(h.drvPath))
  );
}

function compare(s: ChangeSummary, at: PackageRef, b: EvaluatedAttr, h: EvaluatedAttr): void {
  const [bf, hf] = [failedFields(b), failedFields(h)];
  const [bm, hm] = [b.meta ?? {}, h.meta ?? {}];
  /** Whether both sides evaluated `field`; when only one did, that is reported instead of a comparison. */
  const comparable = (field: ComparedField): boolean => {
    const [onBase, onHead] = [bf.get(field), hf.get(field)];
    if (onBase === undefined && onHead === undefined) return true;
    if (onBase !== undefined && onHead !== undefined) return false;
    const [side, failing] = onBase !== undefined ? (['base', bf] as const) : (['head', hf] as const);
    // A field that failed with the whole set is told once, as `meta`, not once per field.
    if (field === 'meta' || !failing.has('meta')) s.metaErrors.push({ ...at, field, side, error: (onBase ?? onHead)! });
    return false;
  };
  comparable('meta');

  const [bv, hv] = [versionOf(b, bf), versionOf(h, hf)];
  const versionKnown = comparable('version');
  comparable('pname');
  const renamed = bv.pname !== null && hv.pname !== null && bv.pname !== hv.pname;
  if (renamed || (versionKnown && bv.version !== hv.version)) s.versions.push({ ...at, base: bv, head: hv });

  if (comparable('license')) {
    const [bl, hl] = [licenses(bm), licenses(hm)];
    if (!sameSet(bl, hl)) s.licenses.push({ ...at, base: bl, head: hl });
  }
  if (comparable('maintainers')) setChange(s.maintainers, at, bm.maintainers ?? [], hm.maintainers ?? []);
  if (comparable('platforms')) setChange(s.platforms, at, bm.platforms ?? [], hm.platforms ?? []);
  if (comparable('broken')) {
    const [bb, hb] = [bm.broken === true, hm.broken === true];
    if (bb !== hb) s.broken.push({ ...at, base: bb, head: hb });
  }
}

/** Name and version from `pname`/`version`, each field absent from meta taken from the derivation's name. */
function versionOf(r: EvaluatedAttr, failed: Failed): PackageVersion {
  const m = r.meta ?? {};
  const parsed = m.pname === undefined || m.version === undefined ? parseDrvName(drvName(r.drvPath)) : undefined;
  return {
    pname: failed.has('pname') ? null : (m.pname ?? parsed?.pname ?? null),
    version: failed.has('version') ? null : (m.version ?? parsed?.version ?? null),
  };
}

/** The name of a `/nix/store/<hash>-<name>.drv` path. */
function drvName(drvPath: string | undefined): string | undefined {
  if (drvPath === undefined) return undefined;
  const base = drvPath.slice(drvPath.lastIndexOf('/') + 1);
  const dash = base.indexOf('-');
  if (dash < 0 || !base.endsWith('.drv')) return undefined;
  return base.slice(dash + 1, -'.drv'.length);
}

/** Nix's `builtins.parseDrvName` (`splitDrvName`), with no version as null. */
export function parseDrvName(name: string | undefined): PackageVersion {
  if (name === undefined) return { pname: null, version: null };
  const split = splitDrvName(name);
  return { pname: split.name, version: split.version === '' ? null : split.version };
}

function licenses(m: EvaluatedMeta): string[] {
  const l = m.license;
  if (l === undefined) return [];
  return typeof l === 'string' ? [l] : [...new Set(l)];
}

function setChange(into: SetChange[], at: PackageRef, base: readonly string[], head: readonly string[]): void {
  if (sameList(base, head)) return;
  const [b, h] = [new Set(base), new Set(head)];
  const added = [...h].filter((x) => !b.has(x));
  const removed = [...b].filter((x) => !h.has(x));
  if (added.length > 0 || removed.length > 0) into.push({ ...at, added, removed });
}

/** The common case, checked first: nothing changed, element for element. */
function sameList(a: readonly string[], b: readonly string[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function sameSet(a: readonly string[], b: readonly string[]): boolean {
  if (sameList(a, b)) return true;
  const h = new Set(b);
  return new Set(a).size === h.size && a.every((x) => h.has(x));
}

function byRef(a: PackageRef, b: PackageRef): number {
  return a.job < b.job ? -1 : a.job > b.job ? 1 : a.attr < b.attr ? -1 : a.attr > b.attr ? 1 : 0;
}

/**
 * Entries grouped by what changed (`key`), most widespread first, for display: a platform added to 5,000 packages
 * is one row, not 5,000. Linear in the entries, plus sorting the groups.
 */
export function groupChanges<T extends PackageRef>(
  entries: readonly T[],
  key: (e: T) => string,
): Array<{ change: T; attrs: T[] }> {
  const groups = new Map<string, { change: T; attrs: T[] }>();
  for (const e of entries) {
    const k = key(e);
    const g = groups.get(k);
    if (g) g.attrs.push(e);
    else groups.set(k, { change: e, attrs: [e] });
  }
  return [...groups.entries()]
    .sort(([ka, a], [kb, b]) => b.attrs.length - a.attrs.length || (ka < kb ? -1 : ka > kb ? 1 : 0))
    .map(([, g]) => g);
}
