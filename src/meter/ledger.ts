import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';

/** One finished or cancelled request, as the ledger keeps it. */
export interface LedgerRecord {
  id: string;
  /** When the request ended, ms since epoch. */
  endMs: number;
  arrivalMs: number;
  tenant: string;
  model: string;
  status: string;
  promptTokens: number;
  /** Of the prompt tokens, those the prefix cache held (absent: 0). */
  cachedTokens?: number;
  completionTokens: number;
  prefillDeviceSeconds: number;
  decodeDeviceSeconds: number;
  usdUsage: number;
  usdAllocation: number;
  devicePriceUsdPerHour: number;
}

export type LedgerGroup = 'tenant' | 'model' | 'day';

export interface LedgerRow {
  /** The tenant, the model, or the UTC day (YYYY-MM-DD). */
  key: string;
  requests: number;
  cancelled: number;
  promptTokens: number;
  cachedTokens: number;
  completionTokens: number;
  prefillDeviceSeconds: number;
  decodeDeviceSeconds: number;
  usdUsage: number;
  usdAllocation: number;
}

export const LEDGER_FILE = 'ledger.sqlite';

const GROUP_SQL: Record<LedgerGroup, string> = {
  tenant: 'tenant',
  model: 'model',
  day: "strftime('%Y-%m-%d', end_ms / 1000, 'unixepoch')",
};

/**
 * The request ledger: <dataDir>/ledger.sqlite, SQLite in WAL mode with synchronous=NORMAL. Each insert
 * is its own transaction, committed before insert() returns: a committed row is in the WAL file, so a
 * crash of the process (kill -9) loses nothing that insert() returned for and cannot corrupt the
 * database; only a power cut or OS crash can drop the last transactions. The primary key is the
 * request id and inserts are INSERT OR IGNORE, so a request is never counted twice.
 */
export class Ledger {
  readonly path: string;
  private readonly db: Database.Database;
  private readonly insertStmt?: Database.Statement;
  /** The cached-tokens column, or 0 in a ledger opened read-only from before it. */
  private readonly cached: string = 'cached_tokens';

  constructor(dataDir: string, options: { readonly?: boolean } = {}) {
    this.path = join(dataDir, LEDGER_FILE);
    if (options.readonly) {
      this.db = new Database(this.path, { readonly: true, fileMustExist: true });
      if (!this.hasCachedColumn()) this.cached = '0';
      return;
    }
    mkdirSync(dataDir, { recursive: true });
    this.db = new Database(this.path);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = NORMAL');
    this.db.pragma('busy_timeout = 5000');
    this.db.exec(`
      CREATE TABLE IF NOT EXISTS requests (
        id TEXT PRIMARY KEY,
        end_ms INTEGER NOT NULL,
        arrival_ms INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        prefill_device_seconds REAL NOT NULL,
        decode_device_seconds REAL NOT NULL,
        usd_usage REAL NOT NULL,
        usd_allocation REAL NOT NULL,
        device_price_usd_per_hour REAL NOT NULL
      );
      CREATE INDEX IF NOT EXISTS requests_end_ms ON requests (end_ms);
    `);
    // Ledgers written before prefix caching lack the column: their requests had no cached tokens.
    if (!this.hasCachedColumn()) this.db.exec('ALTER TABLE requests ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0');
    this.insertStmt = this.db.prepare(`
      INSERT OR IGNORE INTO requests (id, end_ms, arrival_ms, tenant, model, status, prompt_tokens, completion_tokens,
        prefill_device_seconds, decode_device_seconds, usd_usage, usd_allocation, device_price_usd_per_hour, cached_tokens)
      VALUES (@id, @endMs, @arrivalMs, @tenant, @model, @status, @promptTokens, @completionTokens,
         @prefillDeviceSeconds, @decodeDeviceSeconds, @usdUsage, @usdAllocation, @devicePriceUsdPerHour, @cachedTokens)`);
  }

  private hasCachedColumn(): boolean {
    return (this.db.prepare('PRAGMA table_info(requests)').all() as { name: string }[]).some((c) => c.name === 'cached_tokens');
  }

  /** Commits `record` (synchronously); true if it was new, false if its id was already there. */
  insert(record: LedgerRecord): boolean {
    if (!this.insertStmt) throw new Error('the ledger is open read-only');
    return this.insertStmt.run({ ...record, cachedTokens: record.cachedTokens ?? 0, endMs: Math.round(record.endMs), arrivalMs: Math.round(record.arrivalMs) }).changes === 1;
  }

  get(id: string): LedgerRecord | undefined {
    return this.db
      .prepare(
        `SELECT id, end_ms AS endMs, arrival_ms AS arrivalMs, tenant, model, status, prompt_tokens AS promptTokens, ${this.cached} AS cachedTokens,
                completion_tokens AS completionTokens, prefill_device_seconds AS prefillDeviceSeconds,
                decode_device_seconds AS decodeDeviceSeconds, usd_usage AS usdUsage, usd_allocation AS usdAllocation,
                device_price_usd_per_hour AS devicePriceUsdPerHour
         FROM requests WHERE id = ?`,
      )
      .get(id) as LedgerRecord | undefined;
  }

  count(): number {
    return (this.db.prepare('SELECT count(*) AS n FROM requests').get() as { n: number }).n;
  }

  /** Totals grouped by tenant, model or UTC day, of requests that ended at or after `since`. */
  query(options: { by: LedgerGroup; since?: Date }): LedgerRow[] {
    const key = GROUP_SQL[options.by];
    if (!key) throw new Error(`cannot group by "${options.by}"`);
    return this.db
      .prepare(
        `SELECT ${key} AS key, count(*) AS requests, sum(status = 'cancelled') AS cancelled,
                sum(prompt_tokens) AS promptTokens, sum(${this.cached}) AS cachedTokens, sum(completion_tokens) AS completionTokens,
                sum(prefill_device_seconds) AS prefillDeviceSeconds, sum(decode_device_seconds) AS decodeDeviceSeconds,
                sum(usd_usage) AS usdUsage, sum(usd_allocation) AS usdAllocation
         FROM requests WHERE end_ms >= ? GROUP BY 1 ORDER BY 1`,
      )
      .all(options.since?.getTime() ?? 0) as LedgerRow[];
  }

  /** PRAGMA integrity_check: 'ok' when the file is sound. */
  integrityCheck(): string {
    return this.db.pragma('integrity_check', { simple: true }) as string;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }
}
