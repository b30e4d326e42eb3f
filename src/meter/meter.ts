import type { StepRecord } from '../engine/protocol.ts';
import type { LiveCost, Metrics } from '../telemetry/metrics.ts';
import type { Ledger, LedgerRecord } from './ledger.ts';
import type { CostReport, FinishedRequest, Pricing, RequestMeter } from './types.ts';
import { perMillion, usdOf } from './cost-math.ts';

/**
 * Cost model.
 *
 * Device-seconds: engine seconds × `devices` (every forward pass occupies all of the engine's devices).
 * The engine splits each forward pass's wall time among its sequences by FLOPs (attribution.ts), so a
 * request arrives with prefill and decode seconds whose sum over all requests is the engine's busy time.
 *
 * Two bases, as OpenCost names them:
 *   usage      — busy device-seconds × price: usd.usage = (prefill + decode) device-seconds × rate / 3600,
 *                rate = device price per hour (+ measured power × power price, per device).
 *   allocation — all wall-clock device time since start, idle included, shared out by busy share:
 *                over a window, allocation = usage × F with F = max(1, wall-clock cost / busy cost) of
 *                that window. So allocation ≥ usage always, and over any window whose steps all belong
 *                to requests that finished in it, the requests' allocation sums to the device's whole
 *                wall-clock cost for the window. A response's usd.allocation uses F of the trailing
 *                `allocationWindowMs` (default 15 min) at the moment the request finished; the
 *                /v1/cost report applies F of its own window. F is 1 when the window saw no step.
 *
 * Time series: per-second buckets for the last 24 h in a ring (fixed memory, ~7 MB). Steps and requests
 * are placed at the meter clock's time of their arrival; wall-clock time accrues continuously.
 */
export interface CostMeterOptions {
  /** USD per device-hour. */
  devicePriceUsdPerHour: number;
  /** Devices the engine runs on (default 1). */
  devices?: number;
  /** Devices one engine step occupies: all of them for one engine (default), 1 for a pool of one-device workers. */
  devicesPerStep?: number;
  /** USD per kWh; used while power samples arrive through observePower(). */
  powerPriceUsdPerKwh?: number;
  ledger?: Ledger;
  metrics?: Metrics;
  /** ms since epoch (default Date.now). */
  clock?: () => number;
  /** When wall-clock device time starts counting (default: clock() at construction). */
  startMs?: number;
  /** The model label of engine-wide metrics. */
  model?: string;
  /** The model's weights' precision (fp32, fp16, int8, int4), for reports. */
  precision?: string;
  /** Trailing window for a response's allocation factor and the live gauges (default 15 min). */
  allocationWindowMs?: number;
}

/** Sums over a window of the per-second buckets. Device-seconds count `devices`. */
export interface WindowTotals {
  startMs: number;
  endMs: number;
  wallDeviceSeconds: number;
  wallUsd: number;
  busyDeviceSeconds: number;
  busyUsd: number;
  requests: number;
  cancelled: number;
  promptTokens: number;
  /** Of the prompt tokens, those the prefix cache held (absent: none). */
  cachedTokens?: number;
  completionTokens: number;
  prefillDeviceSeconds: number;
  decodeDeviceSeconds: number;
  prefillUsd: number;
  decodeUsd: number;
  /** Energy drawn while power was measured, and for how many wall-clock seconds it was. */
  energyJoules?: number;
  powerMeasuredSeconds?: number;
}

const FIELDS = ['wallDeviceSeconds', 'wallUsd', 'busyDeviceSeconds', 'busyUsd', 'requests', 'cancelled', 'promptTokens', 'cachedTokens', 'completionTokens', 'prefillDeviceSeconds', 'decodeDeviceSeconds', 'prefillUsd', 'decodeUsd', 'energyJoules', 'powerMeasuredSeconds'] as const;
type Field = (typeof FIELDS)[number];
const INDEX = Object.fromEntries(FIELDS.map((f, i) => [f, i])) as Record<Field, number>;
const N = FIELDS.length;
export const RING_SECONDS = 86_400;
/** Two spare slots so that a full 24 h window starting mid-second is still whole. */
const SLOTS = RING_SECONDS + 2;
const MAX_UNSAVED = 100_000;

class SecondBuckets {
  private readonly data = new Float64Array(SLOTS * N);
  private readonly second = new Float64Array(SLOTS).fill(-1);

  add(ms: number, field: Field, value: number): void {
    const s = Math.floor(ms / 1000);
    const slot = s % SLOTS;
    if (this.second[slot] !== s) {
      this.data.fill(0, slot * N, slot * N + N);
      this.second[slot] = s;
    }
    this.data[slot * N + INDEX[field]] += value;
  }

  /** Sums buckets of seconds [fromS, toS]. */
  sum(fromS: number, toS: number): Record<Field, number> {
    const out = new Float64Array(N);
    for (let s = Math.max(fromS, toS - SLOTS + 1); s <= toS; s++) {
      const slot = s % SLOTS;
      if (this.second[slot] !== s) continue;
      for (let f = 0; f < N; f++) out[f] += this.data[slot * N + f];
    }
    return Object.fromEntries(FIELDS.map((f, i) => [f, out[i]])) as Record<Field, number>;
  }
}

/** input: over all prompt tokens; input_uncached: over those computed (cached ones took no prefill). */
type PerMillion = { input: number | null; input_uncached: number | null; output: number | null; blended: number | null };

export interface UnitCosts {
  /** Busy share of wall-clock device time, 0..1. */
  utilization: number;
  /** F: allocation = usage × F. */
  allocationFactor: number;
  usd: { usage: number; allocation: number };
  usdPerMillion: { usage: PerMillion; allocation: PerMillion };
}

const scale = (v: number | null, f: number) => (v === null ? null : v * f);

/** Utilization, allocation factor, costs and $/M tokens of a window. */
export function unitCosts(t: WindowTotals): UnitCosts {
  const utilization = t.wallDeviceSeconds > 0 ? Math.min(1, t.busyDeviceSeconds / t.wallDeviceSeconds) : 0;
  const factor = t.busyUsd > 0 ? Math.max(1, t.wallUsd / t.busyUsd) : 1;
  const usage = t.prefillUsd + t.decodeUsd;
  const u: PerMillion = {
    input: perMillion(t.prefillUsd, t.promptTokens),
    input_uncached: perMillion(t.prefillUsd, t.promptTokens - (t.cachedTokens ?? 0)),
    output: perMillion(t.decodeUsd, t.completionTokens),
    blended: perMillion(usage, t.promptTokens + t.completionTokens),
  };
  return {
    utilization,
    allocationFactor: factor,
    usd: { usage, allocation: usage * factor },
    usdPerMillion: { usage: u, allocation: { input: scale(u.input, factor), input_uncached: scale(u.input_uncached, factor), output: scale(u.output, factor), blended: scale(u.blended, factor) } },
  };
}

/** The response headers that repeat a CostReport's figures. */
export function costHeaders(cost: CostReport): Record<string, string> {
  return {
    'x-tally-device-seconds-prefill': String(cost.device_seconds.prefill),
    'x-tally-device-seconds-decode': String(cost.device_seconds.decode),
    'x-tally-cost-usd-usage': String(cost.usd.usage),
    'x-tally-cost-usd-allocation': String(cost.usd.allocation),
    'x-tally-device-price-usd-per-hour': String(cost.device_price_usd_per_hour),
  };
}

export class CostMeter implements RequestMeter {
  readonly devicePriceUsdPerHour: number;
  readonly devices: number;
  readonly devicesPerStep: number;
  /** Busy device-seconds since start by device, for a pool of workers. */
  readonly busyByDevice = new Map<string, number>();
  readonly powerPriceUsdPerKwh?: number;
  readonly startMs: number;
  readonly model: string;
  readonly precision?: string;
  readonly allocationWindowMs: number;
  private readonly clock: () => number;
  private readonly ledger?: Ledger;
  private readonly metrics?: Metrics;
  private readonly buckets = new SecondBuckets();
  private lastMs: number;
  private watts?: number;
  private wallTotal = 0;
  private busyTotal = 0;
  private unsaved: LedgerRecord[] = [];

  constructor(options: CostMeterOptions) {
    if (!(options.devicePriceUsdPerHour >= 0)) throw new Error('the device price must be a non-negative number');
    this.devicePriceUsdPerHour = options.devicePriceUsdPerHour;
    this.devices = options.devices ?? 1;
    if (!(this.devices > 0)) throw new Error('devices must be positive');
    this.devicesPerStep = options.devicesPerStep ?? this.devices;
    this.powerPriceUsdPerKwh = options.powerPriceUsdPerKwh;
    this.clock = options.clock ?? Date.now;
    this.startMs = options.startMs ?? this.clock();
    this.lastMs = this.startMs;
    this.model = options.model ?? 'default';
    this.precision = options.precision;
    this.allocationWindowMs = options.allocationWindowMs ?? 15 * 60_000;
    this.ledger = options.ledger;
    this.metrics = options.metrics;
    this.metrics?.setLiveSource(() => this.live());
  }

  /** The prices now (power, where measured, moves the hourly rate). */
  pricing(): Pricing {
    return { devices: this.devices, devicePriceUsdPerHour: this.devicePriceUsdPerHour, usdPerDeviceHour: this.usdPerDeviceHour() };
  }

  /** USD per device-hour now: the device price plus measured power at the power price. */
  usdPerDeviceHour(): number {
    const power = this.powerPriceUsdPerKwh !== undefined && this.watts !== undefined ? ((this.watts / 1000) * this.powerPriceUsdPerKwh) / this.devices : 0;
    return this.devicePriceUsdPerHour + power;
  }

  /** Accrues wall-clock device time (and its cost) up to `now`. */
  private advance(now: number): void {
    if (now <= this.lastMs) return;
    const perSecond = this.usdPerDeviceHour() / 3600;
    this.wallTotal += ((now - this.lastMs) / 1000) * this.devices;
    let t = Math.max(this.lastMs, now - SLOTS * 1000);
    while (t < now) {
      const next = Math.min(now, (Math.floor(t / 1000) + 1) * 1000);
      const ds = ((next - t) / 1000) * this.devices;
      this.buckets.add(t, 'wallDeviceSeconds', ds);
      this.buckets.add(t, 'wallUsd', ds * perSecond);
      if (this.watts !== undefined) {
        this.buckets.add(t, 'energyJoules', (this.watts * (next - t)) / 1000);
        this.buckets.add(t, 'powerMeasuredSeconds', (next - t) / 1000);
      }
      t = next;
    }
    this.lastMs = now;
  }

  /** An engine step finished: its busy time is device time in use. */
  observeStep(record: StepRecord): void {
    const now = this.clock();
    this.advance(now);
    const busy = record.busySeconds * this.devicesPerStep;
    this.busyTotal += busy;
    if (record.device !== undefined) this.busyByDevice.set(record.device, (this.busyByDevice.get(record.device) ?? 0) + busy);
    this.buckets.add(now, 'busyDeviceSeconds', busy);
    this.buckets.add(now, 'busyUsd', usdOf(busy, this.usdPerDeviceHour()));
    this.metrics?.observeStep(record, this.model, busy);
  }

  /** A power sample: watts drawn by all of the engine's devices, in effect until the next sample. */
  observePower(watts: number): void {
    if (!(watts >= 0)) return;
    this.advance(this.clock());
    this.watts = watts;
  }

  requestFinished(req: FinishedRequest): CostReport {
    const now = this.clock();
    this.advance(now);
    const rate = this.usdPerDeviceHour();
    const cached = Math.max(0, Math.min(req.cachedTokens ?? 0, req.promptTokens));
    const prefill = Math.max(0, req.prefillSeconds) * this.devicesPerStep;
    const decode = Math.max(0, req.decodeSeconds) * this.devicesPerStep;
    const prefillUsd = usdOf(prefill, rate);
    const decodeUsd = usdOf(decode, rate);
    const usage = prefillUsd + decodeUsd;
    const factor = unitCosts(this.window(this.allocationWindowMs, now)).allocationFactor;
    const add = (field: Field, v: number) => this.buckets.add(now, field, v);
    add('requests', 1);
    if (req.status === 'cancelled') add('cancelled', 1);
    add('promptTokens', req.promptTokens);
    add('cachedTokens', cached);
    add('completionTokens', req.completionTokens);
    add('prefillDeviceSeconds', prefill);
    add('decodeDeviceSeconds', decode);
    add('prefillUsd', prefillUsd);
    add('decodeUsd', decodeUsd);

    const report: CostReport = {
      device_seconds: { prefill, decode },
      usd: { usage, allocation: usage * factor },
      device_price_usd_per_hour: this.devicePriceUsdPerHour,
      usd_per_device_hour: rate,
      devices: this.devices,
      allocation_factor: factor,
      tokens: { prompt: req.promptTokens, cached_prompt: cached, completion: req.completionTokens },
      usd_per_million_tokens: {
        usage: { input: perMillion(prefillUsd, req.promptTokens), output: perMillion(decodeUsd, req.completionTokens) },
        allocation: { input: scale(perMillion(prefillUsd, req.promptTokens), factor), output: scale(perMillion(decodeUsd, req.completionTokens), factor) },
      },
    };
    this.record({
      id: req.id,
      endMs: req.endMs,
      arrivalMs: req.arrivalMs,
      tenant: req.tenant,
      model: req.model,
      status: req.status,
      promptTokens: req.promptTokens,
      cachedTokens: cached,
      completionTokens: req.completionTokens,
      prefillDeviceSeconds: prefill,
      decodeDeviceSeconds: decode,
      usdUsage: usage,
      usdAllocation: report.usd.allocation,
      devicePriceUsdPerHour: this.devicePriceUsdPerHour,
    });
    this.metrics?.requestFinished(req, report);
    return report;
  }

  requestRejected(model: string, tenant: string, status: number): void {
    this.metrics?.requestRejected(model, tenant, status);
  }

  /** Commits to the ledger before returning; rows that failed to commit are retried with the next. */
  private record(row: LedgerRecord): void {
    if (!this.ledger) return;
    this.unsaved.push(row);
    this.flush();
  }

  /** Writes rows whose commit failed earlier; false if some are still unsaved. */
  flush(): boolean {
    if (!this.ledger) return true;
    while (this.unsaved.length > 0) {
      try {
        this.ledger.insert(this.unsaved[0]);
      } catch {
        this.metrics?.ledgerWriteFailed();
        if (this.unsaved.length > MAX_UNSAVED) this.unsaved.shift();
        return false;
      }
      this.unsaved.shift();
    }
    return true;
  }

  /** Totals over the trailing `windowMs` (at most 24 h), in whole seconds: from the second holding now − windowMs to now. */
  window(windowMs: number, now = this.clock()): WindowTotals {
    if (!(windowMs > 0) || windowMs > RING_SECONDS * 1000) throw new RangeError(`the window must be between 0 and ${RING_SECONDS} s`);
    this.advance(now);
    const fromS = Math.floor(Math.max(now - windowMs, this.startMs) / 1000);
    const sums = this.buckets.sum(fromS, Math.floor(now / 1000));
    return { startMs: Math.max(fromS * 1000, this.startMs), endMs: now, ...sums };
  }

  /** Figures for the Prometheus gauges. */
  live(): LiveCost {
    const costs = unitCosts(this.window(this.allocationWindowMs));
    return {
      model: this.model,
      utilization: costs.utilization,
      usdPerMillion: costs.usdPerMillion,
      wallDeviceSeconds: this.wallTotal,
      idleDeviceSeconds: Math.max(0, this.wallTotal - this.busyTotal),
    };
  }
}
