import { pino, type Logger } from 'pino';
import pretty from 'pino-pretty';

/** pretty: one readable line per record (for a terminal); json: pino's records (for a log collector). */
export type LogFormat = 'pretty' | 'json';

/** The server's logger: `format` as given, else pretty when stdout is a terminal and JSON when it is not. */
export function createLogger(level: string, format?: LogFormat): Logger {
  const chosen = format ?? (process.stdout.isTTY ? 'pretty' : 'json');
  if (chosen === 'json') return pino({ level });
  return pino({ level }, pretty({ colorize: Boolean(process.stdout.isTTY), translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname', singleLine: true, sync: true }));
}
