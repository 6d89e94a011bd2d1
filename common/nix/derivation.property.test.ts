import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { mutateText, mutations, parsesOrFailsWith } from '../../test/support/fuzz.js';
import { DerivationParseError } from '../errors.js';
import {
  type Derivation,
  type DerivationOutput,
  isFixedOutput,
  outputPaths,
  parseDerivation,
  preferLocalBuild,
  requiredSystemFeatures,
} from './derivation.js';

const RUNS = 300;
const FILE = '/nix/store/00000000000000000000000000000000-fuzz.drv';
const ATERM_TOKENS = ['"', '\\', '(', ')', '[', ']', ',', 'Derive(', '\n', '""', '[]'];

// Strings heavy in what the format must escape, and arbitrary code units (lone surrogates included).
const text = fc.oneof(
  fc.string({ unit: 'binary', maxLength: 16 }),
  fc.string({
    unit: fc.constantFrom('\\', '"', 'n', 't', '\n', '\r', '\t', 'a', '(', ')', ',', '[', ']', 'é'),
    maxLength: 12,
  }),
);
const key = fc.oneof(text, fc.constantFrom('out', '__proto__', 'constructor', '__json', 'toString'));
const entries = <T>(value: fc.Arbitrary<T>) =>
  fc.uniqueArray(fc.tuple(key, value), { selector: ([k]) => k, maxLength: 4 }).map((e) => Object.fromEntries(e));

const output: fc.Arbitrary<DerivationOutput> = fc.record({ path: text, hashAlgo: text, hash: text });
const derivation: fc.Arbitrary<Derivation> = fc.record({
  outputs: entries(output),
  inputDrvs: entries(fc.array(text, { maxLength: 3 })),
  inputSrcs: fc.array(text, { maxLength: 3 }),
  system: text,
  builder: text,
  args: fc.array(text, { maxLength: 3 }),
  env: entries(text),
});

const ESCAPES: Record<string, string> = { '"': '\\"', '\\': '\\\\', '\n': '\\n', '\r': '\\r', '\t': '\\t' };
const str = (s: string): string => `"${s.replace(/["\\\n\r\t]/g, (c) => ESCAPES[c]!)}"`;
const list = (items: string[]): string => `[${items.join(',')}]`;

/** The ATerm Nix writes for `d` (Nix also sorts the keys; the parser does not care). */
function serialize(d: Derivation): string {
  const outputs = Object.entries(d.outputs).map(([n, o]) => `(${[n, o.path, o.hashAlgo, o.hash].map(str).join(',')})`);
  const inputs = Object.entries(d.inputDrvs).map(([p, outs]) => `(${str(p)},${list(outs.map(str))})`);
  const env = Object.entries(d.env).map(([k, v]) => `(${str(k)},${str(v)})`);
  return `Derive(${[
    list(outputs),
    list(inputs),
    list(d.inputSrcs.map(str)),
    str(d.system),
    str(d.builder),
    list(d.args.map(str)),
    list(env),
  ].join(',')})`;
}

/** A parse error must say which file and where, within the file. */
function expectLocated(err: Error, input: string): void {
  const m = /^(.*): malformed derivation at byte (\d+): /s.exec(err.message);
  expect(m?.[1]).toBe(FILE);
  expect(Number(m?.[2])).toBeLessThanOrEqual(Buffer.byteLength(input));
}

describe('parseDerivation on any input', () => {
  it('reads back every derivation exactly as it was written, whatever its strings contain', () => {
    fc.assert(
      fc.property(derivation, (d) => {
        expect(parseDerivation(serialize(d), FILE)).toEqual(d);
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses every derivation cut short, as truncated, naming the file', () => {
    fc.assert(
      fc.property(derivation, fc.nat(), (d, cut) => {
        const whole = serialize(d);
        const prefix = whole.slice(0, cut % whole.length);
        const err = parsesOrFailsWith(DerivationParseError, () => parseDerivation(prefix, FILE));
        expect(err).toBeInstanceOf(DerivationParseError);
        expectLocated(err as Error, prefix);
        expect((err as Error).message).toContain('found the end of the file (is it truncated?)');
      }),
      { numRuns: RUNS },
    );
  });

  it('parses a damaged derivation or refuses it with DerivationParseError, never another exception', () => {
    fc.assert(
      fc.property(derivation, mutations(ATERM_TOKENS), (d, ms) => {
        const damaged = mutateText(serialize(d), ms);
        const result = parsesOrFailsWith(DerivationParseError, () => parseDerivation(damaged, FILE));
        if (result instanceof Error) expectLocated(result, damaged);
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses arbitrary text with DerivationParseError', () => {
    fc.assert(
      fc.property(
        fc.oneof(
          fc.string({ unit: 'binary' }),
          fc.string().map((s) => `Derive(${s}`),
        ),
        (s) => {
          const result = parsesOrFailsWith(DerivationParseError, () => parseDerivation(s, FILE));
          if (result instanceof Error) expectLocated(result, s);
        },
      ),
      { numRuns: RUNS },
    );
  });
});

describe('reading attributes of a parsed derivation', () => {
  const structured = fc.oneof(
    fc.jsonValue().map((v) => JSON.stringify(v)),
    fc.string(),
    fc.constantFrom('null', '[]', '"kvm"', '7', '{"requiredSystemFeatures":"kvm"}', '{"preferLocalBuild":1}'),
  );

  it('answers features and preferences of any derivation, or refuses its __json with DerivationParseError', () => {
    fc.assert(
      fc.property(derivation, fc.option(structured, { nil: undefined }), (d, json) => {
        if (json !== undefined) d.env.__json = json;
        const parsed = parseDerivation(serialize(d), FILE);
        expect(typeof isFixedOutput(parsed)).toBe('boolean');
        expect(Object.values(outputPaths(parsed)).every((p) => p !== '')).toBe(true);
        const features = parsesOrFailsWith(DerivationParseError, () => requiredSystemFeatures(parsed));
        const local = parsesOrFailsWith(DerivationParseError, () => preferLocalBuild(parsed));
        if (!(features instanceof Error)) expect(features.every((f) => typeof f === 'string')).toBe(true);
        if (!(local instanceof Error)) expect(typeof local).toBe('boolean');
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses structured attributes that are JSON but not an object, naming env.__json', () => {
    for (const json of ['null', '[]', '7', '"kvm"', 'true']) {
      const d = parseDerivation(serialize({ ...EMPTY, env: { __json: json } }), FILE);
      expect(() => requiredSystemFeatures(d)).toThrow(DerivationParseError);
      expect(() => preferLocalBuild(d)).toThrow(/env\.__json/);
    }
  });
});

const EMPTY: Derivation = { outputs: {}, inputDrvs: {}, inputSrcs: [], system: '', builder: '', args: [], env: {} };
