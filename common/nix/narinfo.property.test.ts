import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { mutateText, mutations, parsesOrFailsWith } from '../../test/support/fuzz.js';
import { CacheError } from '../errors.js';
import { type NarInfo, fromNixBase32, nixBase32, parseNarInfo, serializeNarInfo } from './narinfo.js';
import { NIX_BASE32_ALPHABET, isStorePath } from './store-path.js';

const RUNS = 300;
const KEYS = ['StorePath', 'URL', 'Compression', 'FileHash', 'FileSize', 'NarHash', 'NarSize', 'References'];
const NARINFO_TOKENS = [...KEYS.map((k) => `\n${k}: `), ': ', '\n', ' ', 'sha256:', 'sha256-', '/nix/store/', '9'];

const storeHash = fc.string({ unit: fc.constantFrom(...NIX_BASE32_ALPHABET), minLength: 32, maxLength: 32 });
// A first character other than '.' keeps clear of the names Nix refuses ('.', '..', '.-…').
const storeName = fc.stringMatching(/^[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,40}$/);
const storePath = fc.tuple(storeHash, storeName).map(([h, n]) => `/nix/store/${h}-${n}`);
const digest = fc.uint8Array({ minLength: 32, maxLength: 32 }).map((b) => Buffer.from(b));
const base32Sha256 = digest.map((d) => `sha256:${nixBase32(d)}`);
// Any one-line value: the format has no escaping, so a value is whatever follows ': ' up to the newline.
const lineValue = fc.string({ unit: 'binary', maxLength: 24 }).map((s) => s.replace(/\n/g, ' '));
const byteCount = fc.integer({ min: 1, max: 999_999_999_999_999 });

const narInfo: fc.Arbitrary<NarInfo> = fc
  .record(
    {
      storePath,
      url: lineValue.filter((s) => s !== ''),
      compression: lineValue,
      fileHash: base32Sha256,
      fileSize: fc.nat({ max: 999_999_999_999_999 }),
      narHash: base32Sha256,
      narSize: byteCount,
      references: fc.uniqueArray(storePath, { maxLength: 4 }).map((r) => r.sort()),
      deriver: storePath,
      system: lineValue,
      sigs: fc.array(lineValue, { maxLength: 3 }),
      ca: lineValue,
    },
    { requiredKeys: ['storePath', 'url', 'compression', 'narHash', 'narSize', 'references', 'sigs'] },
  )
  .map((info): NarInfo => info);

/** A SHA-256 digest in each spelling Nix accepts. */
const spellings = (d: Buffer): string[] => [
  `sha256:${nixBase32(d)}`,
  `sha256:${d.toString('hex')}`,
  `sha256:${d.toString('base64')}`,
  `sha256-${d.toString('base64')}`,
];

function expectNamed(err: Error): void {
  expect(err.message).toMatch(/^invalid narinfo: /);
}

describe('Nix base32', () => {
  it('decodes what it encodes, for digests of every length Nix uses', () => {
    fc.assert(
      fc.property(
        fc.constantFrom(16, 20, 32, 64).chain((n) => fc.uint8Array({ minLength: n, maxLength: n })),
        (b) => {
          expect(fromNixBase32(nixBase32(b), b.length)).toEqual(Buffer.from(b));
        },
      ),
      { numRuns: RUNS },
    );
    // Nix's own: the empty string's SHA-256.
    const empty = '0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73';
    expect(fromNixBase32(empty, 32).toString('hex')).toBe(
      'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
    );
    expect(() => fromNixBase32('e'.repeat(52), 32)).toThrow(/not base32/);
  });
});

describe('parseNarInfo on any input', () => {
  it('reads back every narinfo exactly as serializeNarInfo wrote it', () => {
    fc.assert(
      fc.property(narInfo, (info) => {
        expect(parseNarInfo(serializeNarInfo(info))).toEqual(info);
      }),
      { numRuns: RUNS },
    );
  });

  it('normalises a hash in any spelling Nix accepts to the same base32', () => {
    fc.assert(
      fc.property(narInfo, digest, fc.nat(3), fc.nat(3), (info, d, narSpelling, fileSpelling) => {
        const written = serializeNarInfo(info)
          .replace(/^NarHash: .*$/m, `NarHash: ${spellings(d)[narSpelling]!}`)
          .replace(/^FileHash: .*$/m, `FileHash: ${spellings(d)[fileSpelling]!}`);
        const parsed = parseNarInfo(written);
        expect(parsed.narHash).toBe(`sha256:${nixBase32(d)}`);
        if (info.fileHash !== undefined) expect(parsed.fileHash).toBe(parsed.narHash);
      }),
      { numRuns: RUNS },
    );
  });

  it('parses a damaged narinfo or refuses it with CacheError, never another exception', () => {
    fc.assert(
      fc.property(narInfo, mutations(NARINFO_TOKENS), (info, ms) => {
        const result = parsesOrFailsWith(CacheError, () => parseNarInfo(mutateText(serializeNarInfo(info), ms)));
        if (result instanceof Error) expectNamed(result);
        else expect(isStorePath(result.storePath)).toBe(true);
      }),
      { numRuns: RUNS },
    );
  });

  it('takes only byte counts a number holds exactly, refusing huge, negative and fractional sizes', () => {
    const size = fc.oneof(
      fc.bigInt({ min: 0n, max: 10n ** 40n }).map(String),
      fc.stringMatching(/^[-+]?\d{0,30}(\.\d{1,3})?(e\d{1,3})?$/),
      fc.constantFrom('0x10', ' 1', '1 ', 'Infinity', 'NaN', '١٢'),
    );
    fc.assert(
      fc.property(narInfo, size, fc.boolean(), (info, value, narSize) => {
        const key = narSize ? 'NarSize' : 'FileSize';
        const text = `${serializeNarInfo(info)}${key}: ${value}\n`;
        const result = parsesOrFailsWith(CacheError, () => parseNarInfo(text));
        if (result instanceof Error) return expectNamed(result);
        const parsed = narSize ? result.narSize : result.fileSize;
        expect(Number.isSafeInteger(parsed)).toBe(true);
        expect(String(parsed)).toBe(value.replace(/^0+(?=\d)/, ''));
      }),
      { numRuns: RUNS },
    );
  });

  it('refuses arbitrary lines of known keys and arbitrary values with CacheError', () => {
    const line = fc.tuple(fc.oneof(fc.constantFrom(...KEYS, 'Deriver', 'Sig', 'CA'), lineValue), lineValue);
    fc.assert(
      fc.property(fc.array(line, { maxLength: 12 }), (lines) => {
        const result = parsesOrFailsWith(CacheError, () =>
          parseNarInfo(lines.map(([k, v]) => `${k}: ${v}`).join('\n')),
        );
        if (result instanceof Error) expectNamed(result);
      }),
      { numRuns: RUNS },
    );
  });
});
