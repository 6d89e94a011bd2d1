import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EvaluationError } from '../../common/errors.js';
import { isDrvPath, isStorePath } from '../../common/nix/store-path.js';
import { AsyncChannel } from './async-channel.js';
import {
  type AttrReply,
  LIST_REQUEST,
  META_FIELDS,
  type MetaReply,
  type ResultTrace,
  chunkRequest,
  metaFieldRequest,
  resultMarker,
  rootsRequest,
  setupLines,
  singleRequest,
} from './eval-expression.js';
import type { NixLauncher } from './eval-environment.js';
import {
  type CompiledEvaluatorOptions,
  type EvalMeta,
  type EvalResult,
  type EvaluatorOptions,
  compileOptions,
  derivationProblem,
} from './eval-result.js';
import { EvalWorker, type ReplReply } from './eval-worker.js';
import { GcRoots } from './gc-roots.js';
import { PathQueue } from './path-queue.js';
import { evaluateWithNixEvalJobs, hasNixEvalJobs } from './nix-eval-jobs.js';

export { DEFAULT_MAX_MEMORY_MIB, DEFAULT_WORKERS } from './eval-result.js';
export type { EvalMeta, EvalResult, EvaluatorOptions } from './eval-result.js';

// Attributes per request: large enough that the pipe round trip (≈1 ms) is noise next to evaluation, small
// enough that work spreads over the workers.
const MAX_CHUNK_SIZE = 64;

// A worker that dies mid-request (killed, out of memory) is replaced and the request retried this many times
// before the attribute is blamed: a genuine evaluator crash recurs, an outside kill does not.
const CRASH_RETRIES = 1;

// Derivations a worker made that are rooted together, with one store file (see `EvaluationRun.root`): one roots
// request per chunk cost 1 ms each (a store file written and registered), as much as Nix took for 8 attributes.
const ROOT_BATCH = 1_024;

// A worker's memory is looked at after a chunk at most this often: reading a process tree's memory took a dozen
// system calls, 0.9 s of the coordinator's time in an evaluation of 100,000 attributes when done after every chunk.
// The hard limit (`ulimit -d`) holds in between.
const RSS_CHECK_MS = 250;

/**
 * Evaluates the derivations of a Nix file, streaming one result per attribute as it is known. Uses
 * `nix-eval-jobs` when it is on PATH, otherwise the built-in evaluator (`evaluateBuiltIn`).
 */
export async function* evaluate(options: EvaluatorOptions): AsyncGenerator<EvalResult> {
  const o = compileOptions(options);
  if (await hasNixEvalJobs()) yield* evaluateWithNixEvalJobs(o);
  else yield* evaluateBuiltIn(o);
}

/**
 * The built-in evaluator: `workers` long-lived `nix repl` processes (see `EvalWorker`) take chunks of attribute
 * paths from a shared queue; sets marked `recurseForDerivations` add their children to the queue.
 *
 * Failure isolation: within a chunk `tryEval` catches throw and assert per attribute, which are then re-run
 * alone to get Nix's message. An abort or type error ends the request but not the repl; results stream back as
 * traces, so the attribute after the last one reported is the culprit (blamed with the request's error) and the
 * rest of the chunk is sent again. No bisection: the file is imported once per worker and each abort costs one
 * extra request.
 */
export async function* evaluateBuiltIn(
  options: EvaluatorOptions | CompiledEvaluatorOptions,
): AsyncGenerator<EvalResult> {
  const o = compileOptions(options);
  const channel = new AsyncChannel<EvalResult>();
  const run = new EvaluationRun(o, (r) => channel.push(r));
  run.start().then(
    () => channel.close(),
    (e: unknown) => channel.fail(e),
  );
  try {
    yield* channel;
  } finally {
    run.stop();
  }
}

/** One worker's slot: the repl it currently runs, replaced when it dies or outgrows its memory limit. */
class WorkerSlot {
  /**
   * Derivations the current worker made that are not rooted yet: its store connection's temporary roots keep them
   * until the slot roots them in a batch, or, when the worker dies first, one by one (see `onLost`).
   */
  unrooted: Derived[] = [];
  private rssCheckedAt = 0;

  constructor(
    /** Names the file its requests' arguments travel in (see `EvaluationRun.ask`). */
    readonly id: number,
    private worker: EvalWorker | undefined,
    private readonly setup: (nonce: string) => readonly string[],
    private readonly launcher: NixLauncher,
    private readonly requestDir: string,
    private readonly maxMemoryMiB: number,
    readonly onStart: (w: EvalWorker) => void,
    /** Called with the unrooted derivations of a worker that died, before its replacement starts. */
    private readonly onLost: (derived: Derived[]) => Promise<void>,
  ) {}

  private argumentFd: number | undefined;

  /** Whether the slot's worker is running (a request would not start a new one). */
  get alive(): boolean {
    return this.worker?.alive === true;
  }

  /** Hands what a dead worker made and did not root to `onLost`, which roots it one by one. */
  async rootLost(): Promise<void> {
    const lost = this.unrooted;
    this.unrooted = [];
    if (lost.length > 0) await this.onLost(lost);
  }

  /** Starts a new worker in place of a dead one, after rooting what the old one made (`rootLost`). */
  private async restart(): Promise<void> {
    if (this.alive) return;
    await this.rootLost();
    this.worker = await EvalWorker.start(this.setup, this.launcher, [this.requestDir]);
    this.onStart(this.worker);
  }

  /**
   * Sends a request, replacing a dead worker first. With `results`, the per-attribute time limit counts from each
   * result the worker traces. Answers the reply and the nonce of the worker that gave it.
   */
  async ask(line: string, results = false): Promise<{ reply: ReplReply; nonce: string }> {
    for (let attempt = 0; ; attempt++) {
      await this.restart();
      const w = this.worker!;
      const progress = results ? resultMarker(w.nonce) : undefined;
      const reply = await w.request(line, this.launcher.attrTimeoutMs, progress);
      if (!w.alive && attempt < CRASH_RETRIES && !/did not finish evaluating/.test(reply.ok ? '' : reply.error)) {
        continue;
      }
      // Measured after a chunk only, and not after every one (RSS_CHECK_MS): the requests between chunks (an
      // attribute's message, a meta field, a root) add next to nothing to it.
      if (results && w.alive && Date.now() - this.rssCheckedAt >= RSS_CHECK_MS) {
        this.rssCheckedAt = Date.now();
        if (w.rssMiB() > this.maxMemoryMiB) w.kill();
      }
      return { reply, nonce: w.nonce };
    }
  }

  /**
   * The argument of the slot's next request, in `<id>.json` of the request directory: one file per worker, written
   * over in place for each of its requests (a worker has one at a time; one retried after a crash reads the same
   * argument again). Neither created nor truncated to nothing per request: on ext4 a new file cost 0.4 ms and a
   * truncating write 0.2 ms (it forces the data out, lest a crash leave the file empty), against 0.015 ms for this —
   * as much as Nix takes to evaluate a small package.
   */
  writeArgument(text: string): void {
    this.argumentFd ??= openSync(join(this.requestDir, `${this.id}.json`), 'w+');
    const bytes = Buffer.from(text);
    writeSync(this.argumentFd, bytes, 0, bytes.length, 0);
    ftruncateSync(this.argumentFd, bytes.length);
  }

  kill(): void {
    this.worker?.kill();
    if (this.argumentFd !== undefined) closeSync(this.argumentFd);
    this.argumentFd = undefined;
  }
}

class EvaluationRun {
  private readonly queue = new PathQueue();
  private busy = 0;
  private stopped = false;
  private waiters: (() => void)[] = [];
  private readonly slots: WorkerSlot[] = [];
  private readonly roots: GcRoots;
  private readonly setup: (nonce: string) => string[];
  /**
   * One array per distinct `meta.platforms`: a package set shares a few lists (Nixpkgs' `lib.platforms.*`) among
   * most of its attributes, and a copy per attribute (40 strings each) was most of what 100,000 results kept alive.
   */
  private readonly platformLists = new Interned();
  /** Where requests' arguments are written for the workers to read (see `chunkRequest`). */
  private readonly requestDir = mkdtempSync(join(tmpdir(), 'ekaci-eval-requests-'));

  constructor(
    private readonly o: CompiledEvaluatorOptions,
    private readonly emit: (r: EvalResult) => void,
  ) {
    this.roots = new GcRoots(o.gcRootsDir, o.launcher.registerRoot);
    this.setup = (nonce) => setupLines(o.file, o.attrPath, nonce, this.requestDir);
  }

  async start(): Promise<void> {
    const first = this.slot(undefined);
    const { reply: listing } = await first.ask(LIST_REQUEST);
    if (!listing.ok) {
      this.stop();
      const where = this.o.attrPath.length > 0 ? ` (attribute path ${this.o.attrPath.join('.')})` : '';
      throw new EvaluationError(`${this.o.file}${where}: ${listing.error}`);
    }
    const names = JSON.parse(listing.value) as string[] | null;
    this.queue.push(names === null ? [[]] : names.map((n) => [n]));
    const loops = [this.loop(first)];
    for (let i = 1; i < this.o.workers; i++) loops.push(this.loop(this.slot(undefined)));
    try {
      await Promise.all(loops);
    } finally {
      this.stop();
    }
  }

  stop(): void {
    this.stopped = true;
    for (const s of this.slots) s.kill();
    rmSync(this.requestDir, { recursive: true, force: true });
    this.wakeAll();
  }

  private slot(worker: EvalWorker | undefined): WorkerSlot {
    const s = new WorkerSlot(
      this.slots.length,
      worker,
      this.setup,
      this.o.launcher,
      this.requestDir,
      this.o.maxMemoryMiB,
      (w) => workerStarted?.(w),
      (lost) => this.rootEach(lost),
    );
    this.slots.push(s);
    return s;
  }

  private async loop(slot: WorkerSlot): Promise<void> {
    // The group of paths this worker keeps to (see PathQueue).
    let group: string | undefined;
    while (!this.stopped) {
      if (this.queue.size === 0) {
        if (this.busy === 0) break;
        await new Promise<void>((resolve) => this.waiters.push(resolve));
        continue;
      }
      // Share out what is queued so no worker idles while another holds a full chunk.
      const size = Math.min(MAX_CHUNK_SIZE, Math.ceil(this.queue.size / this.o.workers));
      const taken = this.queue.take(group, size)!;
      group = taken.group;
      this.busy++;
      try {
        await this.evalPaths(slot, taken.paths);
      } finally {
        this.busy--;
        this.wakeAll();
      }
    }
    if (group !== undefined) this.queue.leave(group);
    // The run does not end before what this worker made is rooted.
    await this.root(slot);
    this.wakeAll();
  }

  private wakeAll(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private async evalPaths(slot: WorkerSlot, paths: string[][]): Promise<void> {
    if (this.stopped || paths.length === 0) return;
    const { reply, nonce } = await this.ask(slot, chunkRequest, paths, true);
    // Results are matched to the paths asked for, never by position: only traces carrying this worker's nonce
    // count, and a path not asked for (or answered twice) is ignored.
    const marker = resultMarker(nonce);
    const index = new Map(paths.map((p, i) => [JSON.stringify(p), i]));
    const infos = new Map<number, AttrReply>();
    const metas = new Map<number, MetaReply>();
    for (const t of reply.traces) {
      if (!t.startsWith(marker)) continue;
      const answer = parseTrace(t.slice(marker.length));
      const i = answer === undefined ? undefined : index.get(JSON.stringify(answer.p));
      if (answer === undefined || i === undefined) continue;
      if ('r' in answer && !infos.has(i)) infos.set(i, answer.r);
      else if ('m' in answer && !metas.has(i)) metas.set(i, answer.m);
    }
    // Answers come in order: paths 0..answered-1 have their first answer.
    let answered = 0;
    while (infos.has(answered)) answered++;
    const complete = reply.ok;
    const derived: Derived[] = [];
    for (let i = 0; i < answered; i++) {
      const info = infos.get(i)!;
      const interrupted = !complete && i === answered - 1 && 'drvPath' in info && !metas.has(i);
      // The request died inside this attribute's meta: its fields are asked one by one.
      await this.handle(slot, paths[i]!, info, metas.get(i) ?? (interrupted ? 'ask' : undefined), derived);
    }
    let rest: string[][] = [];
    if (!complete && answered < paths.length) {
      const last = infos.get(answered - 1);
      const diedInMeta = answered > 0 && last !== undefined && 'drvPath' in last && !metas.has(answered - 1);
      if (diedInMeta) rest = paths.slice(answered);
      else {
        // The path after the last answer is the one that aborted; its message is this reply's error.
        await this.handle(slot, paths[answered]!, { failed: true }, undefined, derived, reply);
        rest = paths.slice(answered + 1);
      }
    }
    slot.unrooted.push(...derived);
    if (slot.unrooted.length >= ROOT_BATCH) await this.root(slot);
    await this.evalPaths(slot, rest);
  }

  /** Sends a request whose argument (`arg`, as JSON) travels in the request directory (see `chunkRequest`). */
  private async ask(
    slot: WorkerSlot,
    request: (n: number) => string,
    arg: unknown,
    results = false,
  ): Promise<{ reply: ReplReply; nonce: string }> {
    slot.writeArgument(JSON.stringify(arg));
    return slot.ask(request(slot.id), results);
  }

  /**
   * Roots the derivations the slot's worker made (`unrooted`), with one store file referencing them all
   * (`rootsRequest`), or one root each when the worker cannot write that file. Until then the worker's connection to
   * the store keeps them (Nix's temporary roots).
   */
  private async root(slot: WorkerSlot): Promise<void> {
    const derived = slot.unrooted;
    if (derived.length === 0 || this.stopped) return;
    // A new worker would evaluate them all again to name them: rooted one by one instead.
    if (!slot.alive) return slot.rootLost();
    const { reply } = await this.ask(
      slot,
      rootsRequest,
      derived.map((d) => d.path),
    );
    // A worker that died on the way was replaced, and what it made rooted one by one already.
    if (slot.unrooted !== derived) return;
    slot.unrooted = [];
    const rootFile = reply.ok ? parseJson(reply.value) : undefined;
    if (typeof rootFile === 'string' && isStorePath(rootFile) && !isDrvPath(rootFile)) await this.roots.add(rootFile);
    else await this.rootEach(derived);
  }

  /** One root per derivation: no worker needed (the fallback, and for what a worker that died made). */
  private async rootEach(derived: readonly Derived[]): Promise<void> {
    for (const d of derived) await this.roots.add(d.drvPath);
  }

  private async handle(
    slot: WorkerSlot,
    path: string[],
    item: AttrReply,
    meta: MetaReply | 'ask' | undefined,
    derived: Derived[],
    failure?: ReplReply,
  ): Promise<void> {
    if (this.stopped) return;
    const attr = path.length > 0 ? path.join('.') : this.o.attrPath.join('.') || 'default';
    if ('failed' in item) {
      const alone = failure ?? (await this.ask(slot, singleRequest, path)).reply;
      if (alone.ok) {
        const again = parseJson(alone.value) as AttrReply | undefined;
        if (again !== undefined && !('failed' in again)) return this.handle(slot, path, again, 'ask', derived);
      }
      this.emit({ attr, error: (alone.ok ? '' : alone.error) || 'evaluation failed without a message' });
      return;
    }
    if ('ignore' in item) return;
    if ('recurse' in item) {
      if (!Array.isArray(item.recurse)) return;
      this.queue.push(item.recurse.filter((n) => typeof n === 'string').map((n) => [...path, n]));
      this.wakeAll();
      return;
    }
    const invalid = derivationProblem(item);
    if (invalid !== undefined) {
      this.emit({ attr, error: `not a derivation eka-ci can build: ${invalid}` });
      return;
    }
    const drv = item as { drvPath: string; system: string; outputs: Record<string, string> };
    derived.push({ path, drvPath: drv.drvPath });
    const result: EvalResult = { attr, drvPath: drv.drvPath, system: drv.system, outputs: drv.outputs };
    const m = await this.metaOf(slot, path, meta === 'ask' || meta === undefined ? undefined : meta);
    result.meta = m.meta;
    if (Object.keys(m.errors).length > 0) result.metaErrors = m.errors;
    if (m.unsupported || (this.o.systems !== undefined && !this.o.systems.includes(drv.system))) {
      result.skipped = 'unsupported-platform';
    }
    this.emit(result);
  }

  /** The meta of a derivation: from its answer, with each failed field (or every field, without one) asked alone. */
  private async metaOf(
    slot: WorkerSlot,
    path: string[],
    reply: MetaReply | undefined,
  ): Promise<{ meta: EvalMeta; errors: Record<string, string>; unsupported: boolean }> {
    const values: Partial<Record<keyof MetaReply, unknown>> = {};
    const errors: Record<string, string> = {};
    for (const field of META_FIELDS) {
      const v = reply?.[field];
      if (reply !== undefined && !isFailed(v)) {
        values[field] = v;
        continue;
      }
      // `unsupported` is computed from `platforms`, and its failure is told as theirs.
      const key = field === 'unsupported' ? 'platforms' : field;
      // A field made from one that failed (`githubMaintainers` of `maintainers`, `unsupported` of `platforms`) is not
      // asked again: it fails with that one (save in contrived cases), and a request per field costs 0.7 ms.
      const from = DERIVED_META_FIELDS[field];
      if (from !== undefined && errors[from] !== undefined) {
        errors[key] ??= errors[from];
        continue;
      }
      const { reply: alone } = await this.ask(slot, (n) => metaFieldRequest(n, field), path);
      if (alone.ok) values[field] = parseJson(alone.value);
      else errors[key] = alone.error || 'failed without a message';
    }
    const meta = cleanMeta(values);
    if (meta.platforms) meta.platforms = this.platformLists.intern(meta.platforms);
    return { meta, errors, unsupported: values.unsupported === true };
  }
}

/** Meta fields computed from another (see `setupLines`): when that one failed, they fail with it. */
const DERIVED_META_FIELDS: Partial<Record<keyof MetaReply, keyof MetaReply>> = {
  githubMaintainers: 'maintainers',
  unsupported: 'platforms',
};

// Distinct lists `Interned` keeps at most: past it, lists are no longer shared (a package set with that many
// distinct platform lists is not sharing them anyway).
const MAX_INTERNED_LISTS = 10_000;

/** Equal lists of strings as one array (see `EvaluationRun.platformLists`). */
class Interned {
  private readonly lists = new Map<string, readonly string[]>();

  intern(list: string[]): string[] {
    const key = JSON.stringify(list);
    const known = this.lists.get(key);
    if (known !== undefined) return known as string[];
    if (this.lists.size < MAX_INTERNED_LISTS) this.lists.set(key, list);
    return list;
  }
}

/** An attribute that answered with a derivation: rooted with the rest of its chunk (see `root`). */
interface Derived {
  path: string[];
  drvPath: string;
}

function isFailed(v: unknown): boolean {
  return typeof v === 'object' && v !== null && (v as { __ekaciFailed?: unknown }).__ekaciFailed === true;
}

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text) as unknown;
  } catch {
    return undefined;
  }
}

function parseTrace(text: string): ResultTrace | undefined {
  const v = parseJson(text);
  if (typeof v !== 'object' || v === null || !Array.isArray((v as { p?: unknown }).p)) return undefined;
  return v as ResultTrace;
}

/** The meta fields eka-ci keeps, typed, from what the worker answered (anything of the wrong shape is dropped). */
function cleanMeta(v: Partial<Record<keyof MetaReply, unknown>>): EvalMeta {
  const meta: EvalMeta = {};
  const strings = (x: unknown): string[] | undefined =>
    Array.isArray(x) ? x.filter((s): s is string => typeof s === 'string') : undefined;
  if (typeof v.pname === 'string') meta.pname = v.pname;
  if (typeof v.version === 'string') meta.version = v.version;
  if (typeof v.license === 'string') meta.license = v.license;
  else if (Array.isArray(v.license)) meta.license = strings(v.license)!;
  const maintainers = strings(v.maintainers);
  if (maintainers) meta.maintainers = maintainers;
  const handles = strings(v.githubMaintainers);
  if (handles && handles.length > 0) meta.githubMaintainers = [...new Set(handles)];
  const platforms = strings(v.platforms);
  if (platforms) meta.platforms = platforms;
  if (typeof v.broken === 'boolean') meta.broken = v.broken;
  return meta;
}

let workerStarted: ((w: EvalWorker) => void) | undefined;

/** Test hook: called with every repl worker the built-in evaluator starts (to kill one mid-run). */
export function onWorkerStartedForTests(f: ((w: EvalWorker) => void) | undefined): void {
  workerStarted = f;
}
