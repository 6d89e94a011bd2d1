import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { mutateBytes, mutations, resolvesOrFailsWith } from '../../test/support/fuzz.js';
import { NixCommandError } from '../errors.js';
import {
  type DaemonErrorInfo,
  RES_BUILD_LOG_LINE,
  Stderr,
  WireReader,
  WireWriter,
  readNar,
  readStderr,
  stripAnsi,
} from './worker-protocol.js';

const RUNS = 150;
const noFlowControl = { pause: () => {}, resume: () => {} };
const VIOLATION = /^nix-daemon broke the worker protocol: /;

/** The daemon hung up: what a real connection's reader fails with once the bytes run out. */
const hungUp = (): NixCommandError => new NixCommandError('the daemon closed the connection', null, '');

/**
 * A reader fed `bytes` in pieces of `sizes` (cycled), one piece per macrotask as a pipe delivers them, then failed
 * as a closed connection fails it. `eof` is that failure, so a test can tell "ran out of bytes" from "refused".
 */
function feed(bytes: Buffer, sizes: readonly number[]): { reader: WireReader; eof: NixCommandError } {
  const reader = new WireReader(noFlowControl);
  const eof = hungUp();
  let offset = 0;
  let i = 0;
  const next = (): void => {
    if (offset >= bytes.length) return reader.fail(eof);
    const size = Math.max(1, sizes[i++ % sizes.length] ?? 1);
    reader.push(bytes.subarray(offset, offset + size));
    offset += size;
    setImmediate(next);
  };
  next();
  return { reader, eof };
}

const chunkSizes = fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 4 });
// Reads of a pipe's size: many whole frames in one, and frames cut at their ends.
const readSizes = fc.array(fc.integer({ min: 1, max: 8192 }), { minLength: 1, maxLength: 4 });
const text = fc.oneof(fc.string({ maxLength: 20 }), fc.constantFrom('\u001b[31mred\u001b[0m', 'line\n', ''));
const u64 = fc.oneof(fc.nat({ max: 1000 }), fc.maxSafeNat());
const u64Bytes = (n: bigint): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(n);
  return b;
};

describe('WireReader', () => {
  type Item = { u64: number } | { string: string } | { strings: string[] };
  const item: fc.Arbitrary<Item> = fc.oneof(
    fc.record({ u64 }),
    fc.record({ string: fc.string({ unit: 'grapheme', maxLength: 30 }) }),
    fc.record({ strings: fc.array(text, { maxLength: 4 }) }),
  );

  it('reads back every integer and string the writer wrote, however the bytes are split', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(item, { maxLength: 8 }), chunkSizes, async (items, sizes) => {
        const w = new WireWriter();
        for (const it of items) {
          if ('u64' in it) w.u64(it.u64);
          else if ('string' in it) w.string(it.string);
          else w.strings(it.strings);
        }
        const { reader } = feed(w.bytes(), sizes);
        for (const it of items) {
          if ('u64' in it) expect(await reader.u64()).toBe(it.u64);
          else if ('string' in it) expect(await reader.string()).toBe(it.string);
          else expect(await reader.strings()).toEqual(it.strings);
        }
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses an integer or a string length no daemon could send before waiting for its bytes', async () => {
    const absurd = fc.bigInt({ min: 2n ** 26n + 1n, max: 2n ** 64n - 1n });
    await fc.assert(
      fc.asyncProperty(absurd, fc.boolean(), async (n, asString) => {
        const { reader, eof } = feed(Buffer.concat([u64Bytes(n), Buffer.alloc(64)]), [72]);
        const err = await resolvesOrFailsWith<string | number>(NixCommandError, () =>
          asString ? reader.string() : reader.u64(),
        );
        if (!asString && n <= BigInt(Number.MAX_SAFE_INTEGER)) {
          expect(err).toBe(Number(n));
        } else {
          expect(err).not.toBe(eof);
          expect((err as Error).message).toMatch(VIOLATION);
        }
      }),
      {
        numRuns: RUNS,
        examples: [
          [2n ** 60n, true],
          [2n ** 64n - 1n, false],
          [2n ** 53n, false],
        ],
      },
    );
  });
});

describe('readStderr', () => {
  type Field = { int: number } | { str: string };
  type Message =
    | { kind: 'next'; text: string }
    | { kind: 'start'; id: number; level: number; type: number; text: string; fields: Field[]; parent: number }
    | { kind: 'stop'; id: number }
    | { kind: 'result'; id: number; type: number; fields: Field[] }
    | { kind: 'write'; data: string };
  type End = { kind: 'last' } | { kind: 'error'; level: number; name: string; message: string; traces: string[] };

  const field: fc.Arbitrary<Field> = fc.oneof(fc.record({ int: u64 }), fc.record({ str: text }));
  const fields = fc.array(field, { maxLength: 3 });
  const message: fc.Arbitrary<Message> = fc.oneof(
    fc.record({ kind: fc.constant('next' as const), text }),
    fc.record({
      kind: fc.constant('start' as const),
      id: u64,
      level: fc.nat(7),
      type: fc.nat(120),
      text,
      fields,
      parent: u64,
    }),
    fc.record({ kind: fc.constant('stop' as const), id: u64 }),
    fc.record({
      kind: fc.constant('result' as const),
      id: u64,
      type: fc.constantFrom(RES_BUILD_LOG_LINE, 0, 105),
      fields,
    }),
    fc.record({ kind: fc.constant('write' as const), data: text }),
  );
  // What a building daemon sends most: one line of the builder's output.
  const logLine: fc.Arbitrary<Message> = fc.record({
    kind: fc.constant('result' as const),
    id: u64,
    type: fc.constant(RES_BUILD_LOG_LINE),
    fields: text.map((str) => [{ str }]),
  });
  const end: fc.Arbitrary<End> = fc.oneof(
    fc.constant({ kind: 'last' as const }),
    fc.record({
      kind: fc.constant('error' as const),
      level: fc.nat(7),
      name: text,
      message: text,
      traces: fc.array(text, { maxLength: 3 }),
    }),
  );
  const stream = fc.tuple(fc.array(fc.oneof(message, logLine), { maxLength: 6 }), end);
  // A chatty build: mostly log lines, in runs, with now and then something else.
  const chatty = fc.tuple(
    fc.array(fc.oneof({ arbitrary: logLine, weight: 6 }, { arbitrary: message, weight: 1 }), { maxLength: 40 }),
    end,
  );

  function writeFields(w: WireWriter, fs: readonly Field[]): void {
    w.u64(fs.length);
    for (const f of fs) {
      if ('int' in f) w.u64(0).u64(f.int);
      else w.u64(1).string(f.str);
    }
  }

  /** The stream a Nix 2.8 daemon sends: the messages, then STDERR_LAST or a structured STDERR_ERROR. */
  function serialize(messages: readonly Message[], e: End): Buffer {
    const w = new WireWriter();
    for (const m of messages) {
      switch (m.kind) {
        case 'next':
          w.u64(Stderr.Next).string(m.text);
          break;
        case 'start':
          w.u64(Stderr.StartActivity).u64(m.id).u64(m.level).u64(m.type).string(m.text);
          writeFields(w, m.fields);
          w.u64(m.parent);
          break;
        case 'stop':
          w.u64(Stderr.StopActivity).u64(m.id);
          break;
        case 'result':
          w.u64(Stderr.Result).u64(m.id).u64(m.type);
          writeFields(w, m.fields);
          break;
        case 'write':
          w.u64(Stderr.Write).string(m.data);
          break;
      }
    }
    if (e.kind === 'last') w.u64(Stderr.Last);
    else {
      w.u64(Stderr.Error).string('Error').u64(e.level).string(e.name).string(e.message).u64(0);
      w.u64(e.traces.length);
      for (const t of e.traces) w.u64(0).string(t);
    }
    return w.bytes();
  }

  /** What the handlers should hear, in order, as `kind:text`. */
  function expectedEvents(messages: readonly Message[]): string[] {
    return messages.flatMap((m) => {
      if (m.kind === 'next') return [`message:${stripAnsi(m.text).replace(/\n$/, '')}`];
      if (m.kind === 'start' && m.text !== '' && m.level <= 3) return [`activity:${stripAnsi(m.text)}`];
      const first = m.kind === 'result' ? m.fields[0] : undefined;
      if (m.kind === 'result' && m.type === RES_BUILD_LOG_LINE && first && 'str' in first) return [`log:${first.str}`];
      return [];
    });
  }

  const recorder = () => {
    const events: string[] = [];
    return {
      events,
      handlers: {
        onMessage: (t: string) => events.push(`message:${t}`),
        onActivity: (t: string) => events.push(`activity:${t}`),
        onBuildLogLine: (t: string) => events.push(`log:${t}`),
      },
    };
  };

  it('hands every message to its handler in order and ends with the daemon error, if any', async () => {
    await fc.assert(
      fc.asyncProperty(stream, chunkSizes, async ([messages, e], sizes) => {
        const { reader } = feed(Buffer.concat([serialize(messages, e), u64Bytes(42n)]), sizes);
        const { events, handlers } = recorder();
        const result = await readStderr(reader, handlers);
        const expected: DaemonErrorInfo | undefined =
          e.kind === 'last'
            ? undefined
            : { level: e.level, message: stripAnsi(e.message), traces: e.traces.map(stripAnsi) };
        expect(result).toEqual(expected);
        expect(events).toEqual(expectedEvents(messages));
        // The stream ends exactly where the daemon's reply begins.
        expect(await reader.u64()).toBe(42);
      }),
      { numRuns: RUNS },
    );
  });

  it("hands a builder's lines as bytes, whole lines in batches, in their place among the other messages", async () => {
    // Consecutive log events are joined: how the lines were batched depends on the reads, what they say must not.
    const joinLogs = (events: readonly (string | Buffer)[]): string[] => {
      const joined: string[] = [];
      let run: Buffer[] | null = null;
      for (const e of events) {
        if (typeof e !== 'string') (run ??= []).push(e);
        else {
          if (run) joined.push(`log:${Buffer.concat(run).toString('utf8')}`);
          run = null;
          joined.push(e);
        }
      }
      if (run) joined.push(`log:${Buffer.concat(run).toString('utf8')}`);
      return joined;
    };
    await fc.assert(
      fc.asyncProperty(chatty, fc.oneof(chunkSizes, readSizes), async ([messages, e], sizes) => {
        const { reader } = feed(Buffer.concat([serialize(messages, e), u64Bytes(42n)]), sizes);
        const events: (string | Buffer)[] = [];
        await readStderr(reader, {
          onMessage: (t) => events.push(`message:${t}`),
          onActivity: (t) => events.push(`activity:${t}`),
          onBuildLog: (lines) => {
            expect(lines.at(-1)).toBe(0x0a);
            events.push(lines);
          },
          onBuildLogLine: () => expect.unreachable('lines go to onBuildLog when it is given'),
        });
        const expected = expectedEvents(messages).map((x) =>
          x.startsWith('log:') ? Buffer.from(`${x.slice(4)}\n`) : x,
        );
        expect(joinLogs(events)).toEqual(joinLogs(expected));
        expect(await reader.u64()).toBe(42);
      }),
      { numRuns: RUNS },
    );
  });

  it('ends a damaged stream with its result or a NixCommandError, never another exception or a hang', async () => {
    await fc.assert(
      fc.asyncProperty(stream, mutations(), chunkSizes, async ([messages, e], ms, sizes) => {
        const { reader } = feed(mutateBytes(serialize(messages, e), ms), sizes);
        await resolvesOrFailsWith(NixCommandError, () => readStderr(reader, recorder().handlers));
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses a string of absurd length anywhere in the stream before waiting for its bytes', async () => {
    await fc.assert(
      fc.asyncProperty(
        stream.filter(([m, e]) => m.some((x) => x.kind !== 'stop') || e.kind === 'error'),
        fc.nat(),
        fc.bigInt({ min: 2n ** 26n + 1n, max: 2n ** 64n - 1n }),
        async ([messages, e], pick, length) => {
          // Find the string length prefixes by serialising with a marker no generated string has.
          const marked = serialize(
            messages.map((m) =>
              m.kind === 'next' || m.kind === 'write'
                ? { ...m, text: MARK, data: MARK }
                : m.kind === 'start'
                  ? { ...m, text: MARK }
                  : m,
            ),
            e.kind === 'error' ? { ...e, message: MARK } : e,
          );
          const at: number[] = [];
          for (let i = marked.indexOf(MARK); i >= 0; i = marked.indexOf(MARK, i + 1)) at.push(i - 8);
          fc.pre(at.length > 0);
          const offset = at[pick % at.length]!;
          const bytes = Buffer.concat([marked.subarray(0, offset), u64Bytes(length), marked.subarray(offset + 8)]);
          const { reader, eof } = feed(bytes, [bytes.length]);
          const err = await resolvesOrFailsWith(NixCommandError, () => readStderr(reader));
          expect(err).not.toBe(eof);
          expect((err as Error).message).toMatch(VIOLATION);
        },
      ),
      { numRuns: RUNS },
    );
  });
});

const MARK = 'MARK-MARK';

describe('readNar', () => {
  type Node =
    | { type: 'regular'; executable: boolean; contents: Uint8Array }
    | { type: 'symlink'; target: string }
    | { type: 'directory'; entries: Array<[string, Node]> };

  const { node } = fc.letrec<{ node: Node }>((tie) => ({
    node: fc.oneof(
      { depthSize: 'small', withCrossShrink: true },
      fc.record({
        type: fc.constant('regular' as const),
        executable: fc.boolean(),
        contents: fc.uint8Array({ maxLength: 40 }),
      }),
      fc.record({ type: fc.constant('symlink' as const), target: fc.string({ minLength: 1, maxLength: 20 }) }),
      fc.record({
        type: fc.constant('directory' as const),
        entries: fc.uniqueArray(fc.tuple(fc.stringMatching(/^[a-z0-9._-]{1,12}$/), tie('node')), {
          selector: ([name]) => name,
          maxLength: 3,
        }),
      }),
    ),
  }));

  const str = (s: string | Uint8Array): Buffer => {
    const data = typeof s === 'string' ? Buffer.from(s) : Buffer.from(s);
    return Buffer.concat([u64Bytes(BigInt(data.length)), data, Buffer.alloc((8 - (data.length % 8)) % 8)]);
  };

  /** The NAR serialisation `nix-store --dump` writes. */
  function nar(n: Node): Buffer {
    const body = (x: Node): Buffer[] => {
      const out = [str('('), str('type'), str(x.type)];
      if (x.type === 'regular') {
        if (x.executable) out.push(str('executable'), str(''));
        out.push(str('contents'), str(x.contents));
      } else if (x.type === 'symlink') out.push(str('target'), str(x.target));
      else {
        for (const [name, child] of [...x.entries].sort(([a], [b]) => (a < b ? -1 : 1))) {
          out.push(str('entry'), str('('), str('name'), str(name), str('node'), ...body(child), str(')'));
        }
      }
      out.push(str(')'));
      return out;
    };
    return Buffer.concat([str('nix-archive-1'), ...body(n)]);
  }

  async function collect(chunks: AsyncIterable<Buffer>): Promise<Buffer> {
    const parts: Buffer[] = [];
    for await (const chunk of chunks) parts.push(chunk);
    return Buffer.concat(parts);
  }

  it('re-emits exactly the bytes of any NAR and stops at its last byte', async () => {
    await fc.assert(
      fc.asyncProperty(node, chunkSizes, async (n, sizes) => {
        const bytes = nar(n);
        const { reader } = feed(Buffer.concat([bytes, u64Bytes(7n)]), sizes);
        expect((await collect(readNar(reader))).equals(bytes)).toBe(true);
        expect(await reader.u64()).toBe(7);
      }),
      { numRuns: RUNS },
    );
  });

  it('ends a damaged NAR with bytes or a NixCommandError, never another exception or a hang', async () => {
    await fc.assert(
      fc.asyncProperty(
        node,
        mutations(['(', ')', 'type', 'entry', 'regular', 'contents']),
        chunkSizes,
        async (n, ms, sizes) => {
          const { reader } = feed(mutateBytes(nar(n), ms), sizes);
          await resolvesOrFailsWith(NixCommandError, () => collect(readNar(reader)));
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('refuses a token or a file length no NAR could have before waiting for its bytes', async () => {
    const header = Buffer.concat([str('nix-archive-1'), str('('), str('type'), str('regular'), str('contents')]);
    await fc.assert(
      fc.asyncProperty(
        fc.bigInt({ min: 2n ** 16n + 1n, max: 2n ** 64n - 1n }),
        fc.boolean(),
        async (length, inToken) => {
          // A token length right after the magic, or the length of the one file's contents.
          const bytes = inToken
            ? Buffer.concat([str('nix-archive-1'), u64Bytes(length), Buffer.alloc(64)])
            : Buffer.concat([header, u64Bytes(length), Buffer.alloc(64)]);
          fc.pre(inToken || length > BigInt(Number.MAX_SAFE_INTEGER));
          const { reader, eof } = feed(bytes, [bytes.length]);
          const err = await resolvesOrFailsWith(NixCommandError, () => collect(readNar(reader)));
          expect(err).not.toBe(eof);
          expect((err as Error).message).toMatch(/the NAR stream is malformed/);
        },
      ),
      {
        numRuns: RUNS,
        examples: [
          [2n ** 60n, false],
          [2n ** 64n - 1n, false],
          [2n ** 60n, true],
        ],
      },
    );
  });
});
