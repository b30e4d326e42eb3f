/**
 * `tally bench` against a real Tally server on stories260K: the bench's token totals must equal what the
 * server metered (GET /v1/cost), and its server-metered $/M the server's own figures.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runBenchCommand } from '../src/cli/bench.ts';
import type { BenchResult } from '../src/loadgen/run.ts';
import { type RunningServer } from '../src/server/start.ts';
import { storiesModel } from './helpers/models.ts';
import { startServerWith } from './helpers/server.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-bench-tally-'));
let server: RunningServer;

beforeAll(async () => {
  server = await startServerWith({ model: storiesModel(), host: '127.0.0.1', port: 0, device: 'cpu', dataDir: path.join(tmp, 'data'), logLevel: 'silent', devicePrice: '2' });
});

afterAll(async () => {
  await server?.shutdown(1);
  fs.rmSync(tmp, { recursive: true, force: true });
});

describe('bench against Tally', () => {
  it('reports the token totals and $/M the server metered', async () => {
    const json = path.join(tmp, 'tally.json');
    let out = '';
    const code = await runBenchCommand(
      ['--url', server.url, '--model', 'stories260K', '--concurrency', '1,4', '--rate', '40', '--requests', '8', '--input-len', '24', '--input-len-spread', '0.25', '--output-len', '20', '--warmup', '2', '--device-price', '2', '--api-models', 'openai:gpt-6-sol,anthropic:claude-haiku-4-5', '--json', json],
      { out: (t) => (out += t), err: { write: () => true, isTTY: false } },
    );
    expect(code).toBe(0);
    const result = JSON.parse(fs.readFileSync(json, 'utf8')) as BenchResult;
    expect(result.server).toMatchObject({ prompt_format: 'ids', tokenizer: 'server', exact_output: true, include_usage: true, reports_cost: true });
    expect(out).toContain('server-metered');

    for (const point of result.points) {
      const s = point.stats;
      expect(s.requests).toEqual({ sent: 8, completed: 8, failed: 0 });
      // ignore_eos + min_tokens: every request generated exactly --output-len tokens.
      expect(s.tokens.output).toBe(8 * 20);
      expect(s.tokens.input).toBeGreaterThanOrEqual(8 * 18);
      expect(s.tokens.input).toBeLessThanOrEqual(8 * 30);
      expect(s.server).not.toBeNull();
      expect(point.cost.input_share_from).toBe('server');
      expect(point.cost.usd_per_million.blended).toBeGreaterThan(0);
    }

    // The server's own totals: every request the bench sent (probe, warm-up, load points) and nothing else.
    const res = await fetch(`${server.url}/v1/cost?window=1h&models=openai:gpt-6-sol`);
    const cost = (await res.json()) as {
      requests: number;
      tokens: { prompt: number; completion: number };
      device_seconds: { prefill: number; decode: number };
      usd_per_million_tokens: { usage: { input: number; output: number; blended: number } };
    };
    expect(result.totals.requests.completed).toBe(1 + 2 + 3 * 8);
    expect(cost.requests).toBe(result.totals.requests.completed);
    expect(result.totals.tokens.input).toBe(cost.tokens.prompt);
    expect(result.totals.tokens.output).toBe(cost.tokens.completion);
    expect(result.totals.server!.prefill_s).toBeCloseTo(cost.device_seconds.prefill, 9);
    expect(result.totals.server!.decode_s).toBeCloseTo(cost.device_seconds.decode, 9);
    const metered = result.totals_cost.metered!.usd_per_million;
    const rel = (a: number, b: number) => Math.abs(a - b) / Math.abs(b);
    expect(rel(metered.input!, cost.usd_per_million_tokens.usage.input)).toBeLessThan(1e-9);
    expect(rel(metered.output!, cost.usd_per_million_tokens.usage.output)).toBeLessThan(1e-9);
    expect(rel(metered.blended!, cost.usd_per_million_tokens.usage.blended)).toBeLessThan(1e-9);
    // The sum over the load points and the unmeasured requests is the total.
    const sum = (f: (s: BenchResult['totals']) => number) => result.points.reduce((a, p) => a + f(p.stats), f(result.unmeasured));
    expect(sum((s) => s.tokens.input)).toBe(cost.tokens.prompt);
    expect(sum((s) => s.tokens.output)).toBe(cost.tokens.completion);
  });

  it('--shared-prefix N:L sends prompts that begin with one of N prefixes, which the server then serves from its cache', async () => {
    type Cost = { requests: number; tokens: { prompt: number; cached_prompt: number } };
    const before = (await (await fetch(`${server.url}/v1/cost?window=1h&models=openai:gpt-6-sol`)).json()) as Cost;
    const json = path.join(tmp, 'shared.json');
    let out = '';
    const code = await runBenchCommand(
      ['--url', server.url, '--model', 'stories260K', '--concurrency', '2', '--requests', '12', '--shared-prefix', '2:150', '--input-len', '10', '--output-len', '4', '--warmup', '0', '--api-models', 'openai:gpt-6-sol', '--json', json],
      { out: (t) => (out += t), err: { write: () => true, isTTY: false } },
    );
    expect(code).toBe(0);
    const result = JSON.parse(fs.readFileSync(json, 'utf8')) as BenchResult;
    expect(result.config.shared_prefix).toEqual({ count: 2, length: 150 });
    expect(result.points[0].stats.tokens.input).toBe(12 * 160);
    expect(out).toContain('prefix cache (2 shared prefixes of 150 tokens)');
    const after = (await (await fetch(`${server.url}/v1/cost?window=1h&models=openai:gpt-6-sol`)).json()) as Cost;
    // Each prefix's two full pages (128 tokens) are computed once or twice (two clients) and reused after.
    const cached = after.tokens.cached_prompt - before.tokens.cached_prompt;
    expect(after.requests - before.requests).toBe(13); // the probe and the load point
    expect(cached % 64).toBe(0);
    expect(cached).toBeGreaterThanOrEqual(128 * (12 - 4));
    expect(cached).toBeLessThanOrEqual(128 * 12);
  });
});
