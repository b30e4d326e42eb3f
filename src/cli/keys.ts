/** `tally keys add|list|revoke`: edits the API keys file (hashed keys with per-tenant limits). */
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { type ApiKeyEntry, generateKey, keyDigest, readKeysFile, validTenantName, writeKeysFile } from '../server/api-keys.ts';
import { defaultDataDir, SERVE_OPTIONS } from '../config/serve-config.ts';

export const KEYS_HELP = `tally keys — manage API keys (stored as SHA-256 digests, with per-key limits)

  tally keys add NAME [--rpm N] [--tpm N] [--budget-usd X]
                          creates a key for tenant NAME and prints it once; only its hash is stored
  tally keys list         names, truncated hashes, limits (and spend, where the ledger has it)
  tally keys revoke NAME  removes NAME's key (a running server notices within a second)

  --file FILE             the keys file (default $TALLY_API_KEYS_FILE or .tally/api-keys)
  --data-dir DIR          list: the ledger to read spend from (default $TALLY_DATA_DIR or ./.tally)
  --rpm N                 requests per minute
  --tpm N                 tokens per minute (prompt + max_tokens reserved, corrected at the end)
  --budget-usd X          all-time spending limit in USD (ledger usage basis); past it: 429 insufficient_quota

Serve with: tally serve --api-keys-file FILE`;

export const DEFAULT_KEYS_FILE = path.join(SERVE_OPTIONS.dataDir.default, 'api-keys');

function limit(value: string | undefined, flag: string, integer: boolean): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0 || (integer && (!Number.isInteger(n) || n < 1))) {
    throw new Error(`${flag} must be ${integer ? 'a positive integer' : 'a non-negative number'} (got "${value}")`);
  }
  return n;
}

async function spendByTenant(dataDir: string): Promise<Map<string, number> | undefined> {
  const { Ledger, LEDGER_FILE } = await import('../meter/ledger.ts');
  if (!fs.existsSync(path.join(dataDir, LEDGER_FILE))) return undefined;
  const ledger = new Ledger(dataDir, { readonly: true });
  try {
    return new Map(ledger.query({ by: 'tenant' }).map((r) => [r.key, r.usdUsage]));
  } finally {
    ledger.close();
  }
}

/** Runs the command; returns the exit code. `out`/`err` for tests. */
export async function runKeysCommand(argv: string[], out: (s: string) => void = console.log, err: (s: string) => void = console.error): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      strict: true,
      options: {
        file: { type: 'string' },
        'data-dir': { type: 'string' },
        rpm: { type: 'string' },
        tpm: { type: 'string' },
        'budget-usd': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    });
  } catch (e) {
    err(`${(e as Error).message}\n\n${KEYS_HELP}`);
    return 2;
  }
  const { values, positionals } = parsed;
  const [action, name, ...extra] = positionals;
  if (values.help || action === undefined) {
    out(KEYS_HELP);
    return values.help ? 0 : 2;
  }
  const file = values.file ?? (process.env.TALLY_API_KEYS_FILE || DEFAULT_KEYS_FILE);
  try {
    const entries: ApiKeyEntry[] = fs.existsSync(file) ? readKeysFile(file) : [];
    if (extra.length > 0) throw new Error(`unexpected arguments: ${extra.join(' ')}`);
    switch (action) {
      case 'add': {
        if (!name) throw new Error('usage: tally keys add NAME [--rpm N] [--tpm N] [--budget-usd X]');
        if (!validTenantName(name)) throw new Error(`"${name}" is not a valid name: letters, digits, . _ -, at most 64, starting with a letter or digit`);
        if (entries.some((e) => e.name === name)) throw new Error(`${name} already has a key in ${file}; revoke it first`);
        const key = generateKey();
        const entry: ApiKeyEntry = {
          name,
          digest: keyDigest(key),
          rpm: limit(values.rpm, '--rpm', true),
          tpm: limit(values.tpm, '--tpm', true),
          budgetUsd: limit(values['budget-usd'], '--budget-usd', false),
        };
        writeKeysFile(file, [...entries, entry]);
        out(key);
        err(`added ${name} to ${file}; the key above is shown only this once (the file keeps its SHA-256).`);
        return 0;
      }
      case 'list': {
        if (name) throw new Error('usage: tally keys list');
        const spend = await spendByTenant(values['data-dir'] ?? defaultDataDir(process.env));
        const rows = entries.map((e) => [
          e.name,
          `sha256:${e.digest.toString('hex').slice(0, 12)}…`,
          e.rpm === undefined ? '-' : String(e.rpm),
          e.tpm === undefined ? '-' : String(e.tpm),
          e.budgetUsd === undefined ? '-' : String(e.budgetUsd),
          spend ? (spend.get(e.name) ?? 0).toFixed(6) : '-',
        ]);
        const header = ['name', 'hash', 'rpm', 'tpm', 'budget_usd', 'spent_usd'];
        const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
        for (const r of [header, ...rows]) out(r.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd());
        if (rows.length === 0) err(`no keys in ${file}`);
        return 0;
      }
      case 'revoke': {
        if (!name) throw new Error('usage: tally keys revoke NAME');
        const kept = entries.filter((e) => e.name !== name);
        if (kept.length === entries.length) throw new Error(`no key named ${name} in ${file}`);
        writeKeysFile(file, kept);
        err(`revoked ${name}`);
        return 0;
      }
      default:
        err(`unknown action "${action}"\n\n${KEYS_HELP}`);
        return 2;
    }
  } catch (e) {
    err(`tally keys: ${(e as Error).message}`);
    return 1;
  }
}
