/**
 * The process-wide set of secret values that must never reach a log line. Whatever reads a secret (credential
 * sources, configuration) registers it; the logger (common/logging.ts) passes every line through `redact`.
 *
 * Values are kept after they rotate out: an old key is still a secret. Short values are not registered: a 4-character
 * "secret" would turn every occurrence of those letters in every log line into `[redacted]`.
 */

/** Shorter values are not registered (they would garble logs, and are not worth hiding from them anyway). */
export const MIN_REDACTED_LENGTH = 6;
// Rotation adds values for as long as the process runs (hourly instance-metadata tokens, say); past this bound the
// oldest are forgotten, so a pathological rotation rate cannot grow the set (or the cost of each line) without end.
const MAX_REDACTED_VALUES = 4_096;
export const REDACTED = '[redacted]';

const values = new Set<string>();
let registered: Redactor | undefined;

/**
 * Replaces a fixed set of values by `[redacted]`, longest first, so that a value that contains another is replaced
 * whole. Values shorter than MIN_REDACTED_LENGTH are left alone.
 */
export class Redactor {
  /** The length of the longest value (0 for none): a stream keeps that many characters less one back. */
  readonly longest: number;
  private readonly pattern: RegExp | undefined;

  constructor(secrets: Iterable<string>) {
    const kept = [...new Set(secrets)]
      .filter((s) => s.length >= MIN_REDACTED_LENGTH)
      .sort((a, b) => b.length - a.length);
    this.longest = kept[0]?.length ?? 0;
    this.pattern =
      kept.length === 0
        ? undefined
        : new RegExp(kept.map((v) => v.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')).join('|'), 'g');
  }

  apply(text: string): string {
    return this.pattern === undefined ? text : text.replace(this.pattern, REDACTED);
  }
}

/**
 * Registers secret values. A multi-line value (a PEM key) is registered whole and line by line, so a log line that
 * quotes part of it still hides what it quotes; so is the JSON-escaped form that a structured log line carries.
 */
export function registerSecret(...secrets: readonly (string | undefined)[]): void {
  let added = false;
  for (const secret of secrets) {
    if (secret === undefined) continue;
    for (const form of forms(secret)) {
      if (form.length < MIN_REDACTED_LENGTH || values.has(form)) continue;
      values.add(form);
      added = true;
    }
  }
  if (!added) return;
  while (values.size > MAX_REDACTED_VALUES) values.delete(values.values().next().value!);
  registered = undefined;
}

function forms(secret: string): string[] {
  const out = [secret, secret.trim()];
  const escaped = JSON.stringify(secret).slice(1, -1);
  if (escaped !== secret) out.push(escaped);
  if (/[\r\n]/.test(secret)) {
    for (const line of secret.split(/\r?\n/)) out.push(line.trim());
  }
  return out;
}

/** `text` with every registered value replaced by `[redacted]`. */
export function redact(text: string): string {
  if (values.size === 0) return text;
  registered ??= new Redactor(values);
  return registered.apply(text);
}

/** Forgets every registered value: for tests that must start from a clean registry. */
export function clearSecrets(): void {
  values.clear();
  registered = undefined;
}
