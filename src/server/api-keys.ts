import { createHash } from 'node:crypto';

/** A key's tenant name when none is given: a short digest, so logs and metrics never hold the key. */
export function defaultTenantName(key: string): string {
  return `key-${createHash('sha256').update(key).digest('hex').slice(0, 8)}`;
}

/**
 * API keys from `--api-key` (repeatable) and TALLY_API_KEYS, each `KEY` or `NAME:KEY`, comma-separated in
 * the variable. Returns key → tenant name; empty when keys are off.
 */
export function loadApiKeys(cliKeys: string[] | undefined, envKeys: string | undefined): Map<string, string> {
  const keys = new Map<string, string>();
  const entries = [...(cliKeys ?? []), ...(envKeys ?? '').split(',')].map((s) => s.trim()).filter(Boolean);
  for (const entry of entries) {
    const at = entry.indexOf(':');
    const [name, key] = at > 0 ? [entry.slice(0, at), entry.slice(at + 1)] : [undefined, entry];
    if (key.length < 8) throw new Error('API keys must be at least 8 characters');
    keys.set(key, name ?? defaultTenantName(key));
  }
  return keys;
}
