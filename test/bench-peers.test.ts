/**
 * `tally bench` against servers that frame and end their streams as real peers do (stand-ins of known
 * timings): closing after every response without saying so (llama.cpp's server), `Connection: close`,
 * HTTP/1.0, `Content-Length` bodies, SSE comments, and servers that ignore ignore_eos/min_tokens.
 * Every request must be measured without an error and every token counted.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runBenchCommand } from '../src/cli/bench.ts';
import type { CompareResult } from '../src/loadgen/compare.ts';
import type { BenchResult } from '../src/loadgen/run.ts';
import type { RequestRecord } from '../src/loadgen/types.ts';
import { type StandInOptions, startStandIn } from './helpers/stand-in-server.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-bench-peers-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let runs = 0;
async function bench<T = BenchResult>(args: string[]): Promise<{ code: number; out: string; err: string; result: T }> {
  const json = path.join(tmp, `run-${runs++}.json`);
  let out = '';
  let err = '';
  const code = await runBenchCommand([...args, '--json', json, '--api-models', 'openai:gpt-6-sol'], { out: (t) => (out += t), err: { write: (t: string) => (err += t), isTTY: false } });
  return { code, out, err, result: fs.existsSync(json) ? (JSON.parse(fs.readFileSync(json, 'utf8')) as T) : (undefined as T) };
}

/** A plain keep-alive client, as the bench's was: sequential streamed requests on one pooled connection. */
async function plainKeepAlive(url: string, n: number): Promise<{ ok: number; errors: string[] }> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  let ok = 0;
  const errors: string[] = [];
  for (let i = 0; i < n; i++) {
    await new Promise<void>((resolve) => {
      const payload = JSON.stringify({ model: 'stand-in', prompt: 'a b c', max_tokens: 3, stream: true });
      const req = http.request(`${url}/v1/completions`, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (body += c));
        res.on('end', () => {
          if (body.includes('[DONE]')) ok++;
          resolve();
        });
      });
      req.on('error', (e: NodeJS.ErrnoException) => {
        errors.push(`${e.code}: ${e.message}`);
        resolve();
      });
      req.end(payload);
    });
  }
  agent.destroy();
  return { ok, errors };
}

const COMMON = ['--model', 'stand-in', '--concurrency', '1,4', '--requests', '16', '--input-len', '8', '--output-len', '8', '--warmup', '2'];

describe('bench against servers no one here wrote', () => {
  it('the connection-closing stand-in breaks a plain keep-alive client as llama.cpp\'s server did', async () => {
    const server = await startStandIn({ ttftMs: 2, itlMs: 1, connection: 'close' });
    try {
      const { ok, errors } = await plainKeepAlive(server.url, 12);
      expect(errors.length).toBeGreaterThan(0);
      expect(errors.every((e) => /ECONNRESET|EPIPE|socket hang up/.test(e))).toBe(true);
      expect(ok + errors.length).toBe(12);
    } finally {
      await server.close();
    }
  });

  const peers: [string, StandInOptions][] = [
    ['closes after every response, without saying so (llama.cpp)', { connection: 'close' }],
    ['says Connection: close', { connection: 'close-header' }],
    ['answers HTTP/1.0, the body ending with the connection', { connection: 'http10' }],
    ['sends a Content-Length body instead of chunks', { framing: 'content-length' }],
    ['sends a Content-Length body and closes without saying so', { framing: 'content-length', connection: 'close' }],
    ['puts SSE comments between events', { comments: true }],
    ['answers HTTP/1.0 with SSE comments', { connection: 'http10', comments: true }],
  ];
  for (const [what, options] of peers) {
    it(`measures a server that ${what}: 0 errors, every token counted`, async () => {
      const server = await startStandIn({ ttftMs: 10, itlMs: 2, ...options });
      try {
        const { code, out, result } = await bench([...COMMON, '--url', server.url, '--detailed']);
        expect(code).toBe(0);
        expect(out).not.toContain('errors:');
        for (const point of result.points) {
          const s = point.stats;
          expect(s.requests).toEqual({ sent: 16, completed: 16, failed: 0 });
          expect(s.tokens).toMatchObject({ input: 16 * 8, output: 16 * 8, from_usage: 16 });
          expect(s.asked).toEqual({ requests: 16, output_tokens: 16 * 8, received: 16 * 8, short: 0 });
          // Timed from the client's first send: never before the stand-in's schedule.
          expect(s.latency_ms.ttft.min!).toBeGreaterThanOrEqual(10 - 0.5);
          expect(s.latency_ms.e2e.min!).toBeGreaterThanOrEqual(10 + 7 * 2 - 0.5);
          expect(s.latency_ms.itl.count).toBe(16 * 7);
          expect(point.client.cpu_s).toBeGreaterThan(0);
          expect(point.client.cpu_s_per_1k_tokens).toBe(point.client.cpu_s / ((16 * 8) / 1000));
        }
        // The stand-in's handler saw the probe, the warm-up and 32 measured requests, and nothing more: a
        // request sent again had never reached it.
        const retried = result.points.reduce((a, p) => a + p.stats.retried, 0) + result.unmeasured.retried;
        expect(server.requests).toHaveLength(1 + 2 + 32);
        const records = result.points.flatMap((p) => p.records as RequestRecord[]);
        expect(records.filter((r) => r.retries).length).toBe(result.points.reduce((a, p) => a + p.stats.retried, 0));
        expect(records.every((r) => (r.retries ?? 0) <= 1)).toBe(true);
        for (const point of result.points) {
          const c = point.client.connections;
          // Every send went out on a connection opened for it or on a kept-alive one; each retry on a fresh one.
          expect(c.opened + c.reused).toBe(16 + point.stats.retried);
          if (options.connection === 'close') {
            // The server closed kept-alive connections without a word: after two such closes the bench stops
            // reusing them, so that no more requests pay for a reset.
            expect(c.kept_alive).toBe(false);
            expect(c.closed_by_server).toBeGreaterThanOrEqual(2);
            expect(point.stats.retried).toBeLessThanOrEqual(c.closed_by_server);
          } else {
            expect(c.kept_alive).toBe(true);
            expect(point.stats.retried).toBe(0);
            // Said so (Connection: close, HTTP/1.0): a connection per request; else kept alive.
            if (options.connection) expect(c).toMatchObject({ opened: 16, reused: 0 });
            else expect(c.opened).toBeLessThanOrEqual(point.value as number);
          }
        }
        if (options.connection === 'close') expect(result.notes.join(' ')).toContain('opened a connection per request');
        expect(out).toContain('client CPU');
      } finally {
        await server.close();
      }
    });
  }

  it('counts a fresh connection that fails, and a response that breaks off, as errors', async () => {
    // Every generation request is reset before any response byte: retried once on a fresh connection where
    // reused, then counted; the retry never repeats.
    const reset = await startStandIn({ mode: (_i, body) => (body.max_tokens === 2 ? 'ok' : 'reset'), connection: 'close' });
    try {
      const { code, result } = await bench(['--url', reset.url, '--model', 'stand-in', '--concurrency', '2', '--requests', '6', '--output-len', '4', '--warmup', '0']);
      expect(code).toBe(1);
      expect(result.points[0].stats.errors.connection).toBe(6);
      expect(reset.requests.length).toBeLessThanOrEqual(1 + 2 * 6);
    } finally {
      await reset.close();
    }
    const drop = await startStandIn({ ttftMs: 5, itlMs: 1, mode: (_i, body) => (body.max_tokens === 2 ? 'ok' : 'drop'), dropAfter: 2, connection: 'close' });
    try {
      const { result } = await bench(['--url', drop.url, '--model', 'stand-in', '--concurrency', '2', '--requests', '6', '--output-len', '6', '--warmup', '0']);
      expect(result.points[0].stats.errors.stream_dropped).toBe(6);
      expect(result.points[0].stats.retried).toBe(0);
      // A response that broke off is not sent again: one generation request each.
      expect(drop.requests).toHaveLength(1 + 6);
    } finally {
      await drop.close();
    }
  });

  it('says per level when a server ignores ignore_eos/min_tokens, and uses the tokens received', async () => {
    const server = await startStandIn({ ttftMs: 5, itlMs: 1, stopAfter: 5, cost: { prefillPerToken: 0.001, decodePerToken: 0.01 } });
    try {
      const { code, out, result } = await bench([...COMMON, '--url', server.url, '--device-price', '3.6']);
      expect(code).toBe(0);
      expect(server.requests.slice(1).every((r) => r.body.ignore_eos === true && r.body.min_tokens === 8)).toBe(true);
      for (const point of result.points) {
        const s = point.stats;
        expect(s.requests.failed).toBe(0);
        expect(s.tokens.output).toBe(16 * 5);
        expect(s.asked).toEqual({ requests: 16, output_tokens: 16 * 8, received: 16 * 5, short: 16 });
        expect(s.throughput.output_tokens_per_s).toBe((16 * 5) / s.duration_s);
        expect(s.latency_ms.itl.count).toBe(16 * 4);
        const usd = (3.6 * s.duration_s) / 3600;
        expect(point.cost.usd_per_million.blended!).toBeCloseTo((usd / (16 * 8 + 16 * 5)) * 1e6, 9);
      }
      const notes = result.notes.join('\n');
      expect(notes).toContain('c=1: 16 of 16 requests came back shorter');
      expect(notes).toContain('c=4: 16 of 16 requests came back shorter');
      expect(out).toContain('output shorter than asked');
      expect(out).toContain('c=4: 16 of 16 requests short, 80 of 128 tokens');
    } finally {
      await server.close();
    }
  });

  it('counts output tokens with the tokenizer when the server sends no usage', async () => {
    const server = await startStandIn({ ttftMs: 5, itlMs: 1, stopAfter: 6, usage: false, connection: 'close' });
    try {
      const { code, result } = await bench([...COMMON, '--url', server.url, '--detailed']);
      expect(code).toBe(0);
      expect(result.server.output_tokens_from).toBe('tokenizer');
      for (const point of result.points) {
        expect(point.stats.requests.failed).toBe(0);
        // The stand-in's /tokenize counts words: " t0 t1 … t5" is 6 tokens a request.
        expect(point.stats.tokens).toMatchObject({ output: 16 * 6, from_usage: 0 });
        expect((point.records as RequestRecord[]).every((r) => r.tokensFrom === 'tokenizer' && r.text === undefined)).toBe(true);
        expect(point.stats.asked!.short).toBe(16);
      }
      expect(result.notes.join(' ')).toContain('counted by the server\'s /tokenize');
    } finally {
      await server.close();
    }
  });

  it('compares two servers side by side, interleaved point by point, each at its own price', async () => {
    const a = await startStandIn({ ttftMs: 10, itlMs: 2, model: 'm' });
    const b = await startStandIn({ ttftMs: 20, itlMs: 4, model: 'm', connection: 'close' });
    const seen: string[] = [];
    const tag = (name: string, server: typeof a) => {
      const push = server.requests.push.bind(server.requests);
      server.requests.push = (...items) => {
        for (const it of items) seen.push(`${name}${it.body.max_tokens}`);
        return push(...items);
      };
    };
    tag('A', a);
    tag('B', b);
    try {
      const { code, out, result } = await bench<CompareResult>(['--url', a.url, '--url', b.url, '--name', 'fast', '--name', 'slow', '--device-price', '1', '--device-price', '3', '--model', 'm', '--concurrency', '1,2', '--requests', '6', '--input-len', '8', '--output-len', '6', '--warmup', '1']);
      expect(code).toBe(0);
      expect(result.tool).toBe('tally bench compare');
      expect(result.runs.map((r) => [r.target.name, r.pricing.usd_per_device_hour])).toEqual([['fast', 1], ['slow', 3]]);
      // Probes and warm-ups (max_tokens 2 and 6) first, then c=1 on A then B, then c=2 on B then A.
      const measured = seen.filter((x, i) => i >= 4);
      expect(seen.slice(0, 4)).toEqual(['A2', 'A6', 'B2', 'B6']);
      expect(measured.join('')).toBe('A6'.repeat(6) + 'B6'.repeat(6) + 'B6'.repeat(6) + 'A6'.repeat(6));
      for (const row of result.rows) {
        const [fast, slow] = row.servers;
        expect(fast!.failed + slow!.failed).toBe(0);
        expect(fast!.ratio).toBeNull();
        const [pa, pb] = result.runs.map((r) => r.points.find((p) => p.label === row.label)!);
        expect(slow!.ratio!.output_tokens_per_s).toBe(pb.stats.throughput.output_tokens_per_s / pa.stats.throughput.output_tokens_per_s);
        expect(slow!.ratio!.usd_per_million_blended).toBe(pb.cost.usd_per_million.blended! / pa.cost.usd_per_million.blended!);
        // Each at its own price: $/M is its price × its duration over its tokens.
        expect(pb.cost.usd).toBeCloseTo((3 * pb.stats.duration_s) / 3600, 12);
        expect(pa.cost.usd).toBeCloseTo((1 * pa.stats.duration_s) / 3600, 12);
        expect(slow!.ttft_p50_ms!).toBeGreaterThanOrEqual(20 - 0.5);
        expect(fast!.ttft_p50_ms!).toBeGreaterThanOrEqual(10 - 0.5);
      }
      expect(out).toContain('2 servers side by side (interleaved');
      expect(out).toMatch(/c=2\s+slow\s+6\s+0/);
      expect(out).toContain('API ÷ slow');

      // The same two runs saved apart and put together by `tally bench compare`.
      const files = result.runs.map((r, i) => {
        const f = path.join(tmp, `saved-${i}.json`);
        fs.writeFileSync(f, JSON.stringify(r));
        return f;
      });
      const html = path.join(tmp, 'saved.html');
      let text = '';
      const code2 = await runBenchCommand(['compare', ...files, '--html', html], { out: (t) => (text += t), err: { write: () => true, isTTY: false } });
      expect(code2).toBe(0);
      expect(text).toContain('from saved reports');
      expect(fs.readFileSync(html, 'utf8')).toContain('fast vs slow');
      let err = '';
      expect(await runBenchCommand(['compare', files[0]], { out: () => undefined, err: { write: (t: string) => (err += t), isTTY: false } })).toBe(2);
      expect(err).toContain('at least two runs');
    } finally {
      await a.close();
      await b.close();
    }
  });

  it('takes per-server options once for all or once per --url', async () => {
    const { parseBenchArgs } = await import('../src/cli/bench.ts');
    const p = parseBenchArgs(['--url', 'http://a:1', '--url', 'http://b:2', '--device-price', 'h200', '--device-price', '0.5', '--model', 'x', '--devices', '2'], {});
    if (p.help) throw new Error('help');
    expect(p.configs.map((c) => [c.url, c.model, c.pricing.usdPerHour, c.pricing.devices])).toEqual([['http://a:1', 'x', 3.59, 2], ['http://b:2', 'x', 0.5, 2]]);
    expect(() => parseBenchArgs(['--url', 'http://a', '--url', 'http://b', '--url', 'http://c', '--model', 'x', '--model', 'y'], {})).toThrow('--model was given 2 times for 3 --url');
  });

  it('measures an HTTPS server, and says why when its certificate is not trusted', async () => {
    const fixture = (f: string) => fs.readFileSync(path.join(import.meta.dirname, 'fixtures', f), 'utf8');
    const server = await startStandIn({ ttftMs: 5, itlMs: 1, connection: 'close', framing: 'content-length', tls: { key: fixture('localhost-key.pem'), cert: fixture('localhost-cert.pem') } });
    try {
      const strict = await bench([...COMMON, '--url', server.url, '--warmup', '0']);
      expect(strict.code).toBe(1);
      expect(strict.result.points[0].stats.errors.connection).toBe(16);
      expect(strict.result.points[0].stats.error_samples[0].message).toContain('self-signed certificate');
      expect(server.requests).toHaveLength(0);

      process.env.NODE_TLS_REJECT_UNAUTHORIZED = '0';
      const { code, result } = await bench([...COMMON, '--url', server.url]);
      expect(code).toBe(0);
      for (const p of result.points) {
        expect(p.stats.requests).toEqual({ sent: 16, completed: 16, failed: 0 });
        expect(p.stats.tokens.output).toBe(16 * 8);
      }
    } finally {
      delete process.env.NODE_TLS_REJECT_UNAUTHORIZED;
      await server.close();
    }
  });
});
