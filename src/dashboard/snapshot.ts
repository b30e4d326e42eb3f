/**
 * The dashboard's data: one JSON snapshot, computed at one instant, that the page renders as it is.
 *
 * `cost` is GET /v1/cost's report (same function, same window as the default `?window=15m`, which is
 * also the window of the /metrics cost gauges), `recent` repeats /v1/cost?window=1m's token figures
 * for a "right now" throughput, `live` reads the engine gauges from the same Prometheus registry that
 * /metrics serves, and `ledger` groups the ledger's rows by tenant and by model. Every figure the page
 * shows is a field of this object, formatted by public/format.js; the page computes nothing.
 */
import { buildCostReport, modelOf, type CostWindowReport, type Pricing } from '../meter/cost-report.ts';
import type { Ledger, LedgerRow } from '../meter/ledger.ts';
import type { CostMeter } from '../meter/meter.ts';
import type { Metrics } from '../telemetry/metrics.ts';

/** The trailing window of `recent` (output tokens/s). */
export const RECENT_WINDOW_MS = 60_000;
/** The ledger tables cover requests that ended this long ago or later. */
export const LEDGER_WINDOW_MS = 24 * 3_600_000;
/**
 * The ledger tables are recomputed at most this often: better-sqlite3 is synchronous, so a GROUP BY
 * over a day of rows on every poll of every open page would stall the API's event loop.
 */
export const LEDGER_TTL_MS = 5_000;

export interface DashboardSources {
  meter: CostMeter;
  /** The registry /metrics serves; the live gauges are read from it. */
  metrics?: Metrics;
  ledger?: Ledger;
  /** "provider:model" ids to compare against (default: /v1/cost's default list). */
  apiModels?: string[];
  /** The latest device telemetry sample, as /v1/cost is given it. */
  telemetry?: () => unknown;
  /** ms since epoch (default Date.now); must be the meter's clock. */
  clock?: () => number;
  ledgerWindowMs?: number;
  ledgerTtlMs?: number;
}

export interface LedgerTableRow {
  key: string;
  requests: number;
  cancelled: number;
  prompt_tokens: number;
  completion_tokens: number;
  device_seconds: number;
  usd_usage: number;
  usd_allocation: number;
  /** USD per million tokens (prompt + completion) of the group, by basis; null without tokens. */
  usd_per_million_tokens: { usage: number | null; allocation: number | null };
}

export interface LedgerTables {
  since: string;
  /** When the rows were read from the ledger (they may be up to LEDGER_TTL_MS old). */
  as_of: string;
  by_tenant: LedgerTableRow[];
  by_model: LedgerTableRow[];
}

export interface PriceBars {
  /** One label per bar group: Tally on each basis, then each API model that has a price. */
  labels: string[];
  ids: string[];
  input: (number | null)[];
  output: (number | null)[];
}

export interface BreakEvenApi {
  id: string;
  label: string;
  usd_per_million_blended: number;
  /** Two points on log-log axes: API spend is proportional to tokens. */
  line: [number, number][];
  /** Where the deployment as configured starts to cost less than this API; null if it never does. */
  crossing: { tokens_per_month: number; usd_per_month: number } | null;
}

export interface BreakEvenPlot {
  x_min: number;
  x_max: number;
  /** Monthly cost of self-hosting against monthly tokens: the configured devices, then one more per capacity step. */
  self_hosted: [number, number][];
  apis: BreakEvenApi[];
  /** The window's token rate extrapolated to a month (the report's monthly.target_tokens) and its self-hosted cost; null without traffic. */
  current: { tokens_per_month: number; usd_per_month: number } | null;
}

export interface DashboardSnapshot {
  object: 'dashboard_snapshot';
  /** Increases with every snapshot this server computes; the page shows it (data-seq) so a test can match what it rendered. */
  seq: number;
  generated_at: string;
  model: string;
  live: {
    /** tally:num_requests_running / tally:num_requests_waiting as /metrics has them now (0 before the first step). */
    requests_running: number;
    requests_waiting: number;
    kv_cache_usage: number;
    /** Completion tokens of requests finished in `recent`'s window per second of it. */
    output_tokens_per_second: number | null;
  };
  recent: {
    window: CostWindowReport['window'];
    requests: number;
    tokens: CostWindowReport['tokens'];
    utilization: number;
  };
  /** Exactly GET /v1/cost?window=<meter's allocation window> at `generated_at`. */
  cost: CostWindowReport & { per_device_busy_seconds_since_start?: Record<string, number> };
  charts: { prices: PriceBars; break_even: BreakEvenPlot | null };
  ledger: LedgerTables | null;
}

const perMillion = (usd: number, tokens: number) => (tokens > 0 ? (usd / tokens) * 1e6 : null);

function tableRows(rows: LedgerRow[]): LedgerTableRow[] {
  return rows.map((r) => {
    const tokens = r.promptTokens + r.completionTokens;
    return {
      key: r.key,
      requests: r.requests,
      cancelled: r.cancelled,
      prompt_tokens: r.promptTokens,
      completion_tokens: r.completionTokens,
      device_seconds: r.prefillDeviceSeconds + r.decodeDeviceSeconds,
      usd_usage: r.usdUsage,
      usd_allocation: r.usdAllocation,
      usd_per_million_tokens: { usage: perMillion(r.usdUsage, tokens), allocation: perMillion(r.usdAllocation, tokens) },
    };
  });
}

function apiLabel(a: CostWindowReport['api_comparison'][number]): string {
  return a.name ?? a.id;
}

/** The bar chart: $/M input and output tokens, Tally on both bases against each priced API. */
export function priceBars(cost: CostWindowReport): PriceBars {
  const upm = cost.usd_per_million_tokens;
  const apis = cost.api_comparison.filter((a) => a.input_usd_per_million !== null || a.output_usd_per_million !== null);
  return {
    labels: ['Tally (usage)', 'Tally (allocation)', ...apis.map(apiLabel)],
    ids: ['tally:usage', 'tally:allocation', ...apis.map((a) => a.id)],
    input: [upm.usage.input, upm.allocation.input, ...apis.map((a) => a.input_usd_per_million)],
    output: [upm.usage.output, upm.allocation.output, ...apis.map((a) => a.output_usd_per_million)],
  };
}

const pow10Floor = (v: number) => 10 ** Math.floor(Math.log10(v));
const pow10Ceil = (v: number) => 10 ** Math.ceil(Math.log10(v));
/** The plot ends at most this many device capacities out (a step per added device). */
const MAX_STEPS = 100;

/**
 * The break-even plot: monthly cost against monthly tokens. Self-hosted, the configured devices cost
 * monthly.fixed_usd up to their capacity (the window's throughput, kept busy all month), and one more
 * device per further capacity step; an API costs tokens × its blended $/M at the measured mix. The
 * crossings are the report's break_even points. Null until a request has been measured.
 */
export function breakEvenPlot(cost: CostWindowReport): BreakEvenPlot | null {
  const capacity = cost.monthly.capacity_tokens;
  if (capacity === null || !(capacity > 0) || !(cost.devices > 0)) return null;
  const perDevice = capacity / cost.devices;
  const perDeviceUsd = cost.usd_per_device_hour * cost.monthly.hours;
  const priced = cost.api_comparison.filter((a) => a.blended_usd_per_million !== null && a.blended_usd_per_million > 0);
  const target = cost.monthly.target_tokens > 0 ? cost.monthly.target_tokens : null;
  const marks = [capacity, ...(target !== null ? [target] : []), ...priced.flatMap((a) => (a.break_even ? [a.break_even.tokens_per_month] : []))];
  const xMin = pow10Floor(Math.min(...marks) / 10);
  const xMax = Math.min(pow10Ceil(Math.max(...marks) * 10), perDevice * MAX_STEPS);

  // y = max(devices, ceil(x / perDevice)) × perDeviceUsd, as corner points.
  const selfHosted: [number, number][] = [];
  let devices = Math.max(cost.devices, Math.ceil(xMin / perDevice));
  selfHosted.push([xMin, devices * perDeviceUsd]);
  while (devices * perDevice < xMax) {
    selfHosted.push([devices * perDevice, devices * perDeviceUsd]);
    devices++;
    selfHosted.push([(devices - 1) * perDevice, devices * perDeviceUsd]);
  }
  selfHosted.push([xMax, devices * perDeviceUsd]);

  return {
    x_min: xMin,
    x_max: xMax,
    self_hosted: selfHosted,
    apis: priced.map((a) => {
      const usdPerToken = a.blended_usd_per_million! / 1e6;
      return {
        id: a.id,
        label: apiLabel(a),
        usd_per_million_blended: a.blended_usd_per_million!,
        line: [
          [xMin, xMin * usdPerToken],
          [xMax, xMax * usdPerToken],
        ],
        crossing: a.break_even ? { tokens_per_month: a.break_even.tokens_per_month, usd_per_month: a.break_even.api_usd_per_month } : null,
      };
    }),
    current: target === null ? null : { tokens_per_month: target, usd_per_month: Math.max(cost.devices, Math.ceil(target / perDevice)) * perDeviceUsd },
  };
}

/** Reads a gauge of `model` from the registry /metrics serves. */
async function gauge(metrics: Metrics | undefined, name: string, model: string): Promise<number> {
  const metric = metrics?.registry.getSingleMetric(name);
  if (!metric) return 0;
  const { values } = await metric.get();
  return values.find((v) => v.labels.model === model)?.value ?? 0;
}

/** Computes snapshots; the ledger tables are cached for ledgerTtlMs. */
export class SnapshotSource {
  private seq = 0;
  private ledgerCache?: { atMs: number; tables: LedgerTables };
  private readonly clock: () => number;

  constructor(private readonly sources: DashboardSources) {
    this.clock = sources.clock ?? Date.now;
  }

  private ledgerTables(now: number): LedgerTables | null {
    const { ledger } = this.sources;
    if (!ledger) return null;
    const ttl = this.sources.ledgerTtlMs ?? LEDGER_TTL_MS;
    if (this.ledgerCache && now - this.ledgerCache.atMs < ttl && now >= this.ledgerCache.atMs) return this.ledgerCache.tables;
    const since = new Date(now - (this.sources.ledgerWindowMs ?? LEDGER_WINDOW_MS));
    const tables: LedgerTables = {
      since: since.toISOString(),
      as_of: new Date(now).toISOString(),
      by_tenant: tableRows(ledger.query({ by: 'tenant', since })),
      by_model: tableRows(ledger.query({ by: 'model', since })),
    };
    this.ledgerCache = { atMs: now, tables };
    return tables;
  }

  async snapshot(): Promise<DashboardSnapshot> {
    const { meter, metrics } = this.sources;
    // The gauges resolve in microtasks: no engine step or finished request can land between them and `now`.
    const [running, waiting, kv] = await Promise.all([
      gauge(metrics, 'tally:num_requests_running', meter.model),
      gauge(metrics, 'tally:num_requests_waiting', meter.model),
      gauge(metrics, 'tally:kv_cache_usage_perc', meter.model),
    ]);
    const now = this.clock();
    const pricing: Pricing = { devices: meter.devices, devicePriceUsdPerHour: meter.devicePriceUsdPerHour, usdPerDeviceHour: meter.usdPerDeviceHour() };
    // As costRouter builds GET /v1/cost's body.
    const perDevice = meter.busyByDevice.size > 0 ? { per_device_busy_seconds_since_start: Object.fromEntries(meter.busyByDevice) } : {};
    const cost = { ...modelOf(meter), ...buildCostReport(meter.window(meter.allocationWindowMs, now), pricing, { apiModels: this.sources.apiModels, telemetry: this.sources.telemetry }), ...perDevice };
    const recent = buildCostReport(meter.window(RECENT_WINDOW_MS, now), pricing, { apiModels: [] });
    return {
      object: 'dashboard_snapshot',
      seq: ++this.seq,
      generated_at: new Date(now).toISOString(),
      model: meter.model,
      live: {
        requests_running: running,
        requests_waiting: waiting,
        kv_cache_usage: kv,
        output_tokens_per_second: recent.window.seconds > 0 ? recent.tokens.completion / recent.window.seconds : null,
      },
      recent: { window: recent.window, requests: recent.requests, tokens: recent.tokens, utilization: recent.utilization },
      cost,
      charts: { prices: priceBars(cost), break_even: breakEvenPlot(cost) },
      ledger: this.ledgerTables(now),
    };
  }
}
