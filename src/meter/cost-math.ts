/** The unit arithmetic every cost figure uses, written once. */
import type { LedgerRow } from './ledger.ts';

export const HOURS_PER_MONTH = 730;

/** Dollars for device-seconds at a price per device-hour. */
export function usdOf(deviceSeconds: number, usdPerHour: number): number {
  return (deviceSeconds * usdPerHour) / 3600;
}

/** $ per million tokens; null without tokens. */
export function perMillion(usd: number, tokens: number): number | null {
  return tokens > 0 ? (usd / tokens) * 1e6 : null;
}

/** Cached prompt tokens over prompt tokens; null without prompt tokens. */
export function prefixHitRate(r: { promptTokens: number; cachedTokens: number }): number | null {
  return r.promptTokens > 0 ? r.cachedTokens / r.promptTokens : null;
}

/** A ledger group as `tally cost --format json` and the dashboard show it. */
export function ledgerRowReport(r: LedgerRow) {
  const tokens = r.promptTokens + r.completionTokens;
  return {
    key: r.key,
    requests: r.requests,
    cancelled: r.cancelled,
    prompt_tokens: r.promptTokens,
    /** Of the prompt tokens, those the prefix cache held, and their share (null without prompt tokens). */
    cached_prompt_tokens: r.cachedTokens,
    prefix_cache_hit_rate: prefixHitRate(r),
    completion_tokens: r.completionTokens,
    device_seconds: { prefill: r.prefillDeviceSeconds, decode: r.decodeDeviceSeconds },
    usd: { usage: r.usdUsage, allocation: r.usdAllocation },
    usd_per_million_tokens: { usage: perMillion(r.usdUsage, tokens), allocation: perMillion(r.usdAllocation, tokens) },
  };
}

export type LedgerRowReport = ReturnType<typeof ledgerRowReport>;
