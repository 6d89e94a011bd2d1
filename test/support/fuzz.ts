/**
 * Shared pieces of the property tests over parsers of outside input: mutations that turn a valid input into the
 * kinds of damage real inputs arrive with (cut short, a byte flipped, junk pasted in, a piece repeated), and the
 * check that a parser fails only with its own named error.
 */
import fc from 'fast-check';

/** Positions are taken modulo the input's length, so one mutation applies to an input of any size. */
export type Mutation =
  | { kind: 'truncate'; at: number }
  | { kind: 'delete'; at: number; length: number }
  | { kind: 'insert'; at: number; junk: string }
  | { kind: 'replace'; at: number; junk: string }
  | { kind: 'duplicate'; at: number; length: number }
  | { kind: 'flip'; at: number; bit: number };

/**
 * One to three mutations. `tokens` are the input format's own punctuation and keywords: junk made of them gets
 * past a parser's first check far more often than random characters do.
 */
export function mutations(tokens: readonly string[] = []): fc.Arbitrary<Mutation[]> {
  const at = fc.nat();
  const junk = fc.oneof(
    fc.string({ unit: 'binary', maxLength: 8 }),
    ...(tokens.length > 0
      ? [fc.array(fc.constantFrom(...tokens), { minLength: 1, maxLength: 4 }).map((t) => t.join(''))]
      : []),
  );
  const mutation: fc.Arbitrary<Mutation> = fc.oneof(
    fc.record({ kind: fc.constant('truncate' as const), at }),
    fc.record({ kind: fc.constant('delete' as const), at, length: fc.integer({ min: 1, max: 16 }) }),
    fc.record({ kind: fc.constant('insert' as const), at, junk }),
    fc.record({ kind: fc.constant('replace' as const), at, junk }),
    fc.record({ kind: fc.constant('duplicate' as const), at, length: fc.integer({ min: 1, max: 64 }) }),
    fc.record({ kind: fc.constant('flip' as const), at, bit: fc.integer({ min: 0, max: 7 }) }),
  );
  return fc.array(mutation, { minLength: 1, maxLength: 3 });
}

/** `text` with `ms` applied in order. A bit flip works on the UTF-16 code unit (it may leave a lone surrogate). */
export function mutateText(text: string, ms: readonly Mutation[]): string {
  let t = text;
  for (const m of ms) {
    const i = m.at % (t.length + 1);
    switch (m.kind) {
      case 'truncate':
        t = t.slice(0, i);
        break;
      case 'delete':
        t = t.slice(0, i) + t.slice(i + m.length);
        break;
      case 'insert':
        t = t.slice(0, i) + m.junk + t.slice(i);
        break;
      case 'replace':
        t = t.slice(0, i) + m.junk + t.slice(i + m.junk.length);
        break;
      case 'duplicate':
        t = t.slice(0, i + m.length) + t.slice(i, i + m.length) + t.slice(i + m.length);
        break;
      case 'flip':
        if (i < t.length) t = t.slice(0, i) + String.fromCharCode(t.charCodeAt(i) ^ (1 << m.bit)) + t.slice(i + 1);
        break;
    }
  }
  return t;
}

/** `bytes` with `ms` applied in order; junk is inserted as its UTF-8 bytes. */
export function mutateBytes(bytes: Buffer, ms: readonly Mutation[]): Buffer {
  let b = bytes;
  for (const m of ms) {
    const i = m.at % (b.length + 1);
    switch (m.kind) {
      case 'truncate':
        b = b.subarray(0, i);
        break;
      case 'delete':
        b = Buffer.concat([b.subarray(0, i), b.subarray(i + m.length)]);
        break;
      case 'insert':
        b = Buffer.concat([b.subarray(0, i), Buffer.from(m.junk), b.subarray(i)]);
        break;
      case 'replace': {
        const junk = Buffer.from(m.junk);
        b = Buffer.concat([b.subarray(0, i), junk, b.subarray(i + junk.length)]);
        break;
      }
      case 'duplicate':
        b = Buffer.concat([b.subarray(0, i + m.length), b.subarray(i, i + m.length), b.subarray(i + m.length)]);
        break;
      case 'flip':
        if (i < b.length) {
          b = Buffer.from(b);
          b[i] = b[i]! ^ (1 << m.bit);
        }
        break;
    }
  }
  return b;
}

type ErrorClass = abstract new (...args: never[]) => Error;

/**
 * Runs `parse`; an exception must be an instance of `named` (not a TypeError or RangeError from deep inside) with
 * a message. Returns the result, or the error.
 */
export function parsesOrFailsWith<T>(named: ErrorClass, parse: () => T): T | Error {
  try {
    return parse();
  } catch (err) {
    return checked(named, err);
  }
}

/** `parsesOrFailsWith` for an asynchronous parser. */
export async function resolvesOrFailsWith<T>(named: ErrorClass, parse: () => Promise<T>): Promise<T | Error> {
  try {
    return await parse();
  } catch (err) {
    return checked(named, err);
  }
}

function checked(named: ErrorClass, err: unknown): Error {
  if (!(err instanceof named) || err.message === '') {
    throw new Error(`expected a ${named.name} with a message, got ${describe(err)}`, { cause: err });
  }
  return err;
}

function describe(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}\n${err.stack ?? ''}` : String(err);
}

/** A value nested `depth` times by `wrap` (deep nesting that a recursive parser or validator could choke on). */
export function nest(depth: number, wrap: (inner: unknown) => unknown): unknown {
  let v: unknown = 1;
  for (let i = 0; i < depth; i++) v = wrap(v);
  return v;
}

/**
 * Every place in a parsed document a mutation can reach: each existing key and index, and `newKeys` in every
 * object (a key the schema does not know).
 */
export function places(value: unknown, newKeys: readonly string[], at: PropertyKey[] = []): PropertyKey[][] {
  if (typeof value !== 'object' || value === null) return [at];
  const keys = Array.isArray(value) ? value.map((_, i) => i) : Object.keys(value);
  const own = Array.isArray(value) ? [] : newKeys.map((k) => [...at, k]);
  return [at, ...own, ...keys.flatMap((k) => places((value as Record<PropertyKey, unknown>)[k], newKeys, [...at, k]))];
}

/** A copy of `value` with what is at `at` replaced by `by`; a key called __proto__ stays data, as JSON.parse makes it. */
export function replaced(value: unknown, at: readonly PropertyKey[], by: unknown): unknown {
  const [head, ...rest] = at;
  if (head === undefined) return by;
  const copy = (Array.isArray(value) ? [...(value as unknown[])] : { ...(value as object) }) as Record<
    PropertyKey,
    unknown
  >;
  Object.defineProperty(copy, head, {
    value: replaced(copy[head], rest, by),
    enumerable: true,
    writable: true,
    configurable: true,
  });
  return copy;
}
