import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { mutateText, mutations, parsesOrFailsWith } from '../../test/support/fuzz.js';
import { parseCredentialFile } from './credentials.js';
import { GitHubCredentialsError } from './errors.js';

const RUNS = 300;
const key = fc.stringMatching(/^[A-Za-z_][A-Za-z0-9_]{0,12}$/);
const value = fc.string({ unit: 'binary', maxLength: 30 });
const entries = fc.uniqueArray(fc.tuple(key, value), { selector: ([k]) => k, maxLength: 4 });

/** A value as a dotenv file may hold it: double-quoted with escapes, single-quoted, or bare. */
function written(v: string, style: number): string {
  if (style === 1 && !v.includes("'") && !/\r(?!\n)/.test(v) && !/\r\n/.test(v)) return `'${v}'`;
  if (style === 2 && v === v.trim() && !/^["']/.test(v) && !/[\r\n]/.test(v)) return v;
  const escaped = v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n').replace(/\r/g, '\\r');
  return `"${escaped}"`;
}

describe('parseCredentialFile on any file', () => {
  it('reads back every KEY=VALUE file and JSON object it was given', () => {
    fc.assert(
      fc.property(entries, fc.array(fc.nat(2)), fc.boolean(), fc.boolean(), (es, styles, json, exported) => {
        const text = json
          ? JSON.stringify(Object.fromEntries(es))
          : es.map(([k, v], i) => `${exported ? 'export ' : ''}${k}=${written(v, styles[i] ?? 0)}`).join('\n');
        expect(parseCredentialFile(text)).toEqual(new Map(es));
      }),
      { numRuns: RUNS },
    );
  });

  it('reads values holding U+2028 and U+2029, which JavaScript counts as line ends (found by the property above)', () => {
    const text = ['A="x\u2028y"', "B='\u2029'", 'C=" \u2028 # z" # comment \u2029'].join('\n');
    expect(parseCredentialFile(text)).toEqual(
      new Map([
        ['A', 'x\u2028y'],
        ['B', '\u2029'],
        ['C', ' \u2028 # z'],
      ]),
    );
  });

  it('reads a damaged file or refuses it with GitHubCredentialsError, without quoting its content', () => {
    const tokens = ['"', "'", '\\', '=', '\n', '#', 'export ', '{', '}'];
    fc.assert(
      fc.property(entries, fc.array(fc.nat(2)), fc.boolean(), mutations(tokens), (es, styles, json, ms) => {
        const text = json
          ? JSON.stringify(Object.fromEntries(es))
          : es.map(([k, v], i) => `${k}=${written(v, styles[i] ?? 0)}`).join('\n');
        const damaged = mutateText(text, ms);
        const result = parsesOrFailsWith(GitHubCredentialsError, () => parseCredentialFile(damaged));
        if (result instanceof Error) {
          for (const [, v] of es) if (v.length >= 12) expect(result.message).not.toContain(v);
        } else for (const k of result.keys()) expect(typeof k).toBe('string');
      }),
      { numRuns: RUNS },
    );
  });
});
