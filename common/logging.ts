import { pino, type DestinationStream, type Logger } from 'pino';
import { redact } from './redaction.js';

export type { Logger };

/**
 * The root logger; components take `logger.child({ component })`. JSON on stderr (or `destination`), level from
 * EKACI_LOG_LEVEL. Every line passes through `redact` just before it is written, children's lines included: no value
 * registered in common/redaction.ts reaches a log, whatever field or message carries it.
 */
export function createLogger(
  name: string,
  level = process.env.EKACI_LOG_LEVEL ?? 'info',
  destination: DestinationStream = pino.destination({ fd: 2, sync: false }),
): Logger {
  return pino({ name, level, hooks: { streamWrite: redact } }, destination);
}

/** A logger that discards everything, for tests and for the quiet embedded CLI. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
