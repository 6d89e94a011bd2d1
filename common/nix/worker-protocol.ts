/**
 * The Nix worker protocol as Nix 2.8 (protocol 1.34) speaks it on `nix-daemon --stdio`, and the NAR framing that
 * `wopNarFromPath` needs. Checked byte by byte against a real 2.8 daemon; only what eka-ci sends and reads is here.
 *
 * Wire format: every integer is a u64, little-endian. A string or byte array is its length (u64), its bytes, and
 * zero padding up to a multiple of 8. A set or list is a count followed by its elements.
 *
 * Handshake: client sends WORKER_MAGIC_1; daemon answers WORKER_MAGIC_2 and its version (major << 8 | minor);
 * client sends the version it speaks, 0 (no CPU affinity) and 0 (obsolete reserveSpace); from 1.33 on the daemon
 * then sends its Nix version as a string; then a stderr stream (below) ending in STDERR_LAST.
 *
 * Every operation: client sends the op code and its arguments; the daemon answers with a stderr stream — log
 * messages and activities — ending either in STDERR_LAST, after which the op's reply follows, or in STDERR_ERROR,
 * after which nothing follows and the connection stays usable for the next op.
 *
 * This file is over 300 lines because the NAR framing belongs with the wire: the daemon sends the NAR after
 * STDERR_LAST with no length, so only parsing it tells where the next reply starts.
 */
import { isUtf8 } from 'node:buffer';
import { NixCommandError } from '../errors.js';

export const WORKER_MAGIC_1 = 0x6e697863;
export const WORKER_MAGIC_2 = 0x6478696f;

/** The version this client speaks: Nix 2.8's. A newer daemon talks down to it; 1.35 would add a trust field. */
export const CLIENT_PROTOCOL_VERSION = (1 << 8) | 34;
/** 1.30 is the first to parse `drv!out` derived paths in wopBuildPaths; it also implies structured errors (1.26). */
export const MIN_DAEMON_PROTOCOL_VERSION = (1 << 8) | 30;
/** From 1.33 on the daemon sends its Nix version after the handshake. */
export const PROTOCOL_WITH_NIX_VERSION = (1 << 8) | 33;

// A daemon's version arrives as a u64: `>>` and `&` would first cut it to 32 bits, so that 2^32 + 0x122 read as 1.34.
export const protocolMajor = (v: number): number => Math.floor(v / 256);
export const protocolMinor = (v: number): number => v % 256;
export const showProtocol = (v: number): string => `${protocolMajor(v)}.${protocolMinor(v)}`;

export const Op = {
  AddToStore: 7,
  BuildPaths: 9,
  BuildDerivation: 36,
  AddIndirectRoot: 12,
  SetOptions: 19,
  QueryPathInfo: 26,
  QueryValidPaths: 31,
  NarFromPath: 38,
} as const;

export const Stderr = {
  Next: 0x6f6c6d67,
  Read: 0x64617461,
  Write: 0x64617416,
  Last: 0x616c7473,
  Error: 0x63787470,
  StartActivity: 0x53545254,
  StopActivity: 0x53544f50,
  Result: 0x52534c54,
} as const;

/** ResultType of STDERR_RESULT: one line of a builder's output. */
export const RES_BUILD_LOG_LINE = 101;
/** Verbosity lvlError: wopSetOptions sends it for "verbose build" (anything else means quiet) and as the level. */
export const LVL_ERROR = 0;
/** Debug: where a daemon says it ignores a restricted setting of an untrusted user. */
export const LVL_DEBUG = 6;
// Nix verbosity levels: error 0, warn 1, notice 2, info 3, talkative 4, … Activities at info or above are what
// `nix-store --realise` prints by default.
export const LVL_INFO = 3;
/** BuildMode bmNormal for wopBuildPaths and wopBuildDerivation. */
export const BUILD_MODE_NORMAL = 0;
/** From 1.28 on a BuildResult ends with the built outputs (a map of DrvOutput to Realisation JSON). */
export const PROTOCOL_WITH_BUILT_OUTPUTS = (1 << 8) | 28;
/** From 1.29 on a BuildResult carries timesBuilt, isNonDeterministic, startTime and stopTime. */
export const PROTOCOL_WITH_BUILD_TIMES = (1 << 8) | 29;

/** BuildResult::Status values of Nix 2.8 that mean the outputs are valid. */
export const BUILD_RESULT_SUCCESSES: ReadonlySet<number> = new Set([
  0, // Built
  1, // Substituted
  2, // AlreadyValid
  13, // ResolvesToAlreadyValid
]);
/** BuildResult::Status TimedOut (max-silent-time or timeout). */
export const BUILD_RESULT_TIMED_OUT = 8;
/** Statuses that Nix's exit status counts as a failed build (100): the builder's doing, not the machine's. */
export const BUILD_RESULT_BUILD_FAILURES: ReadonlySet<number> = new Set([
  3, // PermanentFailure
  5, // OutputRejected
  11, // LogLimitExceeded
  12, // NotDeterministic
]);

// Tokens other than file contents are keywords, entry names (≤ 255 bytes) and symlink targets (≤ PATH_MAX); a
// longer one means we lost the framing, and refusing it beats buffering gigabytes of garbage.
const MAX_NAR_TOKEN_BYTES = 64 * 1024;
// Strings inside the stderr stream (log lines, error messages, paths) are small; same reasoning.
const MAX_STRING_BYTES = 64 * 1024 * 1024;
// NAR bytes are handed on in chunks of about this size: large enough that per-chunk overhead vanishes, small enough
// that a big file never sits in memory whole.
const NAR_CHUNK_BYTES = 256 * 1024;
// The reader stops pulling from the daemon's stdout while this much is buffered unread (a slow NAR consumer) and
// resumes below the low mark; the daemon then blocks on its pipe instead of us growing without bound.
const READ_HIGH_WATER_BYTES = 4 * 1024 * 1024;
const READ_LOW_WATER_BYTES = 1024 * 1024;

const padding = (n: number): number => (8 - (n % 8)) % 8;
// STDERR_RESULT of a log line up to its text: code, activity id, type, field count, field type, length.
const LOG_LINE_HEADER_BYTES = 48;
const NEWLINE = 0x0a;
/** A batch of log lines (takeLogLines) stops at the first line that reaches this many bytes. */
export const LOG_BATCH_BYTES = 64 * 1024;
// A rest of the first buffered chunk this small that holds no whole log line is joined with the next chunk.
const JOIN_BELOW_BYTES = 4096;

/**
 * The length of the line when `b` holds, from `at`, a whole STDERR_RESULT of one build log line (code, activity id
 * 0, type resBuildLogLine, one field, a string); -1 otherwise.
 */
function logLineFrame(b: Buffer, at: number): number {
  if (b.length - at < LOG_LINE_HEADER_BYTES) return -1;
  // u64 little-endian fields: code, activity id, result type, field count, field type, string length.
  if (b.readUInt32LE(at) !== Stderr.Result || b.readUInt32LE(at + 4) !== 0) return -1;
  if (b.readUInt32LE(at + 16) !== RES_BUILD_LOG_LINE || b.readUInt32LE(at + 20) !== 0) return -1;
  if (
    b.readUInt32LE(at + 24) !== 1 ||
    b.readUInt32LE(at + 28) !== 0 ||
    b.readUInt32LE(at + 32) !== 1 ||
    b.readUInt32LE(at + 36) !== 0
  ) {
    return -1;
  }
  const length = b.readUInt32LE(at + 40);
  if (b.readUInt32LE(at + 44) !== 0) return -1;
  return b.length - at < LOG_LINE_HEADER_BYTES + length + padding(length) ? -1 : length;
}

function protocolViolation(what: string): NixCommandError {
  return new NixCommandError(`nix-daemon broke the worker protocol: ${what}`, null, '');
}

/** Builds one request; `bytes()` concatenates it for a single write. */
export class WireWriter {
  private readonly parts: Buffer[] = [];

  u64(n: number | boolean): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(typeof n === 'boolean' ? Number(n) : n));
    this.parts.push(b);
    return this;
  }

  string(s: string): this {
    const data = Buffer.from(s, 'utf8');
    this.u64(data.length).parts.push(data, Buffer.alloc(padding(data.length)));
    return this;
  }

  strings(list: Iterable<string>): this {
    const all = [...list];
    this.u64(all.length);
    for (const s of all) this.string(s);
    return this;
  }

  bytes(): Buffer {
    return Buffer.concat(this.parts);
  }
}

/**
 * Reads the daemon's stdout as the protocol's units. Fed with `push`; every read waits until enough bytes have
 * arrived or `fail` is called (the daemon died), after which every read rejects with that error.
 */
export class WireReader {
  private chunks: Buffer[] = [];
  private available = 0;
  private waiter: { need: number; resolve: () => void; reject: (e: Error) => void } | undefined;
  private failure: Error | undefined;
  private paused = false;

  constructor(private readonly flow: { pause(): void; resume(): void }) {}

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.available += chunk.length;
    if (this.available > READ_HIGH_WATER_BYTES && !this.paused) {
      this.paused = true;
      this.flow.pause();
    }
    if (this.waiter && this.available >= this.waiter.need) {
      const { resolve } = this.waiter;
      this.waiter = undefined;
      resolve();
    }
  }

  fail(error: Error): void {
    if (this.failure) return;
    this.failure = error;
    const waiter = this.waiter;
    this.waiter = undefined;
    waiter?.reject(error);
  }

  async u64(): Promise<number> {
    const n = (await this.exactly(8)).readBigUInt64LE();
    if (n > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolViolation(`integer ${n} is out of range`);
    return Number(n);
  }

  async skip(n: number): Promise<void> {
    await this.exactly(n);
  }

  async stringBytes(max = MAX_STRING_BYTES): Promise<Buffer> {
    const length = await this.u64();
    if (length > max) throw protocolViolation(`a string of ${length} bytes (limit ${max})`);
    const padded = await this.exactly(length + padding(length));
    return padded.subarray(0, length);
  }

  async string(): Promise<string> {
    return (await this.stringBytes()).toString('utf8');
  }

  async strings(): Promise<string[]> {
    const count = await this.u64();
    const result: string[] = [];
    for (let i = 0; i < count; i++) result.push(await this.string());
    return result;
  }

  /**
   * A whole STDERR_RESULT carrying one build log line, when the first buffered chunk holds one: taken without
   * awaiting, which is what a builder printing hundreds of thousands of lines costs (a promise per field otherwise).
   * Undefined, having taken nothing, for anything else.
   */
  takeLogLine(): string | undefined {
    const b = this.chunks[0];
    if (b === undefined) return undefined;
    const length = logLineFrame(b, 0);
    if (length < 0) return undefined;
    const line = b.toString('utf8', LOG_LINE_HEADER_BYTES, LOG_LINE_HEADER_BYTES + length);
    this.take(LOG_LINE_HEADER_BYTES + length + padding(length));
    return line;
  }

  /**
   * Every whole build-log-line STDERR_RESULT at the head of the buffer, as one buffer of their lines, each ending in
   * `\n`, up to the line that reaches LOG_BATCH_BYTES: a builder's output in one piece per read from the daemon, not
   * in a call per line. Invalid UTF-8 is replaced, as a string of the line would have it. Undefined, having taken
   * nothing, when no such frame is whole at the head.
   */
  takeLogLines(): Buffer | undefined {
    let b = this.chunks[0];
    if (b === undefined) return undefined;
    // A frame cut by the boundary of what one read from the daemon returned: join the small rest with the next read.
    const second = this.chunks[1];
    if (second !== undefined && b.length < JOIN_BELOW_BYTES && logLineFrame(b, 0) < 0) {
      b = Buffer.concat([b, second]);
      this.chunks.splice(0, 2, b);
    }
    const starts: number[] = [];
    const lengths: number[] = [];
    let at = 0;
    let bytes = 0;
    while (bytes < LOG_BATCH_BYTES) {
      const length = logLineFrame(b, at);
      if (length < 0) break;
      starts.push(at + LOG_LINE_HEADER_BYTES);
      lengths.push(length);
      bytes += length + 1;
      at += LOG_LINE_HEADER_BYTES + length + padding(length);
    }
    if (at === 0) return undefined;
    const lines = Buffer.allocUnsafe(bytes);
    let to = 0;
    for (let i = 0; i < starts.length; i++) {
      const from = starts[i] as number;
      to += b.copy(lines, to, from, from + (lengths[i] as number));
      lines[to++] = NEWLINE;
    }
    this.take(at);
    return isUtf8(lines) ? lines : Buffer.from(lines.toString('utf8'));
  }

  /** Exactly `n` bytes. */
  async exactly(n: number): Promise<Buffer> {
    await this.wait(n);
    return this.take(n);
  }

  /** Between 1 and `max` bytes: whatever is buffered, without waiting for more than one byte. */
  async some(max: number): Promise<Buffer> {
    await this.wait(1);
    return this.take(Math.min(max, this.chunks[0]?.length ?? 0));
  }

  private async wait(n: number): Promise<void> {
    if (this.available >= n) return;
    if (this.failure) throw this.failure;
    if (this.waiter) throw new Error('WireReader: two reads at once');
    await new Promise<void>((resolve, reject) => {
      this.waiter = { need: n, resolve, reject };
    });
  }

  private take(n: number): Buffer {
    let result: Buffer;
    const first = this.chunks[0];
    if (first !== undefined && first.length >= n) {
      result = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      result = Buffer.allocUnsafe(n);
      let filled = 0;
      while (filled < n) {
        const chunk = this.chunks[0];
        if (chunk === undefined) throw new Error('WireReader: took more than was available');
        const used = Math.min(chunk.length, n - filled);
        chunk.copy(result, filled, 0, used);
        filled += used;
        if (used === chunk.length) this.chunks.shift();
        else this.chunks[0] = chunk.subarray(used);
      }
    }
    this.available -= n;
    if (this.paused && this.available < READ_LOW_WATER_BYTES) {
      this.paused = false;
      this.flow.resume();
    }
    return result;
  }
}

/** What STDERR_ERROR carries from protocol 1.26 on. There is no exit status in it (the pre-1.26 form had one). */
export interface DaemonErrorInfo {
  level: number;
  /** The message with Nix's terminal colours removed. */
  message: string;
  traces: string[];
}

/**
 * What readStderr does with the messages of an operation. A handler that returns a promise holds the reader until it
 * settles (any other return value is ignored): nothing more is read from the stream meanwhile, so a slow consumer of
 * a build's log pauses the daemon (and through it the builder) instead of buffering what the build prints.
 */
export interface StderrHandlers {
  /** STDERR_NEXT: a message Nix would have printed on stderr (warnings, errors of other failed builds). */
  onMessage?: (text: string) => unknown;
  /** STDERR_RESULT of type resBuildLogLine: one line of a builder's output, without its newline. */
  onBuildLogLine?: (line: string) => unknown;
  /**
   * The same lines as bytes, each ending in `\n`, as many in one call as arrived together; when given, it is called
   * instead of `onBuildLogLine`. What a consumer of long logs uses.
   */
  onBuildLog?: (lines: Buffer) => unknown;
  /** STDERR_START_ACTIVITY at info level or above: "building '…'", "copying path '…' from '…'". */
  onActivity?: (text: string) => unknown;
}

const ANSI_ESCAPE = /\u001b\[[0-9;]*[A-Za-z]/g;

export const stripAnsi = (text: string): string => text.replace(ANSI_ESCAPE, '');

/**
 * Reads the stderr stream of one operation up to its end. Resolves with undefined at STDERR_LAST (the reply
 * follows) or with the daemon's error at STDERR_ERROR (no reply follows).
 */
export async function readStderr(
  reader: WireReader,
  handlers: StderrHandlers = {},
): Promise<DaemonErrorInfo | undefined> {
  for (;;) {
    if (handlers.onBuildLog) {
      const lines = reader.takeLogLines();
      if (lines !== undefined) {
        const hold = handlers.onBuildLog(lines);
        if (hold instanceof Promise) await hold;
        continue;
      }
    } else {
      const line = reader.takeLogLine();
      if (line !== undefined) {
        const hold = handlers.onBuildLogLine?.(line);
        if (hold instanceof Promise) await hold;
        continue;
      }
    }
    const code = await reader.u64();
    switch (code) {
      case Stderr.Last:
        return undefined;
      case Stderr.Error:
        return readError(reader);
      case Stderr.Next: {
        const text = stripAnsi(await reader.string()).replace(/\n$/, '');
        const hold = handlers.onMessage?.(text);
        if (hold instanceof Promise) await hold;
        break;
      }
      case Stderr.StartActivity: {
        await reader.skip(8); // id
        const level = await reader.u64();
        await reader.skip(8); // type
        const text = stripAnsi(await reader.string()); // e.g. "copying path '/nix/store/…' from '…'"
        await readFields(reader);
        await reader.skip(8); // parent id
        // What `nix-store --realise` would print at its default verbosity: copying and building lines.
        const hold = text !== '' && level <= LVL_INFO ? handlers.onActivity?.(text) : undefined;
        if (hold instanceof Promise) await hold;
        break;
      }
      case Stderr.StopActivity:
        await reader.skip(8);
        break;
      case Stderr.Result: {
        await reader.skip(8); // activity id
        const type = await reader.u64();
        const fields = await readFields(reader);
        const line = fields[0];
        let hold: unknown;
        if (type === RES_BUILD_LOG_LINE && typeof line === 'string') {
          hold = handlers.onBuildLog ? handlers.onBuildLog(Buffer.from(`${line}\n`)) : handlers.onBuildLogLine?.(line);
        }
        if (hold instanceof Promise) await hold;
        break;
      }
      case Stderr.Write:
        await reader.stringBytes(); // data for a sink; no op we send asks for one
        break;
      case Stderr.Read:
        throw protocolViolation('it asked for data (STDERR_READ) during an operation that sends none');
      default:
        throw protocolViolation(`unknown stderr message 0x${code.toString(16)}`);
    }
  }
}

async function readError(reader: WireReader): Promise<DaemonErrorInfo> {
  const type = await reader.string();
  if (type !== 'Error') throw protocolViolation(`error of type '${type}', expected 'Error'`);
  const level = await reader.u64();
  await reader.stringBytes(); // name: always "Error", unused by Nix itself
  const message = stripAnsi(await reader.string());
  if ((await reader.u64()) !== 0) throw protocolViolation('an error with a source position');
  const count = await reader.u64();
  const traces: string[] = [];
  for (let i = 0; i < count; i++) {
    if ((await reader.u64()) !== 0) throw protocolViolation('an error trace with a source position');
    traces.push(stripAnsi(await reader.string()));
  }
  return { level, message, traces };
}

async function readFields(reader: WireReader): Promise<(number | string)[]> {
  const count = await reader.u64();
  const fields: (number | string)[] = [];
  for (let i = 0; i < count; i++) {
    const type = await reader.u64();
    if (type === 0) fields.push(Number((await reader.exactly(8)).readBigUInt64LE()));
    else if (type === 1) fields.push(await reader.string());
    else throw protocolViolation(`activity field of unknown type ${type}`);
  }
  return fields;
}

/**
 * Nix's exit status for a failed build, rebuilt from its messages because protocol ≥ 1.26 does not send it.
 * Mirrors Nix's Worker::exitStatus: 100 | 1 timed out | 2 hash mismatch | 4 not deterministic; 1 when nothing
 * looks like a build failure (an invalid path, a failed substitution).
 */
export function exitStatusFromMessages(messages: readonly string[]): number {
  const text = messages.join('\n');
  let mask = 0;
  if (/timed out after \d+ seconds/.test(text)) mask |= 0x04 | 0x01;
  if (/hash mismatch in fixed-output derivation/.test(text)) mask |= 0x04 | 0x02;
  if (/may not be deterministic/.test(text)) mask |= 0x08;
  if (
    /^builder for '.*' (failed|was killed)|failed to build|^build of .* failed|failed to produce output/m.test(text)
  ) {
    mask |= 0x04;
  }
  // max-build-log-size: the build's own doing, as final as a failing builder (Nix itself exits 1 for it).
  if (/killed after writing more than \d+ bytes of log output/.test(text)) mask |= 0x04;
  return mask === 0 ? 1 : mask | 0x60;
}

/**
 * Re-emits, in chunks, exactly the bytes of the one NAR the reader is positioned at, and stops at its last byte.
 * Throws if the bytes are not a NAR.
 */
export async function* readNar(reader: WireReader): AsyncGenerator<Buffer> {
  const framer = new NarFramer(reader);
  yield* framer.run();
}

class NarFramer {
  private pending: Buffer[] = [];
  private pendingBytes = 0;

  constructor(private readonly reader: WireReader) {}

  async *run(): AsyncGenerator<Buffer> {
    await this.expect('nix-archive-1');
    yield* this.node();
    if (this.pendingBytes > 0) yield this.flush();
  }

  private async *node(): AsyncGenerator<Buffer> {
    await this.expect('(');
    await this.expect('type');
    const type = await this.token();
    if (type === 'regular') {
      let next = await this.token();
      if (next === 'executable') {
        await this.expect('');
        next = await this.token();
      }
      if (next !== 'contents') throw malformed(`expected 'contents', got '${next}'`);
      yield* this.contents();
      await this.expect(')');
    } else if (type === 'symlink') {
      await this.expect('target');
      await this.token();
      await this.expect(')');
    } else if (type === 'directory') {
      for (;;) {
        const next = await this.token();
        if (next === ')') break;
        if (next !== 'entry') throw malformed(`expected 'entry' or ')', got '${next}'`);
        await this.expect('(');
        await this.expect('name');
        await this.token();
        await this.expect('node');
        yield* this.node();
        await this.expect(')');
        if (this.pendingBytes >= NAR_CHUNK_BYTES) yield this.flush();
      }
    } else {
      throw malformed(`unknown node type '${type}'`);
    }
  }

  private async *contents(): AsyncGenerator<Buffer> {
    const header = await this.reader.exactly(8);
    this.keep(header);
    const size = header.readBigUInt64LE();
    // Beyond 2^53 the count would be rounded and the framing lost; no file is that large, so the stream is garbage.
    if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw malformed(`a file of ${size} bytes`);
    const length = Number(size);
    let remaining = length;
    while (remaining > 0) {
      const piece = await this.reader.some(Math.min(remaining, NAR_CHUNK_BYTES));
      this.keep(piece);
      remaining -= piece.length;
      if (this.pendingBytes >= NAR_CHUNK_BYTES) yield this.flush();
    }
    this.keep(await this.reader.exactly(padding(length)));
  }

  private async token(): Promise<string> {
    const header = await this.reader.exactly(8);
    const length = Number(header.readBigUInt64LE());
    if (length > MAX_NAR_TOKEN_BYTES) throw malformed(`a ${length}-byte token`);
    const body = await this.reader.exactly(length + padding(length));
    this.keep(header);
    this.keep(body);
    return body.toString('utf8', 0, length);
  }

  private async expect(word: string): Promise<void> {
    const got = await this.token();
    if (got !== word) throw malformed(`expected '${word}', got '${got.slice(0, 80)}'`);
  }

  private keep(bytes: Buffer): void {
    if (bytes.length === 0) return;
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
  }

  private flush(): Buffer {
    const out = this.pending.length === 1 ? (this.pending[0] as Buffer) : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    return out;
  }
}

function malformed(what: string): NixCommandError {
  return protocolViolation(`the NAR stream is malformed: ${what}`);
}
