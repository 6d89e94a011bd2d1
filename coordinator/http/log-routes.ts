import { createReadStream, statSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import type { RouterContext } from '@koa/router';
import type { LogStore } from '../logs/log-store.js';
import { type AttemptRow, type BuildStore, OPEN_ATTEMPT_STATES } from '../scheduler/build-store.js';

/** What the log routes read: the attempts (their state and log file) and the logs themselves. */
export interface LogSources {
  store: BuildStore;
  logs: LogStore;
}

// Bytes read from the file per event of a live log: large enough for throughput, small enough to interleave
// followers, and below V8's largest regular heap object (128 KiB): a longer string (the text, its JSON, the event)
// is allocated in large-object space, page by page, which makes an event several times slower to build.
const FOLLOW_CHUNK_BYTES = 64 * 1024;
// A comment this often keeps proxies and load balancers from closing an idle follower's connection.
const KEEPALIVE_MS = 15_000;

/**
 * Answers a log as `text/plain`, honouring one `Range: bytes=…` (206 with `Content-Range`; 416 past the end): a
 * long log's tail is read without its head. Several ranges, or a range that does not parse, get the whole log.
 */
export function serveLog(ctx: RouterContext, logPath: string): void {
  const size = fileSize(logPath);
  ctx.set('Accept-Ranges', 'bytes');
  ctx.type = 'text/plain; charset=utf-8';
  const range = parseRange(ctx.get('Range'), size);
  if (range === 'unsatisfiable') {
    ctx.status = 416;
    ctx.set('Content-Range', `bytes */${size}`);
    ctx.body = { error: { code: 'EKACI_ERR_RANGE', message: `the log has ${size} bytes` } };
    return;
  }
  if (size === 0) {
    ctx.body = '';
    return;
  }
  const [start, end] = range ?? [0, size - 1];
  if (range) {
    ctx.status = 206;
    ctx.set('Content-Range', `bytes ${start}-${end}/${size}`);
  }
  ctx.length = end - start + 1;
  ctx.body = createReadStream(logPath, { start, end });
}

/** `[first, last]` byte of a single `bytes=` range, clamped to `size`; undefined for none or one that is ignored. */
export function parseRange(header: string, size: number): [number, number] | 'unsatisfiable' | undefined {
  const m = /^bytes=(\d*)-(\d*)$/.exec(header.trim());
  if (!m || (m[1] === '' && m[2] === '')) return undefined;
  if (m[1] === '') {
    const suffix = Number(m[2]);
    if (suffix === 0) return 'unsatisfiable';
    return size === 0 ? 'unsatisfiable' : [Math.max(0, size - suffix), size - 1];
  }
  const start = Number(m[1]);
  const end = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
  if (start >= size) return 'unsatisfiable';
  if (end < start) return undefined;
  return [start, end];
}

/**
 * Follows an attempt's log as Server-Sent Events: from byte `Last-Event-ID` (0 without one), every byte stored so
 * far, then each chunk as the agent's log arrives, until the attempt has ended and every byte is sent; then one
 * `end` event with the attempt's and the derivation's state. A `log` event's data is a JSON string of the text (the
 * bytes read as UTF-8), so carriage returns and blank lines arrive exactly; its id is the log's length after it,
 * what a reconnecting client sends back as `Last-Event-ID`.
 */
export function followLog(ctx: RouterContext, sources: LogSources, attempt: AttemptRow): void {
  const { logs, store } = sources;
  followLogFile(ctx, logs, attempt.log_path, () => {
    const row = store.attempt(attempt.lease_id);
    if (row !== undefined && OPEN_ATTEMPT_STATES.has(row.state)) return undefined;
    return {
      attempt: attempt.attempt,
      attemptState: row?.state ?? null,
      state: store.derivation(attempt.drv_path)?.state ?? null,
      error: row?.error ?? null,
      truncated: row?.log_truncated === 1,
    };
  });
}

/**
 * Follows one log file as Server-Sent Events (see followLog). `ended` answers what the `end` event says (its `bytes`
 * is added) once whatever writes the log has finished, and undefined while it runs; it is asked only after the log
 * file was closed.
 */
export function followLogFile(
  ctx: RouterContext,
  logs: LogStore,
  path: string,
  ended: () => Record<string, unknown> | undefined,
): void {
  const resumeAt = Number(ctx.get('Last-Event-ID') || '0');
  let offset = Number.isSafeInteger(resumeAt) && resumeAt >= 0 ? resumeAt : 0;
  const out = eventStream(ctx);

  let pumping = false;
  let again = false;
  let done = false;
  const share = shared.get(path) ?? { followers: 0, frames: new Map() };
  share.followers++;
  shared.set(path, share);
  const stop = (): void => {
    if (done) return;
    done = true;
    if (--share.followers === 0 && shared.get(path) === share) shared.delete(path);
    unwatch();
    out.end();
  };
  /** Sends what the file has past `offset`; one pump at a time, waiting for a slow client (back-pressure). */
  const pump = async (): Promise<void> => {
    if (pumping) {
      again = true;
      return;
    }
    pumping = true;
    try {
      do {
        again = false;
        for (;;) {
          if (done) return;
          const frame = logFrame(logs, path, offset);
          if (frame === undefined) break;
          offset = frame.next;
          if (!out.write(frame.bytes)) {
            await new Promise<void>((resolve) => out.once('drain', resolve));
          }
        }
      } while (again);
      const end = done || logs.isOpen(path) ? undefined : ended();
      if (end) {
        out.write(`id: ${offset}\nevent: end\ndata: ${JSON.stringify({ ...end, bytes: offset })}\n\n`);
        stop();
      }
    } finally {
      pumping = false;
    }
  };
  const onError = (err: unknown): void => {
    if (done) return;
    out.write(`event: error\ndata: ${JSON.stringify({ message: String(err) })}\n\n`);
    stop();
  };
  // Closing a log happens inside the transaction that records the attempt's end: look once that has committed.
  // Appends arrive inside the agent's message handler: pump on the next turn, which also takes every chunk that
  // arrived meanwhile in one event.
  let scheduled = false;
  const schedule = (): void => {
    if (scheduled) return;
    scheduled = true;
    setImmediate(() => {
      scheduled = false;
      void pump().catch(onError);
    });
  };
  const unwatch = logs.watch(path, schedule);
  ctx.req.on('close', stop);
  void pump().catch(onError);
}

/**
 * Answers with a Server-Sent Events stream: what the handler writes to the returned stream goes out at once. The
 * stream tells the client how soon to reconnect, and keeps an idle connection alive until it ends or the client goes.
 */
export function eventStream(ctx: RouterContext): PassThrough {
  const out = new PassThrough();
  ctx.status = 200;
  ctx.type = 'text/event-stream';
  ctx.set('Cache-Control', 'no-cache');
  // Proxies (nginx) would otherwise hold events back until a buffer fills.
  ctx.set('X-Accel-Buffering', 'no');
  ctx.req.socket.setNoDelay(true);
  ctx.body = out;
  const keepAlive = setInterval(() => out.write(': keep-alive\n\n'), KEEPALIVE_MS);
  keepAlive.unref();
  const quiet = (): void => clearInterval(keepAlive);
  out.once('finish', quiet);
  ctx.req.once('close', quiet);
  out.write('retry: 2000\n\n');
  return out;
}

/**
 * Recent `log` events of each followed log, each encoded once: followers at the same offset (the usual case, all of
 * them woken by the same chunk) share it instead of each reading, decoding, escaping and encoding the same bytes.
 */
const shared = new Map<string, { followers: number; frames: Map<number, { next: number; bytes: Buffer }> }>();
// Events kept per followed log, by the offset they start at: followers that drift apart (one waited for its socket)
// still find theirs. At most this many × FOLLOW_CHUNK_BYTES (with JSON's escapes) per log that is followed.
const FRAMES_KEPT = 16;

/**
 * The `log` event for the bytes of a log from `offset` (up to the next multiple of FOLLOW_CHUNK_BYTES, cut before an
 * incomplete UTF-8 character so that every event decodes alone); undefined when there are none yet.
 */
function logFrame(logs: LogStore, path: string, offset: number): { next: number; bytes: Buffer } | undefined {
  const entry = shared.get(path);
  const cached = entry?.frames.get(offset);
  if (cached) return cached;
  // Events end at multiples of FOLLOW_CHUNK_BYTES (or where the log ends for now): followers that came apart at
  // the log's growing end meet again at the next multiple and share the events from there.
  const chunk = logs.readRange(path, offset, FOLLOW_CHUNK_BYTES - (offset % FOLLOW_CHUNK_BYTES));
  // A log that has ended is sent to its last byte, an incomplete character included (as U+FFFD).
  const end = logs.isOpen(path) ? completeUtf8(chunk) : chunk.length;
  if (end === 0) return undefined;
  const next = offset + end;
  const text = chunk.toString('utf8', 0, end);
  const frame = { next, bytes: Buffer.from(`id: ${next}\nevent: log\ndata: ${JSON.stringify(text)}\n\n`) };
  if (entry) {
    entry.frames.set(offset, frame);
    if (entry.frames.size > FRAMES_KEPT) entry.frames.delete(entry.frames.keys().next().value!);
  }
  return frame;
}

/** Length of the longest prefix of `b` that ends on a UTF-8 character boundary (all of it when under 4 bytes). */
function completeUtf8(b: Buffer): number {
  let i = b.length;
  // Walk back over at most three continuation bytes to the lead byte of the last character.
  for (let back = 0; back < 3 && i > 0 && (b[i - 1]! & 0xc0) === 0x80; back++) i--;
  if (i === 0) return b.length;
  const lead = b[i - 1]!;
  const need = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
  return b.length - (i - 1) >= need ? b.length : i - 1;
}

function fileSize(path: string): number {
  try {
    return statSync(path).size;
  } catch {
    return 0;
  }
}
