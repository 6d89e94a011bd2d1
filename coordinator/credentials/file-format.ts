/**
 * The text format of credential files (`file`, `systemd-credential`): a JSON object, or `KEY=VALUE` lines (optionally
 * `export`ed, values optionally quoted and spanning lines, `#` comments). `fail` receives a problem that never quotes
 * the file: a line number, never a line.
 */
export function parseCredentialFile(text: string, fail: (problem: string) => never): Map<string, string> {
  const trimmed = text.trim();
  if (trimmed.startsWith('{')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(trimmed);
    } catch {
      // JSON.parse quotes the text around the error, which could be part of a secret.
      return fail('starts with "{" but is not valid JSON');
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return fail('is not a JSON object');
    const values = new Map<string, string>();
    for (const [key, value] of Object.entries(parsed)) {
      if (typeof value === 'string' || typeof value === 'number') values.set(key, String(value));
    }
    return values;
  }
  return parseKeyValueLines(text, fail);
}

function parseKeyValueLines(text: string, fail: (problem: string) => never): Map<string, string> {
  const values = new Map<string, string>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!;
    if (line.trim() === '' || line.trim().startsWith('#')) continue;
    // `s`: a value may hold U+2028 and U+2029, which `.` would not match (JavaScript counts them as line ends).
    const match = /^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$/s.exec(line);
    if (!match) return fail(`line ${i + 1} is not KEY=VALUE`);
    const [, key, rest] = match as unknown as [string, string, string];
    const quote = rest[0];
    if (quote !== '"' && quote !== "'") {
      values.set(key, rest.trim());
      continue;
    }
    // A quoted value may span lines: that is how a PEM fits into a dotenv file.
    const first = i;
    let quoted = rest.slice(1);
    while (closingQuote(quoted, quote) < 0) {
      if (++i >= lines.length) return fail(`line ${first + 1}: the value of ${key} has no closing ${quote}`);
      quoted += `\n${lines[i]}`;
    }
    const close = closingQuote(quoted, quote);
    if (!/^\s*(#.*)?$/s.test(quoted.slice(close + 1))) return fail(`line ${i + 1}: text after the quoted ${key}`);
    values.set(key, quote === '"' ? unescape(quoted.slice(0, close)) : quoted.slice(0, close));
  }
  return values;
}

function closingQuote(text: string, quote: string): number {
  for (let i = 0; i < text.length; i++) {
    if (quote === '"' && text[i] === '\\') i++;
    else if (text[i] === quote) return i;
  }
  return -1;
}

function unescape(raw: string): string {
  return raw.replace(/\\(.)/gs, (_, c: string) => (c === 'n' ? '\n' : c === 'r' ? '\r' : c === 't' ? '\t' : c));
}
