/**
 * `tally bench` against a stand-in server with known timings (TTFT 50 ms, then a token every 10 ms):
 * the measured latencies must match them within timer jitter, and token and error counts exactly.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runBenchCommand } from '../src/cli/bench.ts';
import type { BenchResult } from '../src/loadgen/run.ts';
import { exponentialGap, seededRandom } from '../src/loadgen/stats.ts';
import type { RequestRecord } from '../src/loadgen/types.ts';
import { refusedUrl, type StandInMode, startStandIn } from './helpers/stand-in-server.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-bench-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let runs = 0;
async function bench(args: string[]): Promise<{ code: number; out: string; err: string; result: BenchResult }> {
  const json = path.join(tmp, `run-${runs++}.json`);
  let out = '';
  let err = '';
  const code = await runBenchCommand([...args, '--json', json, '--api-models', 'openai:gpt-6-sol'], { out: (t) => (out += t), err: { write: (t: string) => (err += t), isTTY: false } });
  return { code, out, err, result: JSON.parse(fs.readFileSync(json, 'utf8')) as BenchResult };
}

/** numpy.percentile's default, written independently of src/loadgen/stats.ts. */
function npPercentile(values: number[], p: number): number {
  const s = [...values].sort((a, b) => a - b);
  const h = ((s.length - 1) * p) / 100;
  const i = Math.floor(h);
  return i + 1 < s.length ? s[i] + (h - i) * (s[i + 1] - s[i]) : s[i];
}

describe('bench against the stand-in server', () => {
  it('measures TTFT, TPOT, ITL and E2E of fixed timings, and counts tokens exactly', async () => {
    const server = await startStandIn({ ttftMs: 50, itlMs: 10, cost: { prefillPerToken: 0.001, decodePerToken: 0.01 } });
    try {
      const { code, out, result } = await bench(['--url', `${server.url}/v1`, '--model', 'stand-in', '--concurrency', '1,4', '--requests', '12', '--input-len', '32', '--output-len', '16', '--warmup', '0', '--device-price', '3.6', '--detailed']);
      expect(code).toBe(0);
      expect(out).toContain('c=4');
      expect(result.server).toMatchObject({ prompt_format: 'ids', exact_output: true, include_usage: true, reports_cost: true, tokenizer: 'server' });
      // The bench asked for what it measured: token-id prompts of 32, 16 tokens out, exactly.
      const generation = server.requests.slice(1);
      expect(generation).toHaveLength(24);
      for (const r of generation) {
        expect((r.body.prompt as number[]).length).toBe(32);
        expect(r.body).toMatchObject({ max_tokens: 16, ignore_eos: true, min_tokens: 16, stream: true, stream_options: { include_usage: true } });
      }
      for (const point of result.points) {
        const s = point.stats;
        expect(s.requests).toEqual({ sent: 12, completed: 12, failed: 0 });
        expect(s.tokens).toEqual({ input: 12 * 32, output: 12 * 16, from_usage: 12, input_unknown: 0, cached_input: 0, prefix_cache_hit_rate: null });
        const l = s.latency_ms;
        // Timings within timer jitter of the stand-in's schedule.
        expect(l.ttft.min!).toBeGreaterThanOrEqual(49);
        expect(l.ttft.percentiles.p50!).toBeLessThan(60);
        expect(l.tpot.mean!).toBeGreaterThan(9.5);
        expect(l.tpot.mean!).toBeLessThan(10.6);
        expect(l.itl.count).toBe(12 * 15);
        expect(l.itl.mean!).toBeGreaterThan(9.5);
        expect(l.itl.mean!).toBeLessThan(10.6);
        expect(Math.abs(l.itl.percentiles.p50! - 10)).toBeLessThan(3);
        expect(l.e2e.min!).toBeGreaterThanOrEqual(199);
        expect(l.e2e.percentiles.p50!).toBeLessThan(220);
        // Throughput: c=1 runs 12 requests back to back (about 200 ms each); c=4 in 3 waves.
        const waves = 12 / (point.value as number);
        expect(s.duration_s).toBeGreaterThanOrEqual(waves * 0.199);
        expect(s.duration_s).toBeLessThan(waves * 0.26);
        expect(s.throughput.requests_per_s).toBe(12 / s.duration_s);
        expect(s.throughput.output_tokens_per_s).toBe((12 * 16) / s.duration_s);

        // The summaries are exactly the statistics of the per-request records.
        const recs = point.records as RequestRecord[];
        const ttft = recs.map((r) => r.ttftMs!);
        for (const p of [50, 90, 99]) expect(l.ttft.percentiles[`p${p}`]).toBe(npPercentile(ttft, p));
        const itl = recs.flatMap((r) => r.itlMs);
        for (const p of [50, 90, 99]) expect(l.itl.percentiles[`p${p}`]).toBe(npPercentile(itl, p));
        const tpot = recs.map((r) => (r.lastTokenMs! - r.ttftMs!) / 15);
        expect(l.tpot.percentiles.p90).toBe(npPercentile(tpot, 90));
        expect(l.e2e.percentiles.p99).toBe(npPercentile(recs.map((r) => r.e2eMs!), 99));

        // Cost: the stand-in meters 0.001 s per prompt token and 0.01 s per output token.
        expect(s.server!.prefill_s).toBeCloseTo(12 * 32 * 0.001, 9);
        expect(s.server!.decode_s).toBeCloseTo(12 * 16 * 0.01, 9);
        const share = (32 * 0.001) / (32 * 0.001 + 16 * 0.01);
        expect(point.cost.input_share_from).toBe('server');
        expect(point.cost.input_share).toBeCloseTo(share, 12);
        const usd = (3.6 * s.duration_s) / 3600;
        expect(point.cost.usd).toBeCloseTo(usd, 12);
        expect(point.cost.usd_per_million.blended!).toBeCloseTo((usd / (12 * 48)) * 1e6, 9);
        expect(point.cost.usd_per_million.input!).toBeCloseTo(((usd * share) / (12 * 32)) * 1e6, 9);
        // Metered at $3.6/h: $0.001 per device-second.
        expect(point.cost.metered!.usd_per_million.input!).toBeCloseTo(0.001 * 0.001 * 1e6, 9);
        expect(point.cost.metered!.usd_per_million.output!).toBeCloseTo(0.01 * 0.001 * 1e6, 9);
      }
      expect(result.totals.requests.completed).toBe(25); // the probe and 24 measured
    } finally {
      await server.close();
    }
  });

  it('counts every kind of misbehaviour exactly and keeps running', async () => {
    const cycle: StandInMode[] = ['ok', '429', 'drop', 'html', 'error-event', 'garbage', 'reset', '500'];
    let n = 0;
    // A reset on a reused connection is sent again on a fresh one, where it is reset again: one connection error.
    const resetOnReuse = new Set<string>();
    const mode = (_i: number, body: Record<string, unknown>, conn: { reused: boolean }): StandInMode => {
      if (body.max_tokens === 2) return 'ok';
      const key = JSON.stringify(body);
      if (resetOnReuse.delete(key)) return 'reset';
      const m = cycle[n++ % cycle.length];
      if (m === 'reset' && conn.reused) resetOnReuse.add(key);
      return m;
    };
    const server = await startStandIn({ ttftMs: 20, itlMs: 5, mode });
    try {
      const { code, out, result } = await bench(['--url', server.url, '--model', 'stand-in', '--concurrency', '4', '--rate', '50', '--requests', '16', '--input-len', '8', '--output-len', '8', '--warmup', '0']);
      expect(code).toBe(0);
      expect(out).toContain('errors:');
      for (const point of result.points) {
        expect(point.stats.requests).toEqual({ sent: 16, completed: 2, failed: 14 });
        expect(point.stats.errors).toEqual({ connection: 2, timeout: 0, http_429: 2, http_4xx: 0, http_5xx: 2, bad_response: 4, stream_error: 2, stream_dropped: 2 });
        expect(point.stats.tokens).toMatchObject({ input: 2 * 8, output: 2 * 8 });
        expect(point.stats.latency_ms.ttft.count).toBe(2);
      }
      const kinds = result.points[0].stats.error_samples.map((s) => s.kind);
      expect(kinds).toContain('bad_response');
      expect(result.points[0].stats.error_samples.find((s) => s.kind === 'http_429')!.message).toContain('Rate limit reached');
    } finally {
      await server.close();
    }
  });

  it('reports a refused endpoint and timeouts without crashing', async () => {
    const refused = await bench(['--url', await refusedUrl(), '--model', 'm', '--concurrency', '2', '--requests', '4', '--warmup', '1']);
    expect(refused.code).toBe(1);
    expect(refused.result.points[0].stats.requests).toEqual({ sent: 4, completed: 0, failed: 4 });
    expect(refused.result.points[0].stats.errors.connection).toBe(4);
    expect(refused.result.server.probe.ok).toBe(false);
    expect(refused.result.notes.join(' ')).toContain('GET /v1/models failed');
    expect(refused.out).toContain('connection 4');

    const server = await startStandIn({ mode: (_i, body) => (body.max_tokens === 2 ? 'ok' : 'hang') });
    try {
      const hung = await bench(['--url', server.url, '--concurrency', '2', '--requests', '2', '--warmup', '0', '--timeout', '0.3']);
      expect(hung.code).toBe(1);
      expect(hung.result.target.model).toBe('stand-in');
      expect(hung.result.points[0].stats.errors.timeout).toBe(2);
    } finally {
      await server.close();
    }
  });

  it('drops what a strict server refuses: ignore_eos, then token-id prompts', async () => {
    const server = await startStandIn({ ttftMs: 5, itlMs: 2, rejectParams: ['ignore_eos', 'min_tokens'], rejectIdPrompts: true });
    try {
      const { code, result } = await bench(['--url', server.url, '--concurrency', '2', '--requests', '4', '--input-len', '40', '--output-len', '6', '--warmup', '0']);
      expect(code).toBe(0);
      expect(result.server).toMatchObject({ prompt_format: 'text', exact_output: false, include_usage: true, reports_cost: false, probe: { ok: true, attempts: 3 } });
      const notes = result.notes.join(' ');
      expect(notes).toContain('refused ignore_eos/min_tokens');
      expect(notes).toContain('refused a token-id prompt');
      // The stand-in has /tokenize but no /detokenize: text of about 4 characters a token, counted by the server.
      expect(notes).toContain('no /detokenize');
      const s = result.points[0].stats;
      expect(s.requests).toEqual({ sent: 4, completed: 4, failed: 0 });
      expect(s.tokens.output).toBe(4 * 6);
      expect(s.tokens.input).toBe(server.requests.slice(1).reduce((a, r) => a + (r.body.prompt as string).split(/\s+/).filter(Boolean).length, 0));
      expect(result.points[0].cost.input_share_from).toBe('ttft');
    } finally {
      await server.close();
    }
  });

  it('stops sending at --duration, and sends Poisson arrivals on the seeded schedule', async () => {
    const server = await startStandIn({ ttftMs: 20, itlMs: 5 });
    try {
      const { result } = await bench(['--url', server.url, '--concurrency', '2', '--rate', '25', '--duration', '0.6', '--output-len', '8', '--input-len', '8', '--warmup', '0', '--seed', '5', '--detailed']);
      const [closed, open] = result.points;
      // Closed loop: each client sends back to back (55 ms a request) until 600 ms have passed.
      const starts = (closed.records as RequestRecord[]).map((r) => r.startMs);
      expect(Math.max(...starts)).toBeLessThan(600);
      const slowest = closed.stats.latency_ms.e2e.max!;
      expect(closed.stats.requests.sent).toBeGreaterThanOrEqual(2 * Math.floor(600 / (slowest + 1)));
      expect(closed.stats.requests.sent).toBeLessThanOrEqual(2 * Math.ceil(600 / 55));
      expect(closed.stats.duration_s).toBeGreaterThanOrEqual(0.6);
      expect(closed.stats.duration_s).toBeLessThan(0.6 + (slowest + 5) / 1000);
      // Open loop: arrivals at the cumulative exponential gaps of seededRandom(seed + point index).
      const rand = seededRandom(5 + 1);
      const schedule: number[] = [];
      for (let t = exponentialGap(rand(), 25) * 1000; t < 600; t += exponentialGap(rand(), 25) * 1000) schedule.push(t);
      const arrivals = (open.records as RequestRecord[]).map((r) => r.startMs);
      expect(arrivals).toHaveLength(schedule.length);
      arrivals.forEach((a, i) => {
        expect(a).toBeGreaterThanOrEqual(schedule[i] - 2);
        expect(a).toBeLessThan(schedule[i] + 20);
      });
    } finally {
      await server.close();
    }
  });

  it('runs a chat dataset and counts chunks when the server sends no usage', async () => {
    const server = await startStandIn({ ttftMs: 5, itlMs: 2, tokenize: false, usage: false });
    const file = path.join(tmp, 'prompts.jsonl');
    fs.writeFileSync(file, [JSON.stringify({ messages: [{ role: 'user', content: 'Hello there' }], max_tokens: 6 }), JSON.stringify({ prompt: 'Tell me a story', max_tokens: 4 })].join('\n'));
    try {
      const { code, err, result } = await bench(['--url', server.url, '--dataset', file, '--concurrency', '2', '--requests', '6', '--warmup', '0', '--progress']);
      expect(code).toBe(0);
      expect(result.target.endpoint).toBe('chat');
      expect(result.server.prompt_format).toBe('dataset');
      const chat = server.requests.slice(1);
      expect(chat.every((r) => r.path === '/v1/chat/completions')).toBe(true);
      expect(chat.map((r) => r.body.max_tokens)).toEqual([6, 4, 6, 4, 6, 4]);
      expect(chat.some((r) => 'ignore_eos' in r.body)).toBe(false);
      // The role-only opening chunk is not a token: 3 × 6 + 3 × 4 output tokens.
      expect(result.points[0].stats.tokens).toMatchObject({ output: 30, from_usage: 0, input_unknown: 6 });
      expect(result.notes.join(' ')).toContain('no usage');
      expect(err).toContain('6/6 done');
    } finally {
      await server.close();
    }
  });
});
