/**
 * The load generator's own cost (issue #22): CPU seconds per 1,000 streamed tokens of `tally bench`'s
 * client (src/loadgen: HTTP/1.1 over raw sockets, every SSE event parsed and timed) against a minimal
 * streaming client (bench/http-load.ts: raw sockets, tokens from the usage chunk, no event parsed), both
 * against the same Tally server (stories260K, in a child process, so this process's CPU is the client's
 * alone), in alternating rounds. Also the tokens/s each saw.
 * Last, the share of the client's CPU that is its own work per event (SSE parsing, JSON, timing): the same
 * code fed a recorded-shape stream in memory, no socket.
 *   node --import tsx bench/loadgen-client.ts [--concurrency 8] [--requests 32] [--max-tokens 128] [--rounds 4]
 */
import { parseArgs } from 'node:util';
import { makePool, sendStreaming } from '../src/loadgen/client.ts';
import type { ConnectionPool, Exchange } from '../src/loadgen/http1.ts';
import { httpSender, runLoadPoint } from '../src/loadgen/load.ts';
import type { RequestSpec } from '../src/loadgen/types.ts';
import { streamLoad } from './http-load.ts';
import { startServerProcess } from './server-process.ts';

const { values } = parseArgs({ options: { concurrency: { type: 'string' }, requests: { type: 'string' }, 'max-tokens': { type: 'string' }, rounds: { type: 'string' }, model: { type: 'string' } } });
const concurrency = Number(values.concurrency ?? 8);
const requests = Number(values.requests ?? 32);
const maxTokens = Number(values['max-tokens'] ?? 128);
const rounds = Number(values.rounds ?? 4);
const model = values.model ?? 'stories260K';

const prompt = (i: number) => Array.from({ length: 16 }, (_, k) => 1 + ((i * 37 + k * 11) % 400));
const body = (i: number) => ({ model: 'stories260K', prompt: prompt(i), max_tokens: maxTokens, ignore_eos: true, min_tokens: maxTokens, temperature: 0 });

interface Sample {
  cpuPer1k: number;
  tokensPerSecond: number;
}

const server = await startServerProcess(model);
try {
  const loadgen = async (): Promise<Sample> => {
    const specs: RequestSpec[] = Array.from({ length: requests }, (_, i) => ({ endpoint: 'completions', body: { ...body(i), stream_options: { include_usage: true } }, plannedOutput: maxTokens }));
    const pool = makePool(server.url);
    const cpu = process.cpuUsage();
    const run = await runLoadPoint({ mode: 'concurrency', value: concurrency }, { requests }, specs, httpSender({ baseUrl: server.url, timeoutMs: 600_000 }, pool));
    const used = process.cpuUsage(cpu);
    pool.destroy();
    const failed = run.records.filter((r) => !r.ok);
    if (failed.length) throw new Error(`loadgen: ${failed.length} errors (${failed[0].error?.message})`);
    const tokens = run.records.reduce((a, r) => a + (r.completionTokens ?? 0), 0);
    return { cpuPer1k: (used.user + used.system) / 1e6 / (tokens / 1000), tokensPerSecond: tokens / ((run.endMs - run.startMs) / 1000) };
  };
  const minimal = async (): Promise<Sample> => {
    const cpu = process.cpuUsage();
    const r = await streamLoad(server.url, body, concurrency, requests);
    const used = process.cpuUsage(cpu);
    if (r.errors) throw new Error(`minimal: ${r.errors} errors`);
    return { cpuPer1k: (used.user + used.system) / 1e6 / (r.outputTokens / 1000), tokensPerSecond: r.tokensPerSecond };
  };
  await minimal();
  await loadgen();
  const a: Sample[] = [];
  const b: Sample[] = [];
  for (let r = 0; r < rounds; r++) {
    // ABBA order, so that a trend over the run falls on both alike.
    if (r % 2 === 0) {
      a.push(await loadgen());
      b.push(await minimal());
    } else {
      b.push(await minimal());
      a.push(await loadgen());
    }
  }
  const median = (x: number[]) => [...x].sort((p, q) => p - q)[Math.floor(x.length / 2)];
  const ratios = a.map((s, i) => s.cpuPer1k / b[i].cpuPer1k);
  const fmt = (x: number[]) => x.map((v) => v.toFixed(3)).join(', ');
  console.log(`client CPU per 1,000 streamed tokens, ${model} over HTTP, concurrency ${concurrency}, ${requests} requests × ${maxTokens} tokens, ${rounds} rounds:`);
  console.log(`  tally bench client (src/loadgen): median ${median(a.map((s) => s.cpuPer1k)).toFixed(4)} s  (rounds ${fmt(a.map((s) => s.cpuPer1k))}); ${median(a.map((s) => s.tokensPerSecond)).toFixed(0)} tok/s`);
  console.log(`  minimal client (bench/http-load): median ${median(b.map((s) => s.cpuPer1k)).toFixed(4)} s  (rounds ${fmt(b.map((s) => s.cpuPer1k))}); ${median(b.map((s) => s.tokensPerSecond)).toFixed(0)} tok/s`);
  console.log(`  ratio loadgen / minimal, per round: ${fmt(ratios)}; median ${median(ratios).toFixed(2)}`);
  console.log(`  tokens/s ratio loadgen / minimal, per round: ${fmt(a.map((s, i) => s.tokensPerSecond / b[i].tokensPerSecond))}`);
} finally {
  await server.stop();
}

/** sendStreaming over an in-memory response of `n` completion chunks: CPU µs per event. */
async function parseCost(n: number, reps: number): Promise<number> {
  const event = (k: number) => Buffer.from(`data: {"id":"cmpl-1","object":"text_completion","created":1733300000,"model":"stories260K","choices":[{"index":0,"text":" word${k}","logprobs":null,"finish_reason":null}],"usage":null}\n\n`);
  const chunks = [...Array.from({ length: n }, (_, k) => event(k)), Buffer.from('data: [DONE]\n\n')];
  const inMemory = {
    request: (_path: string, _method: string, _headers: unknown, _body: unknown, ex: Exchange) => {
      ex.onHead({ status: 200, headers: { 'content-type': 'text/event-stream' } });
      for (const c of chunks) ex.onBody(c);
      ex.onEnd();
      return () => undefined;
    },
  } as unknown as ConnectionPool;
  const target = { baseUrl: 'http://in-memory', timeoutMs: 1e9 };
  const spec: RequestSpec = { endpoint: 'completions', body: { model: 'm', prompt: 'x', max_tokens: n } };
  for (let i = 0; i < reps / 10; i++) await sendStreaming(target, spec, inMemory);
  const cpu = process.cpuUsage();
  for (let i = 0; i < reps; i++) await sendStreaming(target, spec, inMemory);
  const used = process.cpuUsage(cpu);
  return (used.user + used.system) / (reps * n);
}
console.log(`  of which the client's own work per event (SSE parsing, JSON, timing; in memory, no socket): ${(await parseCost(maxTokens, 1000)).toFixed(2)} µs`);
