/**
 * Where a JSON text first stops being JSON. Node 20's `JSON.parse` often reports only a snippet ("Unexpected
 * token '}', ... is not valid JSON") with no offset, and a user editing a config needs the line and column. This
 * scanner only runs after `JSON.parse` has failed; it is iterative so deeply nested input cannot overflow the stack.
 */

export interface JsonPosition {
  /** Zero-based UTF-16 offset, as `JSON.parse` counts. */
  offset: number;
  line: number;
  column: number;
}

const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
const HEX_DIGIT = /^[0-9a-fA-F]$/;
const LITERALS = ['true', 'false', 'null'];

type State = 'value' | 'firstValue' | 'key' | 'firstKey' | 'colon' | 'after';

/** The position of the first syntax error in `text`, or `undefined` if it is valid JSON. */
export function jsonErrorPosition(text: string): JsonPosition | undefined {
  const offset = jsonErrorOffset(text);
  if (offset === undefined) return undefined;
  const before = text.slice(0, offset);
  const lineStart = before.lastIndexOf('\n') + 1;
  return { offset, line: before.split('\n').length, column: offset - lineStart + 1 };
}

function jsonErrorOffset(text: string): number | undefined {
  let i = 0;
  const closers: Array<'}' | ']'> = [];
  let state: State = 'value';

  /** Consumes a string starting at the opening quote; false leaves `i` on the offending character. */
  const scanString = (): boolean => {
    i++;
    while (i < text.length) {
      const c = text[i]!;
      if (c === '"') {
        i++;
        return true;
      }
      if (c < ' ') return false;
      if (c !== '\\') {
        i++;
        continue;
      }
      const escape = text[i + 1];
      // Like V8, blame the character after the backslash.
      i++;
      if (escape === 'u') {
        const end = i + 5;
        for (i++; i < end; i++) if (!HEX_DIGIT.test(text[i] ?? '')) return false;
      } else if (escape !== undefined && '"\\/bfnrt'.includes(escape)) {
        i++;
      } else {
        return false;
      }
    }
    return false;
  };

  const scanScalar = (): boolean => {
    const literal = LITERALS.find((l) => text.startsWith(l, i));
    if (literal) {
      i += literal.length;
      return true;
    }
    NUMBER.lastIndex = i;
    if (!NUMBER.test(text)) return false;
    i = NUMBER.lastIndex;
    return true;
  };

  for (;;) {
    while (i < text.length && ' \t\n\r'.includes(text[i]!)) i++;
    if (i >= text.length) return state === 'after' && closers.length === 0 ? undefined : i;
    const c = text[i]!;
    switch (state) {
      case 'value':
      case 'firstValue':
        if (c === '{' || c === '[') {
          closers.push(c === '{' ? '}' : ']');
          i++;
          state = c === '{' ? 'firstKey' : 'firstValue';
        } else if (state === 'firstValue' && c === ']') {
          closers.pop();
          i++;
          state = 'after';
        } else if (c === '"' ? scanString() : scanScalar()) {
          state = 'after';
        } else {
          return i;
        }
        break;
      case 'key':
      case 'firstKey':
        if (c === '"') {
          if (!scanString()) return i;
          state = 'colon';
        } else if (state === 'firstKey' && c === '}') {
          closers.pop();
          i++;
          state = 'after';
        } else {
          return i;
        }
        break;
      case 'colon':
        if (c !== ':') return i;
        i++;
        state = 'value';
        break;
      case 'after': {
        const closer = closers.at(-1);
        if (c === ',' && closer !== undefined) {
          i++;
          state = closer === '}' ? 'key' : 'value';
        } else if (c === closer) {
          closers.pop();
          i++;
        } else {
          return i;
        }
        break;
      }
    }
  }
}
