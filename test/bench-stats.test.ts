/** The bench's pure parts: percentiles, aggregation, cost, prompts and options, checked exactly. */
import { describe, expect, it } from 'vitest';
import { aggregate } from '../src/loadgen/aggregate.ts';
import { parseBenchArgs } from '../src/cli/bench.ts';
import { inputShare, pointCost, selfHostedMonthly } from '../src/loadgen/cost.ts';
import { parseDataset, PromptSource, sampleLength, type BenchTokenizer } from '../src/loadgen/prompts.ts';
import { exponentialGap, percentile, seededRandom, summarize } from '../src/loadgen/stats.ts';
import type { RequestRecord } from '../src/loadgen/types.ts';
import { HOURS_PER_MONTH } from '../src/meter/cost-math.ts';
import { cachedTokensOf } from '../src/loadgen/usage.ts';
import { quoteApi } from '../src/meter/prices.ts';

describe('percentile (numpy linear interpolation)', () => {
  it('matches numpy.percentile', () => {
    // np.percentile([1, 2, 3, 4], [0, 50, 90, 99, 100]) → [1, 2.5, 3.7, 3.97, 4]
    const v = [4, 1, 3, 2];
    expect(percentile(v, 0)).toBe(1);
    expect(percentile(v, 50)).toBe(2.5);
    expect(percentile(v, 90)).toBeCloseTo(3.7, 12);
    expect(percentile(v, 99)).toBeCloseTo(3.97, 12);
    expect(percentile(v, 100)).toBe(4);
    // np.percentile([15, 20, 35, 40, 50], 40) → 29.0
    expect(percentile([15, 20, 35, 40, 50], 40)).toBeCloseTo(29, 12);
    expect(percentile([7], 99)).toBe(7);
    expect(percentile([], 50)).toBeNaN();
    expect(() => percentile([1], 101)).toThrow(RangeError);
  });

  it('summarizes with population stdev', () => {
    const s = summarize([2, 4, 4, 4, 5, 5, 7, 9], [50, 90]);
    expect(s).toEqual({ count: 8, mean: 5, stdev: 2, min: 2, max: 9, percentiles: { p50: 4.5, p90: 7.6 } });
    expect(summarize([], [50])).toEqual({ count: 0, mean: null, stdev: null, min: null, max: null, percentiles: { p50: null } });
  });

  it('draws seeded, reproducible exponential gaps with the right mean', () => {
    const a = seededRandom(42);
    const b = seededRandom(42);
    const xs = Array.from({ length: 20000 }, () => exponentialGap(a(), 4));
    expect(xs.slice(0, 5)).toEqual(Array.from({ length: 5 }, () => exponentialGap(b(), 4)));
    expect(xs.reduce((s, x) => s + x, 0) / xs.length).toBeCloseTo(0.25, 2);
  });
});

function rec(partial: Partial<RequestRecord>): RequestRecord {
  return { ok: true, startMs: 0, itlMs: [], tokensFrom: 'usage', contentChunks: 0, ...partial };
}

describe('aggregate', () => {
  const records: RequestRecord[] = [
    rec({ ttftMs: 50, lastTokenMs: 80, itlMs: [10, 10, 10], e2eMs: 82, promptTokens: 32, completionTokens: 4, contentChunks: 4, serverCost: { prefill: 0.2, decode: 0.6, devices: 2 } }),
    rec({ ttftMs: 70, lastTokenMs: 130, itlMs: [20, 20, 20], e2eMs: 131, promptTokens: 32, completionTokens: 4, contentChunks: 4, serverCost: { prefill: 0.1, decode: 0.3, devices: 2 } }),
    rec({ ok: false, error: { kind: 'http_429', message: 'HTTP 429: slow down', status: 429 } }),
    rec({ ok: false, error: { kind: 'http_429', message: 'HTTP 429: slow down', status: 429 } }),
    rec({ ok: false, error: { kind: 'stream_dropped', message: 'gone' }, ttftMs: 40, e2eMs: 60, itlMs: [5] }),
  ];

  it('computes throughput, latency percentiles and errors exactly', () => {
    const s = aggregate(records, 2000, [50, 90]);
    expect(s.duration_s).toBe(2);
    expect(s.requests).toEqual({ sent: 5, completed: 2, failed: 3 });
    expect(s.errors).toMatchObject({ http_429: 2, stream_dropped: 1, connection: 0 });
    expect(s.error_samples[0]).toEqual({ kind: 'http_429', message: 'HTTP 429: slow down', count: 2 });
    expect(s.tokens).toEqual({ input: 64, output: 8, from_usage: 2, input_unknown: 0, cached_input: 0, prefix_cache_hit_rate: null });
    expect(s.throughput).toEqual({ requests_per_s: 1, input_tokens_per_s: 32, output_tokens_per_s: 4, total_tokens_per_s: 36 });
    expect(s.latency_ms.ttft.percentiles).toEqual({ p50: 60, p90: 68 });
    // TPOT: (80 − 50) / 3 = 10 and (130 − 70) / 3 = 20.
    expect(s.latency_ms.tpot.percentiles).toEqual({ p50: 15, p90: 19 });
    // ITL pooled over completed requests only: [10, 10, 10, 20, 20, 20].
    expect(s.latency_ms.itl).toMatchObject({ count: 6, mean: 15, percentiles: { p50: 15, p90: 20 } });
    expect(s.latency_ms.e2e.percentiles.p50).toBe(106.5);
    // Engine seconds: device-seconds over the server's 2 devices.
    expect(s.server).toEqual({ prefill_s: 0.15000000000000002, decode_s: 0.44999999999999996 });
    expect(s.client_split).toEqual({ ttft_ms: 120, e2e_ms: 213 });
  });

  it('has no server figures unless every completed request reported them', () => {
    const s = aggregate([records[0], rec({ ttftMs: 1, e2eMs: 2, completionTokens: 1 })], 1000, [50]);
    expect(s.server).toBeNull();
    expect(aggregate([], 0, [50]).throughput.requests_per_s).toBe(0);
  });
});

describe('cost', () => {
  const stats = aggregate(
    [
      rec({ ttftMs: 100, lastTokenMs: 900, e2eMs: 1000, promptTokens: 1000, completionTokens: 250, serverCost: { prefill: 0.25, decode: 0.75, devices: 1 } }),
      rec({ ttftMs: 100, lastTokenMs: 900, e2eMs: 1000, promptTokens: 1000, completionTokens: 250, serverCost: { prefill: 0.25, decode: 0.75, devices: 1 } }),
    ],
    3600_000 / 1000, // 3.6 s
    [50],
  );
  const pricing = { name: 'custom', usdPerHour: 10, devices: 2 };
  const at = Date.parse('2026-06-01T00:00:00Z');

  it('prices the wall-clock device time and splits it by the server share', () => {
    const c = pointCost(stats, pricing, { kind: 'auto' }, ['openai:gpt-6-sol'], at);
    // 2 devices × $10/h × 3.6 s = $0.02 for 2500 tokens → $8/M blended.
    expect(c.usd).toBeCloseTo(0.02, 15);
    expect(c.usd_per_million.blended).toBeCloseTo(8, 9);
    expect(c.input_share_from).toBe('server');
    expect(c.input_share).toBe(0.25);
    expect(c.usd_per_million.input).toBeCloseTo((0.25 * 0.02 * 1e6) / 2000, 9);
    expect(c.usd_per_million.output).toBeCloseTo((0.75 * 0.02 * 1e6) / 500, 9);
    // Metered: 2 s of engine time × 2 devices × $10/h.
    expect(c.metered!.usd).toBeCloseTo((2 * 2 * 10) / 3600, 12);
    expect(c.metered!.usd_per_million.input).toBeCloseTo(((0.5 * 2 * 10) / 3600 / 2000) * 1e6, 9);
    // Capacity: 2500 tokens / 3.6 s for a month; fixed: 2 × $10 × 730.
    expect(c.monthly.fixed_usd).toBe(2 * 10 * HOURS_PER_MONTH);
    expect(c.monthly.capacity_tokens).toBeCloseTo((2500 / 3.6) * HOURS_PER_MONTH * 3600, 3);
    const q = quoteApi('openai:gpt-6-sol', { requests: 2, promptTokens: 2000, completionTokens: 500 }, new Date(at));
    const api = c.api[0];
    expect(api.blended_usd_per_million).toBeCloseTo(q.blended_usd_per_million!, 12);
    expect(api.cost_ratio).toBeCloseTo(q.cost_usd! / 0.02, 9);
    const perToken = q.blended_usd_per_million! / 1e6;
    if (perToken * c.monthly.capacity_tokens! > c.monthly.fixed_usd) expect(api.break_even!.tokens_per_month).toBeCloseTo(c.monthly.fixed_usd / perToken, 0);
    else expect(api.break_even).toBeNull();
  });

  it('falls back to the TTFT split or a fixed share', () => {
    expect(inputShare({ ...stats, server: null }, { kind: 'auto' })).toEqual({ share: 0.1, from: 'ttft' });
    expect(inputShare(stats, { kind: 'ttft' })).toEqual({ share: 0.1, from: 'ttft' });
    expect(inputShare(stats, { kind: 'fixed', value: 0.3 })).toEqual({ share: 0.3, from: 'fixed' });
  });

  it('steps self-hosted monthly cost by whole deployments', () => {
    expect(selfHostedMonthly(0, 100, 1e9)).toBe(0);
    expect(selfHostedMonthly(1, 100, 1e9)).toBe(100);
    expect(selfHostedMonthly(1e9, 100, 1e9)).toBe(100);
    expect(selfHostedMonthly(1e9 + 1, 100, 1e9)).toBe(200);
  });
});

describe('prefix-cache hit rate', () => {
  it('is cached prompt tokens over the prompt tokens of the requests that report them, from usage', () => {
    expect(cachedTokensOf({ prompt_tokens: 10, prompt_tokens_details: { cached_tokens: 8 } })).toBe(8);
    expect(cachedTokensOf({ prompt_tokens: 10 })).toBeUndefined();
    expect(cachedTokensOf({ prompt_tokens_details: null })).toBeUndefined();
    const s = aggregate([
      rec({ promptTokens: 2000, cachedTokens: 1984, completionTokens: 1 }),
      rec({ promptTokens: 2000, cachedTokens: 0, completionTokens: 1 }),
      rec({ promptTokens: 500, completionTokens: 1 }),
      rec({ ok: false, promptTokens: 2000, cachedTokens: 1984, error: { kind: 'http_5xx', message: 'x' } }),
    ], 1000, [50]);
    expect(s.tokens.cached_input).toBe(1984);
    expect(s.tokens.prefix_cache_hit_rate).toBeCloseTo(1984 / 4000, 12);
    expect(aggregate([rec({ promptTokens: 5, completionTokens: 1 })], 1000, [50]).tokens.prefix_cache_hit_rate).toBeNull();
  });
});

describe('prompts', () => {
  /** Words as tokens; decode joins them; BOS (id 1) when special tokens are added. */
  const words = new Map<string, number>();
  const names: string[] = ['<unk>', '<s>'];
  const wordTokenizer: BenchTokenizer = {
    source: 'local',
    encode: async (text, special) => {
      const ids = text.split(/\s+/).filter(Boolean).map((w) => {
        if (!words.has(w)) {
          words.set(w, names.length);
          names.push(w);
        }
        return words.get(w)!;
      });
      return special ? [1, ...ids] : ids;
    },
    decode: async (ids) => ids.map((i) => names[i]).join(' '),
  };
  const base = { model: 'm', endpoint: 'completions' as const, input: { mean: 20, spread: 0, dist: 'uniform' as const }, output: { mean: 5, spread: 0, dist: 'uniform' as const }, exactOutput: true, includeUsage: true, seed: 3 };

  it('builds token-id prompts of the exact length, with ignore_eos and min_tokens', async () => {
    const src = new PromptSource({ ...base, format: 'ids', tokenizer: wordTokenizer });
    const [a, b] = await src.take(2);
    expect((a.body.prompt as number[]).length).toBe(20);
    expect(a.body).toMatchObject({ model: 'm', max_tokens: 5, ignore_eos: true, min_tokens: 5, stream_options: { include_usage: true } });
    expect(a.plannedInput).toBe(20);
    expect(a.body.prompt).not.toEqual(b.body.prompt);
  });

  it('builds text prompts that encode to the exact length, BOS included', async () => {
    const src = new PromptSource({ ...base, format: 'text', tokenizer: wordTokenizer, input: { mean: 50, spread: 0.5, dist: 'uniform' } });
    for (const spec of await src.take(10)) {
      expect((await wordTokenizer.encode(spec.body.prompt as string, true)).length).toBe(spec.plannedInput);
      expect(spec.plannedInput).toBeGreaterThanOrEqual(25);
      expect(spec.plannedInput).toBeLessThanOrEqual(75);
    }
    expect(src.inexact).toBe(0);
  });

  it('--shared-prefix N:L: each prompt is one of N prefixes of L tokens, then its own synthetic part', async () => {
    const src = new PromptSource({ ...base, format: 'ids', tokenizer: wordTokenizer, sharedPrefix: { count: 3, length: 40 } });
    const specs = await src.take(30);
    const prefixes = new Set<string>();
    for (const spec of specs) {
      const ids = spec.body.prompt as number[];
      expect(ids.length).toBe(60);
      expect(spec.plannedInput).toBe(60);
      prefixes.add(JSON.stringify(ids.slice(0, 40)));
    }
    // Three distinct prefixes, each used many times; the parts after them differ.
    expect(prefixes.size).toBe(3);
    expect(new Set(specs.map((s) => JSON.stringify((s.body.prompt as number[]).slice(40)))).size).toBeGreaterThan(20);
    const chat = new PromptSource({ ...base, endpoint: 'chat', format: 'text', tokenizer: wordTokenizer, sharedPrefix: { count: 2, length: 30 } });
    const messages = (await chat.take(10)).map((s) => s.body.messages as { role: string; content: string }[]);
    expect(new Set(messages.map((m) => m[0].content)).size).toBe(2);
    expect(messages[0][0]).toMatchObject({ role: 'system' });
    expect((await wordTokenizer.encode(messages[0][0].content, false)).length).toBe(30);
    expect(messages[0][1].role).toBe('user');
  });

  it('draws lengths from the distribution', () => {
    const rand = seededRandom(1);
    const xs = Array.from({ length: 5000 }, () => sampleLength({ mean: 100, spread: 0.2, dist: 'uniform' }, rand));
    expect(Math.min(...xs)).toBe(80);
    expect(Math.max(...xs)).toBe(120);
    expect(sampleLength({ mean: 100, spread: 0, dist: 'normal' }, rand)).toBe(100);
    const ns = Array.from({ length: 5000 }, () => sampleLength({ mean: 100, spread: 0.1, dist: 'normal' }, rand));
    expect(ns.reduce((a, b) => a + b, 0) / ns.length).toBeCloseTo(100, 0);
  });

  it('reads JSONL datasets', async () => {
    const ds = parseDataset('{"prompt": "hi", "max_tokens": 7}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n');
    expect(ds).toEqual([{ prompt: 'hi', max_tokens: 7 }, { messages: [{ role: 'user', content: 'yo' }] }]);
    expect(() => parseDataset('{"text": 1}', 'f.jsonl')).toThrow('f.jsonl:1');
    expect(() => parseDataset('nope')).toThrow('not JSON');
    const src = new PromptSource({ ...base, endpoint: 'chat', format: 'text', dataset: ds, exactOutput: false });
    const [a, b, c] = await src.take(3);
    expect(a.body).toEqual({ model: 'm', max_tokens: 7, messages: [{ role: 'user', content: 'hi' }], stream_options: { include_usage: true } });
    expect(b.body.messages).toEqual([{ role: 'user', content: 'yo' }]);
    expect(b.body.max_tokens).toBe(5);
    expect(c.body.max_tokens).toBe(7);
  });
});

describe('options', () => {
  it('parses load points, bounds and pricing', () => {
    const p = parseBenchArgs(['--url', 'http://127.0.0.1:1/v1', '--concurrency', '1,8', '--rate', '2,inf', '--requests', '10', '--device-price', 'h200', '--devices', '2', '--input-cost-share', '0.2', '--percentiles', '99,50'], {});
    if (p.help) throw new Error('help');
    expect(p.config.points).toEqual([{ mode: 'concurrency', value: 1 }, { mode: 'concurrency', value: 8 }, { mode: 'rate', value: 2 }, { mode: 'rate', value: Infinity }]);
    expect(p.config.pricing).toMatchObject({ name: 'h200', usdPerHour: 3.59, devices: 2 });
    expect(p.config.inputShare).toEqual({ kind: 'fixed', value: 0.2 });
    expect(p.config.percentiles).toEqual([50, 99]);
    const d = parseBenchArgs(['--url', 'http://x', '--duration', '1.5m'], {});
    if (d.help) throw new Error('help');
    expect(d.config.bounds).toEqual({ requests: undefined, durationMs: 90_000, maxConcurrency: undefined });
    const n = parseBenchArgs(['--url', 'http://x'], { OPENAI_API_KEY: 'k' });
    if (n.help) throw new Error('help');
    expect(n.config.bounds.requests).toBe(100);
    expect(n.config.apiKey).toBe('k');
  });

  it('takes --shared-prefix N:L, not with a dataset', () => {
    const p = parseBenchArgs(['--url', 'http://x', '--shared-prefix', '4:2000'], {});
    if (p.help) throw new Error('help');
    expect(p.config.sharedPrefix).toEqual({ count: 4, length: 2000 });
    expect(() => parseBenchArgs(['--url', 'http://x', '--shared-prefix', '4'], {})).toThrow('--shared-prefix takes N:L');
    expect(() => parseBenchArgs(['--url', 'http://x', '--shared-prefix', '0:10'], {})).toThrow('--shared-prefix takes N:L');
  });

  it('refuses bad options', () => {
    expect(() => parseBenchArgs([], {})).toThrow('--url is required');
    expect(() => parseBenchArgs(['--url', 'ftp://x'], {})).toThrow('http(s)');
    expect(() => parseBenchArgs(['--url', 'http://x', '--concurrency', '0'], {})).toThrow('--concurrency');
    expect(() => parseBenchArgs(['--url', 'http://x', '--rate', 'inf', '--duration', '5s'], {})).toThrow('--rate inf needs --requests');
    expect(() => parseBenchArgs(['--url', 'http://x', '--device-price', 'abacus'], {})).toThrow('--device-price');
    expect(() => parseBenchArgs(['--url', 'http://x', '--input-cost-share', '2'], {})).toThrow('--input-cost-share');
    expect(() => parseBenchArgs(['--url', 'http://x', '--duration', 'soon'], {})).toThrow('--duration');
  });
});
