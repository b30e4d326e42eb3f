import type { AddressInfo } from 'node:net';
import express from 'express';
import { calcPrice } from '@pydantic/genai-prices';
import { describe, expect, it } from 'vitest';
import { HOURS_PER_MONTH } from '../src/meter/cost-math.ts';
import { buildCostReport, parseDuration } from '../src/meter/cost-report.ts';
import { costRouter } from '../src/server/cost-routes.ts';
import type { ApiError } from '../src/server/errors.ts';
import { CostMeter, type WindowTotals } from '../src/meter/meter.ts';
import { DEFAULT_API_MODELS, DEVICE_PRESETS, quoteApi, resolveDevicePrice } from '../src/meter/prices.ts';
import type { StepRecord } from '../src/engine/protocol.ts';
import { Metrics, metricsHandler } from '../src/telemetry/metrics.ts';

function totals(over: Partial<WindowTotals> = {}): WindowTotals {
  return {
    startMs: Date.UTC(2026, 10, 28, 12), endMs: Date.UTC(2026, 10, 28, 12, 15), wallDeviceSeconds: 900, wallUsd: 900 / 1000,
    busyDeviceSeconds: 300, busyUsd: 300 / 1000, requests: 100, cancelled: 2, promptTokens: 120_000, completionTokens: 30_000,
    prefillDeviceSeconds: 60, decodeDeviceSeconds: 240, prefillUsd: 60 / 1000, decodeUsd: 240 / 1000, ...over,
  };
}

const PRICING = { devices: 1, devicePriceUsdPerHour: 3.6, usdPerDeviceHour: 3.6 };

describe('API price comparison', () => {
  it("uses genai-prices' own numbers for a named model", () => {
    const mix = { requests: 100, promptTokens: 120_000, completionTokens: 30_000 };
    const at = new Date(Date.UTC(2026, 10, 28));
    for (const [provider, model] of [['anthropic', 'claude-haiku-4-5'], ['openai', 'gpt-5'], ['google', 'gemini-2.5-pro']]) {
      const q = quoteApi(`${provider}:${model}`, mix, at);
      const own = calcPrice({ input_tokens: 1200, output_tokens: 300 }, model, { providerId: provider, timestamp: at })!;
      expect(own).not.toBeNull();
      expect(q.model).toBe(own.model.id);
      expect(q.name).toBe(own.model.name);
      expect(q.input_usd_per_million).toBeCloseTo((own.input_price / 1200) * 1e6, 9);
      expect(q.output_usd_per_million).toBeCloseTo((own.output_price / 300) * 1e6, 9);
      expect(q.cost_usd).toBeCloseTo(own.total_price * 100, 12);
      expect(q.blended_usd_per_million).toBeCloseTo((own.total_price / 1500) * 1e6, 9);
    }
    // Claude Haiku 4.5 is $1 in / $5 out per million in genai-prices 0.1.8.
    const haiku = quoteApi('anthropic:claude-haiku-4-5', mix, at);
    expect(haiku.input_usd_per_million).toBeCloseTo(1, 9);
    expect(haiku.output_usd_per_million).toBeCloseTo(5, 9);
    // Tiered prices follow the size of one request, not the window's total.
    const pro = quoteApi('google:gemini-2.5-pro', mix, at);
    expect(pro.input_usd_per_million).toBeCloseTo(1.25, 9);
  });

  it('every default model is priced, and unknown ones say so', () => {
    for (const id of DEFAULT_API_MODELS) {
      const q = quoteApi(id, { requests: 1, promptTokens: 1000, completionTokens: 200 });
      expect(q.error, id).toBeUndefined();
      expect(q.input_usd_per_million, id).toBeGreaterThan(0);
      expect(q.output_usd_per_million, id).toBeGreaterThan(0);
    }
    expect(quoteApi('openai:no-such-model', { requests: 1, promptTokens: 10, completionTokens: 10 }).error).toMatch(/no price/);
  });

  it('device presets carry sources and resolve by name or number', () => {
    for (const p of Object.values(DEVICE_PRESETS)) {
      expect(p.usdPerHour).toBeGreaterThan(0);
      expect(p.source.length).toBeGreaterThan(10);
    }
    expect(resolveDevicePrice('h100-sxm').usdPerHour).toBe(DEVICE_PRESETS['h100-sxm'].usdPerHour);
    expect(resolveDevicePrice(undefined).name).toBe('cpu-2core');
    expect(resolveDevicePrice('cpu').name).toBe('cpu-2core');
    expect(resolveDevicePrice('2.5')).toEqual({ name: 'custom', usdPerHour: 2.5 });
    expect(() => resolveDevicePrice('h900')).toThrow(/preset|USD/);
  });
});

describe('cost report', () => {
  it('computes $/M by basis, utilization, throughput, devices needed and break-even', () => {
    // 15 min, 60 busy device-seconds (12 prefill, 48 decode) at $3.6/h = $0.001 per device-second.
    const t = totals({ busyDeviceSeconds: 60, busyUsd: 0.06, prefillDeviceSeconds: 12, decodeDeviceSeconds: 48, prefillUsd: 0.012, decodeUsd: 0.048 });
    const report = buildCostReport(t, PRICING, { apiModels: ['anthropic:claude-haiku-4-5', 'openai:gpt-6-luna'], targetTokensPerMonth: 2e10 });
    expect(report.window.seconds).toBe(900);
    expect(report.utilization).toBeCloseTo(60 / 900, 12);
    expect(report.allocation_factor).toBeCloseTo(15, 12);
    expect(report.usd.usage).toBeCloseTo(0.06, 12);
    expect(report.usd.allocation).toBeCloseTo(0.9, 12);
    expect(report.usd.allocation).toBeCloseTo(report.usd.wall_clock, 12);
    expect(report.usd_per_million_tokens.usage.input).toBeCloseTo((0.012 / 120_000) * 1e6, 9);
    expect(report.usd_per_million_tokens.usage.output).toBeCloseTo((0.048 / 30_000) * 1e6, 9);
    expect(report.usd_per_million_tokens.allocation.blended).toBeCloseTo((0.9 / 150_000) * 1e6, 9);
    expect(report.device_seconds.idle).toBe(840);
    // 150k tokens in 60 busy device-seconds: 2500 tokens per device-second.
    expect(report.throughput.tokens_per_busy_device_second).toBe(2500);
    const monthSeconds = HOURS_PER_MONTH * 3600;
    expect(report.monthly.capacity_tokens).toBe(2500 * monthSeconds);
    expect(report.monthly.fixed_usd).toBeCloseTo(3.6 * HOURS_PER_MONTH, 9);
    expect(report.monthly.devices_needed).toBe(Math.ceil(2e10 / (2500 * monthSeconds)));
    expect(report.monthly.devices_needed).toBe(4);
    expect(report.monthly.devices_needed_fixed_usd).toBeCloseTo(4 * 3.6 * HOURS_PER_MONTH, 9);

    const [haiku, luna] = report.api_comparison;
    const own = calcPrice({ input_tokens: 1200, output_tokens: 300 }, 'claude-haiku-4-5', { providerId: 'anthropic', timestamp: new Date(totals().endMs) })!;
    expect(haiku.cost_usd).toBeCloseTo(own.total_price * 100, 12);
    expect(haiku.cost_ratio.usage).toBeCloseTo((own.total_price * 100) / 0.06, 9);
    expect(haiku.cost_ratio.allocation).toBeCloseTo((own.total_price * 100) / 0.9, 9);
    // Break-even: the volume at which the API's bill equals keeping the device up all month.
    const perToken = own.total_price / 1500;
    expect(haiku.break_even!.tokens_per_month).toBeCloseTo(report.monthly.fixed_usd / perToken, 3);
    expect(haiku.break_even!.api_usd_per_month).toBeCloseTo(report.monthly.fixed_usd, 9);
    expect(haiku.break_even!.tokens_per_month).toBeLessThan(report.monthly.capacity_tokens!);
    expect(luna.error).toBeUndefined();
  });

  it('has no break-even when the API is cheaper than a fully busy device', () => {
    // 1 token per busy device-second at $3.6/h: $1000 per million — dearer than any API.
    const report = buildCostReport(totals({ promptTokens: 200, completionTokens: 100, prefillDeviceSeconds: 100, decodeDeviceSeconds: 200 }), PRICING, { apiModels: ['anthropic:claude-haiku-4-5'] });
    expect(report.api_comparison[0].break_even).toBeNull();
  });

  it('an empty window reports zeros and nulls, not NaN', () => {
    const report = buildCostReport(totals({ busyDeviceSeconds: 0, busyUsd: 0, requests: 0, cancelled: 0, promptTokens: 0, completionTokens: 0, prefillDeviceSeconds: 0, decodeDeviceSeconds: 0, prefillUsd: 0, decodeUsd: 0 }), PRICING);
    expect(JSON.stringify(report)).not.toContain('NaN');
    expect(report.usd).toEqual({ usage: 0, allocation: 0, wall_clock: 0.9 });
    expect(report.usd_per_million_tokens.usage.blended).toBeNull();
    expect(report.monthly.devices_needed).toBeNull();
    expect(report.api_comparison[0].input_usd_per_million).toBeGreaterThan(0);
  });

  it('parses windows in s, m, h and d', () => {
    expect(parseDuration('90s')).toBe(90_000);
    expect(parseDuration('15m')).toBe(900_000);
    expect(parseDuration('1.5h')).toBe(5_400_000);
    expect(parseDuration('1d')).toBe(86_400_000);
    for (const bad of ['', '15', 'm', '-5m', '0m', '5w', '1e3s']) expect(parseDuration(bad), bad).toBeUndefined();
  });
});

describe('cached input, compared like with like', () => {
  it('reports the hit rate, $/M of computed input apart, and prices the API mix with cached input at its cache-read price', () => {
    const at = new Date(Date.UTC(2026, 10, 28, 12, 15));
    const t = totals({ cachedTokens: 90_000 });
    const report = buildCostReport(t, PRICING, { apiModels: ['anthropic:claude-haiku-4-5', 'openai:gpt-3.5-turbo'] });
    expect(report.tokens).toEqual({ prompt: 120_000, cached_prompt: 90_000, completion: 30_000, total: 150_000 });
    expect(report.prefix_cache.hit_rate).toBeCloseTo(0.75, 12);
    expect(report.usd_per_million_tokens.usage.input).toBeCloseTo((0.06 / 120_000) * 1e6, 9);
    expect(report.usd_per_million_tokens.usage.input_uncached).toBeCloseTo((0.06 / 30_000) * 1e6, 9);
    const [haiku, old] = report.api_comparison;
    const own = calcPrice({ input_tokens: 1200, cache_read_tokens: 900, output_tokens: 300 }, 'claude-haiku-4-5', { providerId: 'anthropic', timestamp: at })!;
    expect(haiku.cost_usd).toBeCloseTo(own.total_price * 100, 12);
    expect(haiku.cached_input_usd_per_million! * 10).toBeCloseTo(haiku.input_usd_per_million!, 9);
    // No cache-read price: cached input costs what input costs.
    expect(old.cached_input_usd_per_million).toBeCloseTo(old.input_usd_per_million!, 12);
    const none = buildCostReport(totals(), PRICING, { apiModels: ['anthropic:claude-haiku-4-5'] });
    expect(none.prefix_cache.hit_rate).toBe(0);
    expect(none.api_comparison[0].cost_usd!).toBeGreaterThan(haiku.cost_usd!);
  });
});

describe('GET /v1/cost and /metrics', () => {
  it('serves the window report over HTTP and rejects bad windows OpenAI-style', async () => {
    let now = Date.UTC(2026, 10, 28, 12);
    const metrics = new Metrics();
    const meter = new CostMeter({ devicePriceUsdPerHour: 3.6, clock: () => now, metrics, model: 'stories' });
    const step: StepRecord = { startMs: 0, endMs: 0, busySeconds: 2, prefillSeconds: 0.5, decodeSeconds: 1.5, prefillTokens: 100, decodeTokens: 49, running: 1, waiting: 0, kvUsedTokens: 150, kvCapacityTokens: 1000, kvBytes: 0 };
    now += 30 * 60_000; // 30 min idle: outside a 10 min window
    now += 8 * 60_000;
    meter.observeStep(step);
    meter.requestFinished({ id: 'x', model: 'stories', tenant: 'alice', status: 'completed', promptTokens: 100, completionTokens: 50, prefillSeconds: 0.5, decodeSeconds: 1.5, arrivalMs: now - 2000, endMs: now, interTokenSeconds: [] });
    now += 2 * 60_000;

    const app = express();
    app.use(costRouter(meter, { apiModels: ['anthropic:claude-haiku-4-5'] }));
    // The routes throw ApiErrors for the server's one error handler (createApp's) to answer; this app's stands in for it.
    app.use((err: ApiError, _req: express.Request, res: express.Response, _next: express.NextFunction) => void res.status(err.status).json(err.body()));
    app.get('/metrics', metricsHandler(metrics));
    const server = app.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    const base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
    try {
      const ok = await fetch(`${base}/v1/cost?window=10m`);
      expect(ok.status).toBe(200);
      const body = await ok.json();
      expect(body.window.seconds).toBe(600);
      expect(body.requests).toBe(1);
      expect(body.tokens).toEqual({ prompt: 100, cached_prompt: 0, completion: 50, total: 150 });
      expect(body.device_seconds.wall).toBeCloseTo(600, 9);
      expect(body.device_seconds.busy).toBeCloseTo(2, 12);
      expect(body.utilization).toBeCloseTo(2 / 600, 12);
      expect(body.usd.usage).toBeCloseTo(0.002, 12);
      expect(body.usd.allocation).toBeCloseTo(0.6, 9);
      expect(body.api_comparison[0].model).toBe('claude-haiku-4-5');

      const whole = await (await fetch(`${base}/v1/cost?window=1h&models=openai:gpt-5,google:gemini-2.5-flash&target_tokens_per_month=1e9`)).json();
      expect(whole.device_seconds.wall).toBeCloseTo(40 * 60, 6);
      expect(whole.api_comparison.map((a: { model: string }) => a.model)).toEqual(['gpt-5', 'gemini-2.5-flash']);
      expect(whole.monthly.target_tokens).toBe(1e9);

      for (const bad of ['15', 'abc', '-1m', '2w', '25h']) {
        const res = await fetch(`${base}/v1/cost?window=${bad}`);
        expect(res.status, bad).toBe(400);
        const err = await res.json();
        expect(err.error).toMatchObject({ type: 'invalid_request_error', param: 'window', code: 'invalid_window' });
        expect(typeof err.error.message).toBe('string');
      }
      expect((await fetch(`${base}/v1/cost?target_tokens_per_month=-3`)).status).toBe(400);

      const m = await fetch(`${base}/metrics`);
      expect(m.headers.get('content-type')).toContain('text/plain');
      const text = await m.text();
      expect(text).toContain('tally:cost_usd_total{model="stories",tenant="alice",basis="usage"}');
      expect(text).toContain('tally:device_utilization{model="stories"}');
    } finally {
      await new Promise((r) => server.close(r));
    }
  });
});
