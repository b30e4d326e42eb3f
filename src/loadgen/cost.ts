/**
 * What a load point's tokens cost at the user's hardware price, and how that compares with API prices.
 *
 * Wall basis (every server): the bench held `devices` devices for the point's duration, so
 *   usd = devices × USD/device-hour × duration / 3600
 *   $/M blended = usd / (input + output tokens) × 1e6
 * and usd is split between input and output by an input share s:
 *   $/M input = s·usd / input tokens × 1e6, $/M output = (1 − s)·usd / output tokens × 1e6.
 * The share comes, in this order of preference for --input-cost-share auto (the default), from
 *   server  Σ prefill / Σ (prefill + decode) device-seconds the server reported per request (Tally's usage.cost)
 *   ttft    Σ TTFT / Σ end-to-end over completed requests: the client-side time split between waiting for
 *           the first token (prefill, plus any queueing, which makes it an upper bound) and decoding
 * or is a fixed fraction given as --input-cost-share 0.25. --input-cost-share ttft forces the time split.
 *
 * Metered basis (servers that report device-seconds): usd = Σ (prefill + decode) engine-seconds ×
 * devices × USD/device-hour / 3600, i.e. only busy device time, split exactly by the server's figures:
 * the same numbers as Tally's GET /v1/cost usage basis at the same price.
 *
 * Both bases are priced by buildCostReport (src/meter/cost-report.ts), the code behind /v1/cost, so that
 * API quotes (genai-prices, per average request) and the break-even volume follow one definition: a
 * deployment of `devices` devices kept up all month (730 h) costs devices × price × 730; at this load
 * point it serves at most its measured tokens/s all month; the break-even volume is that fixed cost over
 * the API's blended per-token price, when it is within that capacity (else the API stays cheaper).
 */
import { HOURS_PER_MONTH, usdOf } from '../meter/cost-math.ts';
import { buildCostReport } from '../meter/cost-report.ts';
import type { Pricing } from '../meter/types.ts';
import type { WindowTotals } from '../meter/meter.ts';
import type { PointStats } from './aggregate.ts';

export interface BenchPricing {
  /** Preset name or 'custom'. */
  name: string;
  usdPerHour: number;
  devices: number;
  source?: string;
}

export type InputShareSpec = { kind: 'auto' } | { kind: 'ttft' } | { kind: 'fixed'; value: number };

export type PerMillion = { input: number | null; output: number | null; blended: number | null };

export interface ApiPoint {
  id: string;
  name?: string;
  input_usd_per_million: number | null;
  output_usd_per_million: number | null;
  blended_usd_per_million: number | null;
  /** What the API would have charged for this point's completed requests. */
  api_cost_usd: number | null;
  /** api_cost_usd over this point's cost (wall basis): above 1, self-hosting was cheaper. */
  cost_ratio: number | null;
  break_even: { tokens_per_month: number; api_usd_per_month: number } | null;
  error?: string;
}

export interface PointCost {
  usd: number;
  input_share: number;
  input_share_from: 'server' | 'ttft' | 'fixed';
  usd_per_million: PerMillion;
  monthly: { fixed_usd: number; capacity_tokens: number | null };
  api: ApiPoint[];
  metered: { usd: number; usd_per_million: PerMillion; tokens_per_busy_device_second: number | null; capacity_tokens_per_month: number | null; api: ApiPoint[] } | null;
}

/** The input share of cost, and where it came from. */
export function inputShare(stats: PointStats, spec: InputShareSpec): { share: number; from: PointCost['input_share_from'] } {
  if (spec.kind === 'fixed') return { share: spec.value, from: 'fixed' };
  if (spec.kind === 'auto' && stats.server && stats.server.prefill_s + stats.server.decode_s > 0) {
    return { share: stats.server.prefill_s / (stats.server.prefill_s + stats.server.decode_s), from: 'server' };
  }
  const { ttft_ms, e2e_ms } = stats.client_split;
  return { share: e2e_ms > 0 ? Math.min(1, ttft_ms / e2e_ms) : 0, from: 'ttft' };
}

function totals(startMs: number, endMs: number, stats: PointStats, prefillDs: number, decodeDs: number, usdPerHour: number): WindowTotals {
  const busy = prefillDs + decodeDs;
  const usd = (ds: number) => usdOf(ds, usdPerHour);
  return {
    startMs,
    endMs,
    wallDeviceSeconds: busy,
    wallUsd: usd(busy),
    busyDeviceSeconds: busy,
    busyUsd: usd(busy),
    requests: stats.requests.completed,
    cancelled: 0,
    promptTokens: stats.tokens.input,
    cachedTokens: stats.tokens.cached_input ?? 0,
    completionTokens: stats.tokens.output,
    prefillDeviceSeconds: prefillDs,
    decodeDeviceSeconds: decodeDs,
    prefillUsd: usd(prefillDs),
    decodeUsd: usd(decodeDs),
  };
}

type Report = ReturnType<typeof buildCostReport>;

function apiPoints(report: Report): ApiPoint[] {
  return report.api_comparison.map((a) => ({
    id: a.id,
    name: a.name,
    input_usd_per_million: a.input_usd_per_million,
    output_usd_per_million: a.output_usd_per_million,
    blended_usd_per_million: a.blended_usd_per_million,
    api_cost_usd: a.cost_usd,
    cost_ratio: a.cost_ratio.usage,
    break_even: a.break_even,
    ...(a.error ? { error: a.error } : {}),
  }));
}

/** `startedAt`: the point's wall-clock start (ms since epoch), which dates the API prices. */
export function pointCost(stats: PointStats, pricing: BenchPricing, share: InputShareSpec, apiModels: string[], startedAt: number): PointCost {
  const wallDs = stats.duration_s * pricing.devices;
  const { share: s, from } = inputShare(stats, share);
  const endMs = startedAt + stats.duration_s * 1000;
  // A benchmark measures no power: the device price is the whole hourly rate.
  const pr: Pricing = { devices: pricing.devices, devicePriceUsdPerHour: pricing.usdPerHour, usdPerDeviceHour: pricing.usdPerHour };
  const wall = buildCostReport(totals(startedAt, endMs, stats, wallDs * s, wallDs * (1 - s), pricing.usdPerHour), pr, { apiModels });
  let metered: PointCost['metered'] = null;
  if (stats.server) {
    const m = buildCostReport(totals(startedAt, endMs, stats, stats.server.prefill_s * pricing.devices, stats.server.decode_s * pricing.devices, pricing.usdPerHour), pr, { apiModels });
    metered = {
      usd: m.usd.usage,
      usd_per_million: m.usd_per_million_tokens.usage,
      tokens_per_busy_device_second: m.throughput.tokens_per_busy_device_second,
      capacity_tokens_per_month: m.monthly.capacity_tokens,
      api: apiPoints(m),
    };
  }
  return {
    usd: wall.usd.usage,
    input_share: s,
    input_share_from: from,
    usd_per_million: wall.usd_per_million_tokens.usage,
    monthly: { fixed_usd: wall.monthly.fixed_usd, capacity_tokens: stats.duration_s > 0 ? stats.throughput.total_tokens_per_s * HOURS_PER_MONTH * 3600 : null },
    api: apiPoints(wall),
    metered,
  };
}

/** Monthly cost of serving `tokens` a month: whole deployments of capacity `capacity` at `fixedUsd` each. */
export function selfHostedMonthly(tokens: number, fixedUsd: number, capacity: number): number {
  if (tokens <= 0) return 0;
  return Math.ceil(tokens / capacity) * fixedUsd;
}
