/** The unit arithmetic every cost figure uses, written once. */

export const HOURS_PER_MONTH = 730;

/** Dollars for device-seconds at a price per device-hour. */
export function usdOf(deviceSeconds: number, usdPerHour: number): number {
  return (deviceSeconds * usdPerHour) / 3600;
}

/** $ per million tokens; null without tokens. */
export function perMillion(usd: number, tokens: number): number | null {
  return tokens > 0 ? (usd / tokens) * 1e6 : null;
}

/** A ledger group's $/M tokens on both bases. */
export function ledgerPerMillion(row: { usdUsage: number; usdAllocation: number; promptTokens: number; completionTokens: number }): { usage: number | null; allocation: number | null } {
  const tokens = row.promptTokens + row.completionTokens;
  return { usage: perMillion(row.usdUsage, tokens), allocation: perMillion(row.usdAllocation, tokens) };
}
