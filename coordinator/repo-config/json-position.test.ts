import { describe, expect, it } from 'vitest';
import { jsonErrorPosition } from './json-position.js';

/** The offset V8 reports, when its message has one (Node 20 omits it for some errors). */
function v8Offset(text: string): number | undefined {
  try {
    JSON.parse(text);
    return undefined;
  } catch (e) {
    const match = /at position (\d+)/.exec((e as Error).message);
    return match ? Number(match[1]) : undefined;
  }
}

describe('JSON error positions', () => {
  it.each([
    '{"a":1,}',
    '[1,2',
    '{"a" 1}',
    '"abc',
    '[01]',
    '1 2',
    '{"a":"\\q"}',
    '{"a":"\\u12x4"}',
    '{"a":"tab\there"}',
    '{,}',
  ])('agrees with V8 on where %j stops being JSON', (text) => {
    const offset = v8Offset(text);
    expect(offset).toBeDefined();
    expect(jsonErrorPosition(text)?.offset).toBe(offset);
  });

  it('finds errors V8 reports without a position, with a 1-based line and column', () => {
    expect(jsonErrorPosition('{\n  "a": tru\n}')).toEqual({ offset: 9, line: 2, column: 8 });
    expect(jsonErrorPosition('[1,]')?.offset).toBe(3);
    expect(jsonErrorPosition('')).toEqual({ offset: 0, line: 1, column: 1 });
  });

  it('accepts valid JSON of every kind', () => {
    for (const text of ['{}', '[]', ' {"a": [1, -2.5e+3, true, false, null, "x\\n\\u00e9", {}]} ', '"s"', '0']) {
      expect(jsonErrorPosition(text)).toBeUndefined();
    }
  });

  it('handles deep nesting without overflowing the stack', () => {
    expect(jsonErrorPosition('['.repeat(1_000_000))?.offset).toBe(1_000_000);
  });
});
