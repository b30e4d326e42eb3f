import { describe, expect, it } from 'vitest';
import { type ModelShape, chunkFlops, splitSeconds } from '../src/meter/attribution.ts';
import { CostMeter, costHeaders, unitCosts } from '../src/meter/meter.ts';
import type { FinishedRequest } from '../src/meter/types.ts';
import { Scheduler } from '../src/engine/core/scheduler.ts';
import type { RequestEvent, StepRecord } from '../src/engine/protocol.ts';
import type { ForwardRow, ModelRunner } from '../src/engine/runners/runner.ts';
import type { TextTokenizer } from '../src/model/tokenizer.ts';
import { Metrics } from '../src/telemetry/metrics.ts';

const SHAPE: ModelShape = { layers: 4, hidden: 256, heads: 8, kvHeads: 4, headDim: 32, ffn: 688, vocab: 512 };

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function step(over: Partial<StepRecord> = {}): StepRecord {
  return {
    startMs: 0, endMs: 0, busySeconds: 0, prefillSeconds: 0, decodeSeconds: 0, prefillTokens: 0, decodeTokens: 0,
    running: 1, waiting: 0, kvUsedTokens: 10, kvCapacityTokens: 100, kvBytes: 0, ...over,
  };
}

function finished(over: Partial<FinishedRequest> = {}): FinishedRequest {
  return {
    id: `r${Math.random()}`, model: 'm', tenant: 'alice', status: 'completed', promptTokens: 100, completionTokens: 50,
    prefillSeconds: 0.2, decodeSeconds: 0.8, arrivalMs: 0, endMs: 1000, ttftSeconds: 0.1, interTokenSeconds: [0.02, 0.03], ...over,
  };
}

/** A clock the test moves by hand. */
function manualClock(startMs: number) {
  let now = startMs;
  return { now: () => now, advance: (ms: number) => (now += ms) };
}

describe('attribution', () => {
  it('splits every step among its sequences so the parts sum to the step time', () => {
    const r = rng(7);
    for (let trial = 0; trial < 1000; trial++) {
      const n = 1 + Math.floor(r() * 40);
      const seconds = r() * 0.5;
      const prefill = r() < 0.5;
      const weights = Array.from({ length: n }, () => chunkFlops(SHAPE, Math.floor(r() * 2000), prefill ? 1 + Math.floor(r() * 512) : 1));
      const parts = splitSeconds(seconds, weights);
      expect(parts).toHaveLength(n);
      expect(Math.abs(parts.reduce((a, b) => a + b, 0) - seconds)).toBeLessThanOrEqual(1e-15 + seconds * 1e-12);
      const total = weights.reduce((a, b) => a + b, 0);
      parts.forEach((p, i) => expect(p).toBeCloseTo((seconds * weights[i]) / total, 12));
    }
  });

  it('a longer context costs more per decode token, a longer chunk more per prefill', () => {
    expect(chunkFlops(SHAPE, 1000, 1)).toBeGreaterThan(chunkFlops(SHAPE, 10, 1));
    expect(chunkFlops(SHAPE, 0, 256)).toBeGreaterThan(chunkFlops(SHAPE, 0, 16));
  });

  it('the scheduler charges requests exactly the busy time of its steps, prefill and decode apart', async () => {
    const r = rng(11);
    const vocab = 16;
    const lengths = new Map<number, number>();
    const runner: ModelRunner = {
      kind: 'slot',
      vocabSize: vocab,
      open: (seq) => void lengths.set(seq, 0),
      close: (seq) => void lengths.delete(seq),
      cachedLength: (seq) => lengths.get(seq) ?? 0,
      kvBytes: () => 0,
      kvElementBytes: 4,
      topLogits: 0,
      release: async () => {},
      forward: async (rows: ForwardRow[]) => {
        for (const row of rows) lengths.set(row.seq, (lengths.get(row.seq) ?? 0) + row.tokens.length);
        return { logits: rows.map(() => Float32Array.from({ length: vocab }, () => r())), runSeconds: 0.001 + r() * 0.05 };
      },
    };
    const tokenizer = { decodeStream: () => ({ push: () => 'x', flush: () => '' }) } as unknown as TextTokenizer;
    const steps: StepRecord[] = [];
    const costs = new Map<string, { prefillSeconds: number; decodeSeconds: number }>();
    let done!: () => void;
    const allDone = new Promise<void>((resolve) => (done = resolve));
    const N = 24;
    const onEvents = (events: RequestEvent[]) => {
      for (const e of events) {
        if (e.finish) {
          costs.set(e.id, e.cost!);
          if (costs.size === N) done();
        }
      }
    };
    const scheduler = new Scheduler(runner, tokenizer, SHAPE, [], { maxNumSeqs: 6, maxNumBatchedTokens: 64, maxModelLen: 512, kvCapacityTokens: 4096 }, onEvents, (s) => steps.push(s));
    const running = scheduler.run();
    const sampling = { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0, seed: 1 };
    for (let i = 0; i < N; i++) {
      const promptIds = Array.from({ length: 5 + Math.floor(r() * 150) }, () => Math.floor(r() * vocab));
      scheduler.submit({ id: `q${i}`, promptIds, maxTokens: 1 + Math.floor(r() * 30), minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], sampling });
    }
    await allDone;
    scheduler.stop();
    await running;

    const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
    const req = [...costs.values()];
    const stepPrefill = sum(steps.map((s) => s.prefillSeconds));
    const stepDecode = sum(steps.map((s) => s.decodeSeconds));
    expect(steps.length).toBeGreaterThan(10);
    for (const s of steps) expect(s.busySeconds).toBeCloseTo(s.prefillSeconds + s.decodeSeconds, 12);
    expect(sum(req.map((c) => c.prefillSeconds))).toBeCloseTo(stepPrefill, 10);
    expect(sum(req.map((c) => c.decodeSeconds))).toBeCloseTo(stepDecode, 10);

    // The meter sees the same totals: busy device time from steps == device-seconds of the requests.
    const clock = manualClock(1_000_000);
    const meter = new CostMeter({ devicePriceUsdPerHour: 3.6, devices: 2, clock: clock.now });
    for (const s of steps) {
      clock.advance(10);
      meter.observeStep(s);
    }
    for (const [id, c] of costs) meter.requestFinished(finished({ id, ...c }));
    const w = meter.window(3_600_000);
    expect(w.busyDeviceSeconds).toBeCloseTo(2 * (stepPrefill + stepDecode), 10);
    expect(w.prefillDeviceSeconds + w.decodeDeviceSeconds).toBeCloseTo(w.busyDeviceSeconds, 10);
  });
});

describe('CostMeter', () => {
  it("a request's cost is its device-seconds × the price", () => {
    const clock = manualClock(5_000_000);
    for (const [price, devices] of [[2.5, 1], [3.78, 8], [0.08925, 1]] as const) {
      const meter = new CostMeter({ devicePriceUsdPerHour: price, devices, clock: clock.now });
      clock.advance(1000);
      meter.observeStep(step({ busySeconds: 0.7 }));
      const cost = meter.requestFinished(finished({ prefillSeconds: 0.25, decodeSeconds: 0.45 }));
      expect(cost.device_seconds).toEqual({ prefill: 0.25 * devices, decode: 0.45 * devices });
      expect(cost.usd.usage).toBeCloseTo(((0.25 + 0.45) * devices * price) / 3600, 15);
      expect(cost.device_price_usd_per_hour).toBe(price);
      expect((cost.usd_per_million_tokens as any).usage.input).toBeCloseTo((((0.25 * devices * price) / 3600) / 100) * 1e6, 12);
      const headers = costHeaders(cost);
      expect(Number(headers['x-tally-cost-usd-usage'])).toBe(cost.usd.usage);
      expect(Number(headers['x-tally-device-seconds-prefill'])).toBe(cost.device_seconds.prefill);
    }
  });

  it('allocation ≥ usage, and idle time raises allocation by wall-clock / busy time', () => {
    const clock = manualClock(10_000_000);
    const meter = new CostMeter({ devicePriceUsdPerHour: 36, clock: clock.now, allocationWindowMs: 60_000 });
    // 10 s idle, then a 2 s busy stretch of steps, then the request finishes: window wall 12 s, busy 2 s.
    clock.advance(10_000);
    for (let i = 0; i < 20; i++) {
      clock.advance(100);
      meter.observeStep(step({ busySeconds: 0.1, prefillSeconds: 0.1 }));
    }
    const cost = meter.requestFinished(finished({ prefillSeconds: 0.5, decodeSeconds: 1.5 }));
    expect(cost.usd.usage).toBeCloseTo((2 * 36) / 3600, 12);
    expect(cost.allocation_factor).toBeCloseTo(12 / 2, 9);
    expect(cost.usd.allocation).toBeCloseTo((12 * 36) / 3600, 9);

    // A step that began before the meter started reports more busy time than the wall clock has run:
    // the factor stays at 1, never below.
    const fresh = new CostMeter({ devicePriceUsdPerHour: 36, clock: clock.now });
    clock.advance(100);
    fresh.observeStep(step({ busySeconds: 1 }));
    const early = fresh.requestFinished(finished({ prefillSeconds: 0.4, decodeSeconds: 0.6 }));
    expect(early.allocation_factor).toBe(1);
    expect(early.usd.allocation).toBe(early.usd.usage);
    expect(unitCosts(fresh.window(60_000)).usd.allocation).toBe(unitCosts(fresh.window(60_000)).usd.usage);

    // Random workloads: allocation never below usage.
    const r = rng(3);
    for (let i = 0; i < 300; i++) {
      clock.advance(r() * 5000);
      if (r() < 0.7) meter.observeStep(step({ busySeconds: r() * 0.2 }));
      const c = meter.requestFinished(finished({ prefillSeconds: r() * 0.1, decodeSeconds: r() * 0.3 }));
      expect(c.usd.allocation).toBeGreaterThanOrEqual(c.usd.usage);
    }
  });

  it('window math: wall, busy, idle, $/M and allocation over a window with an injected clock', () => {
    const start = 1_800_000_000_000; // whole seconds
    const clock = manualClock(start);
    const price = 7.2; // USD/h = 0.002 USD/s
    const meter = new CostMeter({ devicePriceUsdPerHour: price, clock: clock.now });
    // t = 0..100 s idle; 100..110 s: ten steps of 0.5 s; a request finishes at 110 s.
    clock.advance(100_000);
    for (let i = 0; i < 10; i++) {
      clock.advance(1000);
      meter.observeStep(step({ busySeconds: 0.5 }));
    }
    meter.requestFinished(finished({ promptTokens: 400, completionTokens: 100, prefillSeconds: 1, decodeSeconds: 4 }));
    // Another 50 s of idle.
    clock.advance(50_000);

    const all = meter.window(3_600_000);
    expect(all.startMs).toBe(start);
    expect(all.wallDeviceSeconds).toBeCloseTo(160, 9);
    expect(all.busyDeviceSeconds).toBeCloseTo(5, 12);
    expect(all.requests).toBe(1);
    const c = unitCosts(all);
    expect(c.utilization).toBeCloseTo(5 / 160, 12);
    expect(c.usd.usage).toBeCloseTo(5 * 0.002, 12);
    // All the window's steps belong to its requests: allocation is the device's whole wall-clock cost.
    expect(c.usd.allocation).toBeCloseTo(160 * 0.002, 9);
    expect(c.usd.allocation).toBeCloseTo(all.wallUsd, 9);
    expect(c.usdPerMillion.usage.input).toBeCloseTo(((1 * 0.002) / 400) * 1e6, 9);
    expect(c.usdPerMillion.usage.output).toBeCloseTo(((4 * 0.002) / 100) * 1e6, 9);
    expect(c.usdPerMillion.usage.blended).toBeCloseTo(((5 * 0.002) / 500) * 1e6, 9);
    expect(c.usdPerMillion.allocation.blended).toBeCloseTo(((160 * 0.002) / 500) * 1e6, 6);

    // The last 60 s: the steps at 101..110 s fall inside (window starts at 100 s), the request too.
    const last60 = meter.window(60_000);
    expect(last60.startMs).toBe(start + 100_000);
    expect(last60.wallDeviceSeconds).toBeCloseTo(60, 9);
    expect(last60.busyDeviceSeconds).toBeCloseTo(5, 12);
    // The last 40 s: nothing but idle.
    const last40 = meter.window(40_000);
    expect(last40.wallDeviceSeconds).toBeCloseTo(40, 9);
    expect(last40.busyDeviceSeconds).toBe(0);
    expect(last40.requests).toBe(0);
    expect(unitCosts(last40).utilization).toBe(0);
    // Windows longer than the ring are refused.
    expect(() => meter.window(25 * 3_600_000)).toThrow(RangeError);
  });

  it('keeps 24 h of buckets and forgets older ones', () => {
    const clock = manualClock(1_800_000_000_000);
    const meter = new CostMeter({ devicePriceUsdPerHour: 1, clock: clock.now });
    clock.advance(1000);
    meter.observeStep(step({ busySeconds: 0.5 }));
    meter.requestFinished(finished());
    clock.advance(25 * 3_600_000);
    const w = meter.window(24 * 3_600_000);
    expect(w.busyDeviceSeconds).toBe(0);
    expect(w.requests).toBe(0);
    expect(w.wallDeviceSeconds).toBeCloseTo(24 * 3600, 6);
  });

  it('power samples add measured watts × the power price to the hourly rate', () => {
    const clock = manualClock(2_000_000_000_000);
    const meter = new CostMeter({ devicePriceUsdPerHour: 2, devices: 2, powerPriceUsdPerKwh: 0.1, clock: clock.now });
    expect(meter.usdPerDeviceHour()).toBe(2); // nothing measured yet
    meter.observePower(1400); // two devices at 700 W: 1.4 kWh per hour = 0.14 USD/h, 0.07 per device
    expect(meter.usdPerDeviceHour()).toBeCloseTo(2.07, 12);
    clock.advance(1000);
    meter.observeStep(step({ busySeconds: 1 }));
    const cost = meter.requestFinished(finished({ prefillSeconds: 0, decodeSeconds: 1 }));
    expect(cost.usd.usage).toBeCloseTo((2 * 2.07) / 3600, 12);
  });
});

describe('metrics', () => {
  it('exposes labelled serving and cost series, never an API key', async () => {
    const clock = manualClock(1_900_000_000_000);
    const metrics = new Metrics();
    const meter = new CostMeter({ devicePriceUsdPerHour: 3.6, clock: clock.now, metrics, model: 'stories' });
    clock.advance(2000);
    meter.observeStep(step({ busySeconds: 0.3, running: 3, waiting: 2, kvUsedTokens: 25, kvCapacityTokens: 100, kvBytes: 81920 }));
    const apiKey = 'sk-tally-0123456789abcdef';
    meter.requestFinished(finished({ model: 'stories', tenant: 'team-a', prefillSeconds: 0.1, decodeSeconds: 0.2, interTokenSeconds: [0.01, 0.02, 0.03] }));
    meter.requestRejected('stories', 'team-b', 429);
    clock.advance(1000);
    const text = await metrics.registry.metrics();
    expect(text).not.toContain(apiKey);
    const value = (series: string) => {
      const line = text.split('\n').find((l) => l.startsWith(`${series} `));
      expect(line, series).toBeDefined();
      return Number(line!.slice(series.length + 1));
    };
    const expected: [string, number][] = [
      ['tally:num_requests_running{model="stories"}', 3],
      ['tally:num_requests_waiting{model="stories"}', 2],
      ['tally:kv_cache_usage_perc{model="stories"}', 0.25],
      ['tally:kv_cache_bytes{model="stories"}', 81920],
      ['tally:prompt_tokens_total{model="stories",tenant="team-a"}', 100],
      ['tally:generation_tokens_total{model="stories",tenant="team-a"}', 50],
      ['tally:request_success_total{model="stories",tenant="team-a",finished_reason="completed"}', 1],
      ['tally:request_rejected_total{model="stories",tenant="team-b",status="429"}', 1],
      ['tally:time_to_first_token_seconds_count{model="stories",tenant="team-a"}', 1],
      ['tally:inter_token_latency_seconds_count{model="stories",tenant="team-a"}', 3],
      ['tally:e2e_request_latency_seconds_count{model="stories",tenant="team-a"}', 1],
      ['tally:device_seconds_total{model="stories",tenant="team-a",phase="prefill"}', 0.1],
      ['tally:device_seconds_total{model="stories",tenant="team-a",phase="decode"}', 0.2],
      ['tally:cost_usd_total{model="stories",tenant="team-a",basis="usage"}', (0.3 * 3.6) / 3600],
      // 2 s of wall clock before the request finished, 0.3 s busy: allocation = usage × 2 / 0.3.
      ['tally:cost_usd_total{model="stories",tenant="team-a",basis="allocation"}', (2 * 3.6) / 3600],
      ['tally:device_busy_seconds_total{model="stories"}', 0.3],
      ['tally:device_wall_seconds_total{model="stories"}', 3],
      ['tally:device_idle_seconds_total{model="stories"}', 2.7],
      ['tally:device_utilization{model="stories"}', 0.1],
      ['tally:usd_per_million_tokens{model="stories",basis="usage",direction="input"}', ((0.1 * 0.001) / 100) * 1e6],
      ['tally:usd_per_million_tokens{model="stories",basis="usage",direction="output"}', ((0.2 * 0.001) / 50) * 1e6],
      ['tally:usd_per_million_tokens{model="stories",basis="usage",direction="blended"}', ((0.3 * 0.001) / 150) * 1e6],
      ['tally:usd_per_million_tokens{model="stories",basis="allocation",direction="blended"}', ((3 * 0.001) / 150) * 1e6],
    ];
    for (const [series, v] of expected) expect(value(series), series).toBeCloseTo(v, 9);
    // Counters stay monotone across scrapes.
    clock.advance(1000);
    expect(await metrics.registry.metrics()).toContain('tally:device_wall_seconds_total{model="stories"} 4');
  });
});
