import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { CacheError } from '../../common/errors.js';
import { mutateText, mutations, parsesOrFailsWith } from '../../test/support/fuzz.js';
import { generateSigningKey, signingKeyFromSecret } from './signing-key.js';

const RUNS = 100;
const name = fc.stringMatching(/^[A-Za-z0-9.-]{1,20}$/);

describe('signingKeyFromSecret on any secret', () => {
  it('derives the public key of every key pair from its secret half', () => {
    fc.assert(
      fc.property(name, (n) => {
        const pair = generateSigningKey(n);
        expect(signingKeyFromSecret(pair.secretKey)).toEqual(pair);
      }),
      { numRuns: RUNS },
    );
  });

  it('reads a damaged secret key or refuses it with CacheError, never another exception', () => {
    const secret = fc.oneof(
      fc
        .tuple(name, mutations([':', '=', '+', '/', ' ', 'A']))
        .map(([n, ms]) => mutateText(generateSigningKey(n).secretKey, ms)),
      fc.string({ unit: 'binary', maxLength: 120 }),
      fc.uint8Array({ minLength: 60, maxLength: 68 }).map((b) => `k:${Buffer.from(b).toString('base64')}`),
    );
    fc.assert(
      fc.property(secret, (s) => {
        parsesOrFailsWith(CacheError, () => signingKeyFromSecret(s));
      }),
      { numRuns: RUNS },
    );
  });
});
