import { HOURS_PER_MONTH, prefixHitRate } from './cost-math.ts';
import { type CostMeter, type WindowTotals, unitCosts } from './meter.ts';
import { type ApiQuote, DEFAULT_API_MODELS, quoteApi } from './prices.ts';
import type { Pricing } from './types.ts';

const UNITS: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** "90s", "15m", "1.5h", "7d" → ms; undefined if malformed or not positive. */
export function parseDuration(text: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)\s*([smhd])$/.exec(text.trim());
  if (!m) return undefined;
  const ms = Number(m[1]) * UNITS[m[2]];
  return ms > 0 && Number.isFinite(ms) ? ms : undefined;
}

export type { Pricing };

export interface CostReportOptions {
  /** "provider:model" ids (default DEFAULT_API_MODELS). */
  apiModels?: string[];
  /** Monthly token volume to size the deployment for (default: the window's rate, extrapolated). */
  targetTokensPerMonth?: number;
  /** The latest device telemetry sample (utilization, memory, power), shown as is. */
  telemetry?: () => unknown;
}

export interface ApiComparison extends ApiQuote {
  /** The API's cost of the window's requests over ours, by basis (>1: the API costs more). */
  cost_ratio: { usage: number | null; allocation: number | null };
  /**
   * The monthly token volume (at the measured mix) above which the deployment as configured, kept up
   * all month, costs less than this API, and the API spend at that volume; null when the API is
   * cheaper even with the devices busy all month at the measured throughput.
   */
  break_even: { tokens_per_month: number; api_usd_per_month: number } | null;
}

/**
 * GET /v1/cost's body: a pure function of a window's totals, the prices and the API list.
 *
 * Throughput is tokens (prompt + completion) per busy device-second of the window's finished
 * requests: what a device does when kept busy at the observed batching, a conservative capacity
 * since fuller batches raise it. A month is 730 hours.
 */
export function buildCostReport(t: WindowTotals, pricing: Pricing, options: CostReportOptions = {}) {
  const costs = unitCosts(t);
  const tokens = t.promptTokens + t.completionTokens;
  const seconds = Math.max(0, (t.endMs - t.startMs) / 1000);
  const requestDeviceSeconds = t.prefillDeviceSeconds + t.decodeDeviceSeconds;
  const throughput = requestDeviceSeconds > 0 ? tokens / requestDeviceSeconds : null;
  const monthSeconds = HOURS_PER_MONTH * 3600;
  const fixedUsd = pricing.devices * pricing.usdPerDeviceHour * HOURS_PER_MONTH;
  const capacity = throughput === null ? null : throughput * pricing.devices * monthSeconds;
  const target = options.targetTokensPerMonth ?? (seconds > 0 ? (tokens / seconds) * monthSeconds : 0);
  const devicesNeeded = throughput === null ? null : Math.max(target > 0 ? 1 : 0, Math.ceil(target / (throughput * monthSeconds)));

  const cached = t.cachedTokens ?? 0;
  const mix = { requests: t.requests, promptTokens: t.promptTokens, cachedTokens: cached, completionTokens: t.completionTokens };
  const at = new Date(t.endMs);
  const api: ApiComparison[] = (options.apiModels ?? DEFAULT_API_MODELS).map((id) => {
    const q = quoteApi(id, mix, at);
    const ratio = (ours: number) => (q.cost_usd !== null && ours > 0 ? q.cost_usd / ours : null);
    const perToken = q.blended_usd_per_million === null ? null : q.blended_usd_per_million / 1e6;
    const breakEven =
      perToken !== null && perToken > 0 && capacity !== null && perToken * capacity > fixedUsd
        ? { tokens_per_month: fixedUsd / perToken, api_usd_per_month: fixedUsd }
        : null;
    return { ...q, cost_ratio: { usage: ratio(costs.usd.usage), allocation: ratio(costs.usd.allocation) }, break_even: breakEven };
  });

  return {
    object: 'cost_report',
    window: { start: new Date(t.startMs).toISOString(), end: at.toISOString(), seconds },
    devices: pricing.devices,
    device_price_usd_per_hour: pricing.devicePriceUsdPerHour,
    usd_per_device_hour: pricing.usdPerDeviceHour,
    requests: t.requests,
    cancelled: t.cancelled,
    tokens: { prompt: t.promptTokens, cached_prompt: cached, completion: t.completionTokens, total: tokens },
    /** Of the prompt tokens, the share whose keys and values came from the prefix cache (no prefill). */
    prefix_cache: { hit_rate: prefixHitRate({ promptTokens: t.promptTokens, cachedTokens: cached }) },
    device_seconds: {
      prefill: t.prefillDeviceSeconds,
      decode: t.decodeDeviceSeconds,
      busy: t.busyDeviceSeconds,
      idle: Math.max(0, t.wallDeviceSeconds - t.busyDeviceSeconds),
      wall: t.wallDeviceSeconds,
    },
    utilization: costs.utilization,
    allocation_factor: costs.allocationFactor,
    usd: { ...costs.usd, wall_clock: t.wallUsd },
    usd_per_million_tokens: costs.usdPerMillion,
    throughput: {
      tokens_per_busy_device_second: throughput,
      tokens_per_second: seconds > 0 ? tokens / seconds : null,
    },
    monthly: {
      hours: HOURS_PER_MONTH,
      fixed_usd: fixedUsd,
      capacity_tokens: capacity,
      target_tokens: target,
      devices_needed: devicesNeeded,
      devices_needed_fixed_usd: devicesNeeded === null ? null : devicesNeeded * pricing.usdPerDeviceHour * HOURS_PER_MONTH,
    },
    energy:
      t.powerMeasuredSeconds && t.energyJoules !== undefined
        ? {
            joules: t.energyJoules,
            joules_per_token: tokens > 0 ? t.energyJoules / tokens : null,
            average_watts: t.energyJoules / t.powerMeasuredSeconds,
            measured_seconds: t.powerMeasuredSeconds,
          }
        : { unavailable: 'no power measurement in this window (needs NVML or nvidia-smi on a GPU)' },
    device_telemetry: options.telemetry?.() ?? { unavailable: 'device telemetry is off' },
    api_comparison: api,
  };
}

export type CostWindowReport = ReturnType<typeof buildCostReport>;

/** GET /v1/cost's body for the meter's last `windowMs`: the model, the window's report at the meter's prices, and per-device busy time. */
export function meterCostReport(meter: CostMeter, windowMs: number, options: CostReportOptions = {}, now?: number) {
  const perDevice = meter.busyByDevice.size > 0 ? { per_device_busy_seconds_since_start: Object.fromEntries(meter.busyByDevice) } : {};
  return { ...modelOf(meter), ...buildCostReport(meter.window(windowMs, now), meter.pricing(), options), ...perDevice };
}

/** The report's `model` (id and precision) where the meter knows the precision. */
export function modelOf(meter: CostMeter): { model?: { id: string; precision: string } } {
  return meter.precision ? { model: { id: meter.model, precision: meter.precision } } : {};
}
