import { pino, type Logger } from 'pino';

export type { Logger };

/** The root logger; components take `logger.child({ component })`. JSON on stderr, level from EKACI_LOG_LEVEL. */
export function createLogger(name: string, level = process.env.EKACI_LOG_LEVEL ?? 'info'): Logger {
  return pino({ name, level }, pino.destination({ fd: 2, sync: false }));
}

/** A logger that discards everything, for tests and for the quiet embedded CLI. */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
