/**
 * API keys and their tenants.
 *
 * Keys come from `--api-key [NAME:]KEY` / TALLY_API_KEYS (plain, for quick setups) and from a keys file
 * (`--api-keys-file FILE`, TALLY_API_KEYS_FILE) that stores only SHA-256 digests of keys, one tenant a line:
 *
 *     # comment
 *     acme: sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 rpm=60 tpm=100000 budget_usd=25
 *     beta: sha256:60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752
 *
 * NAME is the tenant (what logs, metrics and the ledger record; never the key): letters, digits, `.`, `_`, `-`,
 * at most 64. Options, all optional: `rpm` requests per minute, `tpm` tokens per minute (prompt + max_tokens
 * reserved at admission, corrected to prompt + completion at the end), `budget_usd` the most the tenant may
 * spend, all time, in USD on the ledger's usage basis. `tally keys add|list|revoke` edits the file; keys are
 * 32 random bytes (`tly_` + base64url), so an unsalted SHA-256 is enough to make a stolen file useless.
 * A running server re-reads the file when it changes (checked at most once a second), so a revoked key stops
 * working without a restart.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';

export interface TenantPolicy {
  /** Requests per minute. */
  rpm?: number;
  /** Tokens (prompt + completion) per minute. */
  tpm?: number;
  /** All-time spending limit in USD (ledger usage basis). */
  budgetUsd?: number;
}

export interface ApiKeyEntry extends TenantPolicy {
  /** The tenant name. */
  name: string;
  /** SHA-256 of the key, 32 bytes. */
  digest: Buffer;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const LINE = /^([^:\s]+):\s+sha256:([0-9a-fA-F]{64})((?:\s+[a-z_]+=\S+)*)\s*$/;

export const keyDigest = (key: string): Buffer => createHash('sha256').update(key, 'utf8').digest();

/** A key's tenant name when none is given: a short digest, so logs and metrics never hold the key. */
export function defaultTenantName(key: string): string {
  return `key-${keyDigest(key).toString('hex').slice(0, 8)}`;
}

export function validTenantName(name: string): boolean {
  return NAME.test(name);
}

/** A new random key: `tly_` + 43 base64url characters (256 bits). */
export function generateKey(): string {
  return `tly_${randomBytes(32).toString('base64url')}`;
}

/**
 * API keys as the configuration gives them (`--api-key`, repeatable, else TALLY_API_KEYS split at commas), each
 * `KEY` or `NAME:KEY`. Returns key → tenant name; empty when keys are off.
 */
export function loadApiKeys(given: string[] | undefined): Map<string, string> {
  const keys = new Map<string, string>();
  const entries = (given ?? []).map((s) => s.trim()).filter(Boolean);
  for (const entry of entries) {
    const at = entry.indexOf(':');
    const [name, key] = at > 0 ? [entry.slice(0, at), entry.slice(at + 1)] : [undefined, entry];
    if (key.length < 8) throw new Error('API keys must be at least 8 characters');
    keys.set(key, name ?? defaultTenantName(key));
  }
  return keys;
}

function positive(value: string, what: string, where: string, integer: boolean): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0 || (integer && (!Number.isInteger(n) || n < 1))) {
    throw new Error(`${where}: ${what} must be ${integer ? 'a positive integer' : 'a non-negative number'} (got "${value}")`);
  }
  return n;
}

/** Parses a keys file's text; errors name the file and line. */
export function parseKeysFile(text: string, file = 'keys file'): ApiKeyEntry[] {
  const entries: ApiKeyEntry[] = [];
  const names = new Set<string>();
  const digests = new Set<string>();
  text.split(/\r?\n/).forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const where = `${file}:${i + 1}`;
    const m = LINE.exec(line);
    if (!m) throw new Error(`${where}: expected "NAME: sha256:<64 hex digits> [rpm=N] [tpm=N] [budget_usd=X]"`);
    const [, name, hex, rest] = m;
    if (!validTenantName(name)) throw new Error(`${where}: "${name}" is not a valid name (letters, digits, . _ -, at most 64)`);
    if (names.has(name)) throw new Error(`${where}: the name "${name}" appears twice`);
    if (digests.has(hex.toLowerCase())) throw new Error(`${where}: the same key hash appears twice`);
    names.add(name);
    digests.add(hex.toLowerCase());
    const entry: ApiKeyEntry = { name, digest: Buffer.from(hex, 'hex') };
    for (const opt of rest.trim().split(/\s+/).filter(Boolean)) {
      const [k, v] = [opt.slice(0, opt.indexOf('=')), opt.slice(opt.indexOf('=') + 1)];
      if (k === 'rpm') entry.rpm = positive(v, 'rpm', where, true);
      else if (k === 'tpm') entry.tpm = positive(v, 'tpm', where, true);
      else if (k === 'budget_usd') entry.budgetUsd = positive(v, 'budget_usd', where, false);
      else throw new Error(`${where}: unknown option "${k}" (rpm, tpm, budget_usd)`);
    }
    entries.push(entry);
  });
  return entries;
}

export function formatKeyEntry(e: ApiKeyEntry): string {
  const opts = [
    e.rpm !== undefined ? `rpm=${e.rpm}` : '',
    e.tpm !== undefined ? `tpm=${e.tpm}` : '',
    e.budgetUsd !== undefined ? `budget_usd=${e.budgetUsd}` : '',
  ].filter(Boolean);
  return `${e.name}: sha256:${e.digest.toString('hex')}${opts.length ? ` ${opts.join(' ')}` : ''}`;
}

const HEADER = [
  '# Tally API keys: one tenant a line, "NAME: sha256:<hex> [rpm=N] [tpm=N] [budget_usd=X]".',
  '# Only SHA-256 digests are stored. Edit with `tally keys add|list|revoke`.',
];

/** Writes the file atomically (temporary file + rename), readable by its owner only. */
export function writeKeysFile(file: string, entries: ApiKeyEntry[]): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, `${[...HEADER, ...entries.map(formatKeyEntry)].join('\n')}\n`, { mode: 0o600 });
  fs.renameSync(tmp, file);
}

export function readKeysFile(file: string): ApiKeyEntry[] {
  return parseKeysFile(fs.readFileSync(file, 'utf8'), file);
}

/**
 * Every key the server accepts, as digests with their tenant and limits: the plain keys plus the keys file,
 * re-read when the file's size or mtime changes (at most once a second). A file that no longer parses keeps
 * the last good keys and is reported through `onReloadError`.
 */
export class KeyStore {
  private fileEntries: ApiKeyEntry[] = [];
  private byName = new Map<string, ApiKeyEntry>();
  private stamp = '';
  private checkedMs = 0;
  private readonly plain: ApiKeyEntry[];

  constructor(
    plainKeys: Map<string, string> | undefined,
    private readonly file?: string,
    private readonly onReloadError: (err: Error) => void = () => {},
    private readonly clock: () => number = Date.now,
  ) {
    this.plain = [...(plainKeys ?? new Map<string, string>())].map(([key, name]) => ({ name, digest: keyDigest(key) }));
    if (file) {
      // At start-up a missing or malformed file is fatal.
      this.fileEntries = readKeysFile(file);
      this.stamp = this.statStamp();
    }
    this.index();
  }

  private statStamp(): string {
    const st = fs.statSync(this.file!);
    return `${st.size}:${st.mtimeMs}:${st.ino}`;
  }

  private index(): void {
    this.byName = new Map([...this.plain, ...this.fileEntries].map((e) => [e.name, e]));
  }

  /** Re-reads the keys file if it changed (at most once a second). */
  refresh(force = false): void {
    if (!this.file) return;
    const now = this.clock();
    if (!force && now - this.checkedMs < 1000) return;
    this.checkedMs = now;
    try {
      const stamp = this.statStamp();
      if (stamp === this.stamp) return;
      this.fileEntries = readKeysFile(this.file);
      this.stamp = stamp;
      this.index();
    } catch (err) {
      this.onReloadError(err as Error);
    }
  }

  get enabled(): boolean {
    return this.plain.length + this.fileEntries.length > 0 || this.file !== undefined;
  }

  entries(): ApiKeyEntry[] {
    this.refresh();
    return [...this.plain, ...this.fileEntries];
  }

  policy(tenant: string): TenantPolicy | undefined {
    return this.byName.get(tenant);
  }
}
