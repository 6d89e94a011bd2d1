import { Writable } from 'node:stream';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger } from './logging.js';
import { clearSecrets, redact, registerSecret } from './redaction.js';

const SECRET = 'wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY';
const PEM =
  '-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAline-one-of-the-key\nline-two-of-the-key+/==\n-----END RSA PRIVATE KEY-----\n';

afterEach(() => clearSecrets());

/** A logger writing into an array of parsed lines. */
function capture(): { lines: string[]; logger: ReturnType<typeof createLogger> } {
  const lines: string[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _encoding, done) {
      lines.push(chunk.toString('utf8'));
      done();
    },
  });
  return { lines, logger: createLogger('test', 'debug', sink) };
}

describe('redaction', () => {
  it('replaces every registered value, and values that contain others whole', () => {
    registerSecret(SECRET, `${SECRET}-longer`);
    expect(redact(`a ${SECRET} b ${SECRET}-longer c`)).toBe('a [redacted] b [redacted] c');
  });

  it('does not register values shorter than six characters, which would garble every line', () => {
    registerSecret('abc12', 'true', '');
    expect(redact('abc12 is true')).toBe('abc12 is true');
  });

  it('treats values as text, not patterns', () => {
    registerSecret('a.b*c+d?(e)');
    expect(redact('x a.b*c+d?(e) aXbbc+d')).toBe('x [redacted] aXbbc+d');
  });

  it('keeps a value out of every pino line: messages, fields, errors and child loggers', () => {
    registerSecret(SECRET);
    const { lines, logger } = capture();
    logger.info({ token: SECRET }, `pushing with ${SECRET}`);
    logger.child({ component: 'cache' }).warn({ err: new Error(`refused ${SECRET}`) }, 'push failed');
    expect(lines).toHaveLength(2);
    for (const line of lines) {
      expect(line).not.toContain(SECRET);
      expect(() => JSON.parse(line) as unknown).not.toThrow();
    }
    expect(JSON.parse(lines[0]!)).toMatchObject({ token: '[redacted]', msg: 'pushing with [redacted]' });
    expect(lines[1]).toContain('refused [redacted]');
  });

  it('hides a multi-line key whole, line by line, and in its JSON-escaped form', () => {
    registerSecret(PEM);
    const { lines, logger } = capture();
    logger.info({ key: PEM }, 'the key');
    logger.info(`a line of it: MIIEpAIBAAKCAQEAline-one-of-the-key`);
    expect(lines.join('')).not.toContain('line-one-of-the-key');
    expect(lines.join('')).not.toContain('line-two-of-the-key');
  });
});
