import type { TelemetrySample } from './device.ts';
import type { Request, Response } from 'express';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { StepRecord } from '../engine/protocol.ts';
import type { CostReport, FinishedRequest } from '../meter/types.ts';

type Basis = 'usage' | 'allocation';
type Direction = 'input' | 'output' | 'blended';

/** What the cost gauges read at scrape time (the meter supplies it). */
export interface LiveCost {
  model: string;
  /** Busy over wall-clock device time, trailing window. */
  utilization: number;
  usdPerMillion: Record<Basis, Record<Direction, number | null>>;
  /** Device-seconds since the meter started: all of them, and those with no step running. */
  wallDeviceSeconds: number;
  idleDeviceSeconds: number;
}

// Bucket bounds follow vLLM's.
const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160, 640, 2560];
const ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
const E2E_BUCKETS = [0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920, 7680];

/**
 * Prometheus metrics in their own registry, vLLM-style names under `tally:`. Per-request series carry
 * `model` and `tenant` (the API key's name, never the key); engine-wide ones carry `model`.
 */
export class Metrics {
  readonly registry = new Registry();
  private live?: () => LiveCost;
  private idleReported = 0;
  private wallReported = 0;

  private readonly running = this.gauge('tally:num_requests_running', 'Requests in the engine (prefilling or decoding).', ['model']);
  private readonly waiting = this.gauge('tally:num_requests_waiting', 'Requests waiting for admission.', ['model']);
  private readonly kvUsage = this.gauge('tally:kv_cache_usage_perc', 'KV-cache usage: 1 means full.', ['model']);
  private readonly kvBytes = this.gauge('tally:kv_cache_bytes', 'Bytes of KV-cache memory the engine holds.', ['model']);
  private readonly promptTokens = this.counter('tally:prompt_tokens_total', 'Prompt tokens of finished requests.', ['model', 'tenant']);
  private readonly cachedPromptTokens = this.counter('tally:cached_prompt_tokens_total', 'Prompt tokens of finished requests that the prefix cache held (hit rate: over tally:prompt_tokens_total).', ['model', 'tenant']);
  private readonly generationTokens = this.counter('tally:generation_tokens_total', 'Generated tokens of finished requests.', ['model', 'tenant']);
  private readonly finished = this.counter('tally:request_success_total', 'Finished requests by how they ended.', ['model', 'tenant', 'finished_reason']);
  private readonly rejected = this.counter('tally:request_rejected_total', 'Requests refused before reaching the engine, by HTTP status.', ['model', 'tenant', 'status']);
  private readonly ttft = new Histogram({ name: 'tally:time_to_first_token_seconds', help: 'Seconds from arrival to the first token.', labelNames: ['model', 'tenant'], buckets: TTFT_BUCKETS, registers: [this.registry] });
  private readonly itl = new Histogram({ name: 'tally:inter_token_latency_seconds', help: 'Seconds between successive tokens.', labelNames: ['model', 'tenant'], buckets: ITL_BUCKETS, registers: [this.registry] });
  private readonly e2e = new Histogram({ name: 'tally:e2e_request_latency_seconds', help: 'Seconds from arrival to the end of the request.', labelNames: ['model', 'tenant'], buckets: E2E_BUCKETS, registers: [this.registry] });
  private readonly deviceSeconds = this.counter('tally:device_seconds_total', 'Device-seconds attributed to finished requests, by phase.', ['model', 'tenant', 'phase']);
  private readonly costUsd = this.counter('tally:cost_usd_total', 'USD attributed to finished requests, by basis (usage: busy time; allocation: idle time shared out).', ['model', 'tenant', 'basis']);
  private readonly busySeconds = this.counter('tally:device_busy_seconds_total', 'Device-seconds of engine steps (forward passes).', ['model']);
  private readonly ledgerErrors = this.counter('tally:ledger_write_errors_total', 'Ledger writes that failed (retried with the next write).', []);

  constructor() {
    const self = this;
    new Counter({
      name: 'tally:device_idle_seconds_total',
      help: 'Device-seconds with no engine step running.',
      labelNames: ['model'],
      registers: [this.registry],
      collect() {
        const live = self.live?.();
        if (!live) return;
        this.inc({ model: live.model }, Math.max(0, live.idleDeviceSeconds - self.idleReported));
        self.idleReported = Math.max(self.idleReported, live.idleDeviceSeconds);
      },
    });
    new Counter({
      name: 'tally:device_wall_seconds_total',
      help: 'Wall-clock device-seconds since start (allocation basis).',
      labelNames: ['model'],
      registers: [this.registry],
      collect() {
        const live = self.live?.();
        if (!live) return;
        this.inc({ model: live.model }, Math.max(0, live.wallDeviceSeconds - self.wallReported));
        self.wallReported = Math.max(self.wallReported, live.wallDeviceSeconds);
      },
    });
    new Gauge({
      name: 'tally:device_utilization',
      help: 'Busy share of wall-clock device time over the trailing window.',
      labelNames: ['model'],
      registers: [this.registry],
      collect() {
        const live = self.live?.();
        if (live) this.set({ model: live.model }, live.utilization);
      },
    });
    new Gauge({
      name: 'tally:usd_per_million_tokens',
      help: 'Current USD per million tokens over the trailing window, by basis and direction.',
      labelNames: ['model', 'basis', 'direction'],
      registers: [this.registry],
      collect() {
        const live = self.live?.();
        if (!live) return;
        this.reset();
        for (const basis of ['usage', 'allocation'] as const) {
          for (const direction of ['input', 'output', 'blended'] as const) {
            const v = live.usdPerMillion[basis][direction];
            if (v !== null) this.set({ model: live.model, basis, direction }, v);
          }
        }
      },
    });
  }

  private gauge<L extends string>(name: string, help: string, labelNames: L[]) {
    return new Gauge<L>({ name, help, labelNames, registers: [this.registry] });
  }

  private counter<L extends string>(name: string, help: string, labelNames: L[]) {
    return new Counter<L>({ name, help, labelNames, registers: [this.registry] });
  }

  /**
   * Device telemetry, read on every scrape. A figure the source cannot give has no series (absent,
   * not zero); tally:device_telemetry_info says which source answered.
   */
  setTelemetrySource(latest: () => TelemetrySample | undefined): void {
    const figures = [
      ['tally:device_hw_utilization', 'Device busy share 0..1 as the device reports it (GPU kernels, or CPU load).', 'utilization'],
      ['tally:device_power_watts', 'Power drawn by the device, watts.', 'powerWatts'],
      ['tally:device_memory_used_bytes', 'Device memory in use, bytes.', 'memoryUsedBytes'],
      ['tally:device_energy_joules', 'Energy counter of the device since its driver loaded, joules.', 'energyJoules'],
    ] as const;
    new Gauge({
      name: 'tally:device_telemetry_info',
      help: 'Which telemetry source answered (1 for the current source).',
      labelNames: ['source'],
      registers: [this.registry],
      collect() {
        this.reset();
        this.set({ source: latest()?.source ?? 'none' }, 1);
      },
    });
    for (const [name, help, field] of figures) {
      new Gauge({
        name,
        help,
        labelNames: ['device', 'name'],
        registers: [this.registry],
        collect() {
          this.reset();
          for (const d of latest()?.devices ?? []) {
            const value = d[field];
            if (value !== null) this.set({ device: String(d.index), name: d.name }, value);
          }
        },
      });
    }
  }

  /** The meter's live figures, read on every scrape. */
  setLiveSource(source: () => LiveCost): void {
    this.live = source;
  }

  observeStep(record: StepRecord, model: string, busyDeviceSeconds: number): void {
    this.running.set({ model }, record.running);
    this.waiting.set({ model }, record.waiting);
    this.kvUsage.set({ model }, record.kvCapacityTokens > 0 ? record.kvUsedTokens / record.kvCapacityTokens : 0);
    this.kvBytes.set({ model }, record.kvBytes);
    if (busyDeviceSeconds > 0) this.busySeconds.inc({ model }, busyDeviceSeconds);
  }

  requestFinished(req: FinishedRequest, cost: CostReport): void {
    const labels = { model: req.model, tenant: req.tenant };
    this.promptTokens.inc(labels, req.promptTokens);
    this.cachedPromptTokens.inc(labels, req.cachedTokens ?? 0);
    this.generationTokens.inc(labels, req.completionTokens);
    this.finished.inc({ ...labels, finished_reason: req.status });
    if (req.ttftSeconds !== undefined) this.ttft.observe(labels, req.ttftSeconds);
    for (const gap of req.interTokenSeconds) this.itl.observe(labels, gap);
    this.e2e.observe(labels, Math.max(0, (req.endMs - req.arrivalMs) / 1000));
    this.deviceSeconds.inc({ ...labels, phase: 'prefill' }, cost.device_seconds.prefill);
    this.deviceSeconds.inc({ ...labels, phase: 'decode' }, cost.device_seconds.decode);
    this.costUsd.inc({ ...labels, basis: 'usage' }, cost.usd.usage);
    this.costUsd.inc({ ...labels, basis: 'allocation' }, cost.usd.allocation);
  }

  requestRejected(model: string, tenant: string, status: number): void {
    this.rejected.inc({ model, tenant, status: String(status) });
  }

  ledgerWriteFailed(): void {
    this.ledgerErrors.inc();
  }
}

/** GET /metrics in Prometheus' text format. */
export function metricsHandler(metrics: Metrics) {
  return async (_req: Request, res: Response): Promise<void> => {
    res.set('Content-Type', metrics.registry.contentType);
    res.send(await metrics.registry.metrics());
  };
}
