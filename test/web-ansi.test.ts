import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { AnsiParser, type Segment } from '../web/src/ansi.js';

/** The web UI's reading of terminal escapes in build logs (web/src/ansi.ts), which runs in Node as in the browser. */

const parse = (...chunks: string[]): Segment[] => {
  const parser = new AnsiParser();
  return merge([...chunks.flatMap((c) => parser.push(c)), ...parser.end()]);
};

/** Adjacent segments of the same classes as one: how a page shows them. */
function merge(segments: Segment[]): Segment[] {
  const out: Segment[] = [];
  for (const s of segments) {
    const last = out.at(-1);
    if (last && last.classes === s.classes) last.text += s.text;
    else out.push({ ...s });
  }
  return out;
}

describe('ANSI escapes in logs', () => {
  it('turns SGR colours and weights into classes, and resets them', () => {
    expect(parse('plain \x1b[31mred\x1b[0m \x1b[1;92mbold bright green\x1b[m done')).toEqual([
      { text: 'plain ', classes: '' },
      { text: 'red', classes: 'fg-1' },
      { text: ' ', classes: '' },
      { text: 'bold bright green', classes: 'fg-10 b' },
      { text: ' done', classes: '' },
    ]);
    expect(parse('\x1b[0;33;44myellow on blue\x1b[39mdefault on blue\x1b[22;49m')).toEqual([
      { text: 'yellow on blue', classes: 'fg-3 bg-4' },
      { text: 'default on blue', classes: 'bg-4' },
    ]);
    expect(parse('\x1b[38;5;9m256-colour red\x1b[38;2;1;2;3mtrue colour\x1b[4munderlined')).toEqual([
      { text: '256-colour red', classes: 'fg-9' },
      { text: 'true colour', classes: '' },
      { text: 'underlined', classes: 'u' },
    ]);
  });

  it('drops other escapes and control characters, and keeps markup as plain text', () => {
    expect(parse('a\x1b[2Kb\x1b]0;title\x07c\x1b(Bd\x07e\r\nf\rg')).toEqual([{ text: 'abcde\nf\ng', classes: '' }]);
    expect(parse('<script>alert(1)</script>&amp;')).toEqual([{ text: '<script>alert(1)</script>&amp;', classes: '' }]);
  });

  it('reads a log the same however it is cut into chunks', () => {
    const piece = fc.constantFrom(
      'text ',
      '\n',
      '\r\n',
      '\r',
      '\x1b[31m',
      '\x1b[1;94m',
      '\x1b[0m',
      '\x1b[K',
      'é',
      '<b>',
    );
    fc.assert(
      fc.property(fc.array(piece, { maxLength: 40 }), fc.array(fc.nat(), { maxLength: 6 }), (pieces, cuts) => {
        const log = pieces.join('');
        const at = [...new Set(cuts.map((c) => c % (log.length + 1)))].sort((a, b) => a - b);
        const chunks = [0, ...at].map((from, i) => log.slice(from, at[i] ?? log.length));
        expect(parse(...chunks)).toEqual(parse(log));
      }),
    );
  });

  it('shows an escape that never ends as text rather than holding the log back', () => {
    const parser = new AnsiParser();
    const out = parser.push(`\x1b[${'1;'.repeat(200)}`);
    expect(out.map((s) => s.text).join('')).toContain('1;1;');
  });
});
