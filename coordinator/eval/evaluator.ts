import { EvaluationError } from '../../common/errors.js';
import { AsyncChannel } from './async-channel.js';
import {
  type AttrReply,
  LIST_REQUEST,
  RESULT_TRACE,
  chunkRequest,
  setupLines,
  singleRequest,
} from './eval-expression.js';
import {
  type CompiledEvaluatorOptions,
  type EvalResult,
  type EvaluatorOptions,
  compileOptions,
} from './eval-result.js';
import { EvalWorker, type ReplReply } from './eval-worker.js';
import { GcRoots } from './gc-roots.js';
import { evaluateWithNixEvalJobs, hasNixEvalJobs } from './nix-eval-jobs.js';

export { DEFAULT_MAX_MEMORY_MIB, DEFAULT_WORKERS } from './eval-result.js';
export type { EvalMeta, EvalResult, EvaluatorOptions } from './eval-result.js';

// Attributes per request: large enough that the pipe round trip (≈1 ms) is noise next to evaluation, small
// enough that work spreads over the workers.
const MAX_CHUNK_SIZE = 64;

// An attribute that evaluates for longer than this is stuck (an infinite loop); its worker is killed.
const REQUEST_TIMEOUT_MS = 10 * 60_000;

// A worker that dies mid-request (killed, out of memory) is replaced and the request retried this many times
// before the attribute is blamed: a genuine evaluator crash recurs, an outside kill does not.
const CRASH_RETRIES = 1;

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
  constructor(
    private worker: EvalWorker | undefined,
    private readonly setup: readonly string[],
    private readonly maxMemoryMiB: number,
    readonly onStart: (w: EvalWorker) => void,
  ) {}

  async ask(line: string): Promise<ReplReply> {
    for (let attempt = 0; ; attempt++) {
      if (!this.worker?.alive) {
        this.worker = await EvalWorker.start(this.setup);
        this.onStart(this.worker);
      }
      const w = this.worker;
      const reply = await w.request(line, REQUEST_TIMEOUT_MS);
      if (!w.alive && attempt < CRASH_RETRIES) continue;
      if (w.alive && w.rssMiB() > this.maxMemoryMiB) w.kill();
      return reply;
    }
  }

  kill(): void {
    this.worker?.kill();
  }
}

class EvaluationRun {
  private readonly queue: string[][] = [];
  private busy = 0;
  private stopped = false;
  private waiters: (() => void)[] = [];
  private readonly slots: WorkerSlot[] = [];
  private readonly roots: GcRoots;
  private readonly rootWrites: Promise<void>[] = [];
  private rootError: Error | undefined;
  private readonly setup: string[];

  constructor(
    private readonly o: CompiledEvaluatorOptions,
    private readonly emit: (r: EvalResult) => void,
  ) {
    this.roots = new GcRoots(o.gcRootsDir);
    this.setup = setupLines(o.file, o.attrPath);
  }

  async start(): Promise<void> {
    const first = this.slot(undefined);
    const listing = await first.ask(LIST_REQUEST);
    if (!listing.ok) {
      this.stop();
      const where = this.o.attrPath.length > 0 ? ` (attribute path ${this.o.attrPath.join('.')})` : '';
      throw new EvaluationError(`${this.o.file}${where}: ${listing.error}`);
    }
    const names = JSON.parse(listing.value) as string[] | null;
    this.queue.push(...(names === null ? [[]] : names.map((n) => [n])));
    const loops = [this.loop(first)];
    for (let i = 1; i < this.o.workers; i++) loops.push(this.loop(this.slot(undefined)));
    try {
      await Promise.all(loops);
      await Promise.all(this.rootWrites);
      if (this.rootError) throw this.rootError;
    } finally {
      this.stop();
    }
  }

  stop(): void {
    this.stopped = true;
    for (const s of this.slots) s.kill();
    this.wakeAll();
  }

  private slot(worker: EvalWorker | undefined): WorkerSlot {
    const s = new WorkerSlot(worker, this.setup, this.o.maxMemoryMiB, (w) => workerStarted?.(w));
    this.slots.push(s);
    return s;
  }

  private async loop(slot: WorkerSlot): Promise<void> {
    while (!this.stopped) {
      if (this.queue.length === 0) {
        if (this.busy === 0) break;
        await new Promise<void>((resolve) => this.waiters.push(resolve));
        continue;
      }
      // Share out what is queued so no worker idles while another holds a full chunk.
      const size = Math.min(MAX_CHUNK_SIZE, Math.ceil(this.queue.length / this.o.workers));
      const chunk = this.queue.splice(0, size);
      this.busy++;
      try {
        await this.evalPaths(slot, chunk);
      } finally {
        this.busy--;
        this.wakeAll();
      }
    }
    this.wakeAll();
  }

  private wakeAll(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  private async evalPaths(slot: WorkerSlot, paths: string[][]): Promise<void> {
    if (this.stopped || paths.length === 0) return;
    const reply = await slot.ask(chunkRequest(paths));
    const items = reply.traces
      .filter((t) => t.startsWith(RESULT_TRACE))
      .map((t) => JSON.parse(t.slice(RESULT_TRACE.length)) as AttrReply);
    for (const [i, item] of items.slice(0, paths.length).entries()) await this.handle(slot, paths[i]!, item);
    if (reply.ok || items.length >= paths.length) return;
    // The path after the last result is the one that aborted; its message is this reply's error.
    await this.handle(slot, paths[items.length]!, { failed: true }, reply);
    await this.evalPaths(slot, paths.slice(items.length + 1));
  }

  private async handle(slot: WorkerSlot, path: string[], item: AttrReply, failure?: ReplReply): Promise<void> {
    if (this.stopped) return;
    const attr = path.length > 0 ? path.join('.') : this.o.attrPath.join('.') || 'default';
    if ('failed' in item) {
      const alone = failure ?? (await slot.ask(singleRequest(path)));
      if (alone.ok) return this.handle(slot, path, JSON.parse(alone.value) as AttrReply);
      this.emit({ attr, error: alone.error || 'evaluation failed without a message' });
      return;
    }
    if ('ignore' in item) return;
    if ('recurse' in item) {
      this.queue.push(...item.recurse.map((n) => [...path, n]));
      this.wakeAll();
      return;
    }
    // Roots are written while the worker goes on: waiting for each one idled the worker for most of a chunk. The
    // run does not finish before every root exists (see `start`).
    this.rootWrites.push(
      this.roots.add(item.drvPath).catch((e: Error) => {
        this.rootError ??= e;
      }),
    );
    const result: EvalResult = { attr, drvPath: item.drvPath, system: item.system, outputs: item.outputs };
    const m = item.meta;
    const meta: NonNullable<EvalResult['meta']> = {};
    if (m.pname !== null) meta.pname = m.pname;
    if (m.version !== null) meta.version = m.version;
    if (m.license !== null) {
      meta.license = Array.isArray(m.license) ? m.license.filter((l) => l !== null) : m.license;
    }
    if (m.maintainers !== null) meta.maintainers = m.maintainers.filter((x) => x !== null);
    if (m.platforms !== null) meta.platforms = m.platforms;
    if (m.broken !== null) meta.broken = m.broken;
    result.meta = meta;
    if (item.unsupported || (this.o.systems !== undefined && !this.o.systems.includes(item.system))) {
      result.skipped = 'unsupported-platform';
    }
    this.emit(result);
  }
}

let workerStarted: ((w: EvalWorker) => void) | undefined;

/** Test hook: called with every repl worker the built-in evaluator starts (to kill one mid-run). */
export function onWorkerStartedForTests(f: ((w: EvalWorker) => void) | undefined): void {
  workerStarted = f;
}
