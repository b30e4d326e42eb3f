/**
 * Throughput benchmark (issue #4): HTTP against the bare engine loop, batching gains, the 135M-shape
 * model's decode rate against ONNX Runtime's own MatMul rate, and long against short contexts.
 * Everything is measured in this one run; only ratios are compared.
 *   node --import tsx bench/throughput.ts [--quick]
 */
import ort from 'onnxruntime-node';
import { engineLoop, smolLM2ShapeModel } from './lib.ts';
import { streamLoad } from './http-load.ts';
import { startServerProcess } from './server-process.ts';
import { resolveModel } from '../src/model/resolve.ts';
import { loadModelFolder } from '../src/model/folder.ts';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { DataType, encodeModel, rawBytes } from '../src/model/onnx-proto.ts';
import { seededUniform } from '../src/model/random.ts';
import type { LlamaConfig } from '../src/model/types.ts';
import { headDim } from '../src/model/types.ts';
import { GREEDY } from './lib.ts';
import type { EngineOptions } from '../src/engine/protocol.ts';
import { loadAttentionAddon } from '../src/engine/runners/native-attention.ts';

const quick = process.argv.includes('--quick');

const engineOptions = (modelDir: string) => ({ modelDir, device: { kind: 'cpu' as const }, maxNumSeqs: 64, maxNumBatchedTokens: 2048, kvCacheBytes: 8 * 2 ** 30 });
const prompt16 = (i: number) => [1, ...Array.from({ length: 15 }, (_, j) => 3 + ((i * 31 + j * 17) % 500))];

async function storiesSweep() {
  const { dir } = resolveModel('stories260K', (m) => console.log(m));
  const server = await startServerProcess(dir, ['--served-model-name', 'stories260K']);
  const levels = quick ? [1, 32] : [1, 4, 16, 32, 64];
  // This machine's speed drifts: each round runs every level as HTTP, engine loop, engine loop, HTTP (a drift
  // within the level's seconds cancels), and medians are compared. A side's rate in a round is both halves' tokens
  // over both halves' seconds.
  const rounds = quick ? 1 : 7;
  const both = (a: number, b: number) => 2 / (1 / a + 1 / b);
  const median = (x: number[]) => [...x].sort((a, z) => a - z)[Math.floor(x.length / 2)];
  const body = (i: number) => ({ model: 'stories260K', prompt: prompt16(i), max_tokens: 256, ignore_eos: true, temperature: 0 });
  await streamLoad(server.url, body, 4, 4); // warm-up
  const http = new Map<number, number[]>(levels.map((c) => [c, []]));
  const engine = new Map<number, number[]>(levels.map((c) => [c, []]));
  for (let r = 0; r < rounds; r++) {
    for (const c of levels) {
      const requests = Math.max(c * 2, 8);
      const overHttp = async () => {
        const result = await streamLoad(server.url, body, c, requests);
        if (result.errors) throw new Error(`${result.errors} HTTP errors at concurrency ${c}`);
        return result.tokensPerSecond;
      };
      const inLoop = async () => (await engineLoop(engineOptions(dir), prompt16, c, requests, 256)).tokensPerSecond;
      const h1 = await overHttp();
      const [e1, e2] = [await inLoop(), await inLoop()];
      http.get(c)!.push(both(h1, await overHttp()));
      engine.get(c)!.push(both(e1, e2));
    }
  }
  const rows = levels.map((c) => {
    const [h, e] = [http.get(c)!, engine.get(c)!];
    return { c, http: median(h), engine: median(e), rounds: h.map((x, i) => `${x.toFixed(0)}/${e[i].toFixed(0)}`).join(' ') };
  });
  await server.stop();
  console.log(`\n1-2. stories260K, 16-token prompts, 256 generated tokens (ignore_eos), streaming; medians of ${rounds} rounds of HTTP, engine, engine, HTTP`);
  console.log('concurrency | HTTP tok/s | engine loop tok/s | HTTP / engine | HTTP vs c=1 | rounds (HTTP/engine tok/s)');
  for (const r of rows) {
    console.log(`${String(r.c).padStart(11)} | ${r.http.toFixed(0).padStart(10)} | ${r.engine.toFixed(0).padStart(17)} | ${(r.http / r.engine).toFixed(3).padStart(13)} | ${(r.http / rows[0].http).toFixed(2).padStart(10)}x | ${r.rounds}`);
  }
  // Per round, too: HTTP and the engine loop ran back to back, c=1 and c=32 within the same round.
  const [h1, h32, e32] = [http.get(1)!, http.get(32)!, engine.get(32)!];
  const perRound = (x: number[]) => (x.length > 1 ? ` (rounds: ${x.map((v) => v.toFixed(2)).join(', ')}; median ${median(x).toFixed(3)})` : '');
  const c32 = rows.find((r) => r.c === 32)!;
  console.log(`bar 1: c32 / c1 = ${(c32.http / rows[0].http).toFixed(2)} (≥ 10)${perRound(h32.map((v, i) => v / h1[i]))}`);
  console.log(`bar 2: HTTP / engine at c32 = ${(c32.http / c32.engine).toFixed(3)} (≥ 0.85)${perRound(h32.map((v, i) => v / e32[i]))}`);
}


function parameterCount(c: LlamaConfig): number {
  const hd = headDim(c);
  const layer = c.hidden_size * (c.num_attention_heads + 2 * c.num_key_value_heads) * hd + c.num_attention_heads * hd * c.hidden_size + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size;
  return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * (c.tie_word_embeddings ? 1 : 2) + c.hidden_size;
}

/** ONNX Runtime's fp32 MatMuls at batch `b` over exactly the model's linear weights: `time()` runs them once. */
export async function matmulProbe(c: LlamaConfig, b: number): Promise<{ flops: number; time: () => Promise<number>; release: () => Promise<void> }> {
  const hd = headDim(c);
  const H = c.hidden_size;
  const shapes: [number, number][] = [];
  for (let l = 0; l < c.num_hidden_layers; l++) {
    shapes.push([H, (c.num_attention_heads + 2 * c.num_key_value_heads) * hd], [c.num_attention_heads * hd, H], [H, 2 * c.intermediate_size], [c.intermediate_size, H]);
  }
  shapes.push([H, c.vocab_size]);
  const rand = seededUniform(3);
  const inputs = [...new Set(shapes.map((s) => s[0]))];
  const nodes = [];
  const initializers = [];
  const sums: string[] = [];
  let flops = 0;
  for (const [i, [k, n]] of shapes.entries()) {
    const w = new Float32Array(k * n).map(() => rand() - 0.5);
    initializers.push({ name: `w${i}`, type: DataType.FLOAT, dims: [k, n], raw: rawBytes(w) });
    nodes.push({ opType: 'MatMul', inputs: [`x${k}`, `w${i}`], outputs: [`y${i}`], name: `mm${i}` });
    nodes.push({ opType: 'ReduceSum', inputs: [`y${i}`], outputs: [`s${i}`], name: `rs${i}`, attributes: { keepdims: 0 } });
    sums.push(`s${i}`);
    flops += 2 * b * k * n;
  }
  nodes.push({ opType: 'Sum', inputs: sums, outputs: ['total'], name: 'sum' });
  const { model } = encodeModel({
    graphName: 'matmul-rate', nodes, initializers, opsets: [{ domain: '', version: 17 }], metadata: {},
    inputs: inputs.map((k) => ({ name: `x${k}`, type: DataType.FLOAT, dims: [b, k] })),
    outputs: [{ name: 'total', type: DataType.FLOAT, dims: [] }],
  });
  const session = await ort.InferenceSession.create(model, { graphOptimizationLevel: 'all', interOpNumThreads: 1, executionMode: 'sequential' });
  const feeds = Object.fromEntries(inputs.map((k) => [`x${k}`, new ort.Tensor('float32', new Float32Array(b * k).map(() => rand()), [b, k])]));
  for (let i = 0; i < 3; i++) await session.run(feeds); // first runs fault in the weights
  const time = async () => {
    const t = performance.now();
    await session.run(feeds);
    return (performance.now() - t) / 1000;
  };
  return { flops, time, release: () => session.release() };
}

/**
 * Decode-only throughput at two prompt lengths, measured over the same minutes: two engines that take turns of
 * TURN_STEPS steps, so drift in this machine's speed falls on both alike, while within a turn each engine runs
 * step after step as a server does (what stays in the L3 cache from one step to the next counts). The
 * short-context requests start once the long ones are decoding; only steps that decode every sequence and
 * prefill nothing count (decode tokens over their wall time). `between` runs as many times after each turn,
 * while the short ones decode.
 */
const TURN_STEPS = 8;

async function pairedDecodeRates(
  modelDir: string,
  concurrency: number,
  promptLens: [number, number],
  newTokens: number,
  extra: Partial<EngineOptions> = {},
  between?: () => Promise<void>,
): Promise<[number, number]> {
  const engines: Awaited<ReturnType<typeof createEngineCore>>[] = [];
  const tokens = [0, 0];
  const seconds = [0, 0];
  const done = [0, 0];
  for (const k of [0, 1]) {
    engines.push(
      await createEngineCore(
        { ...engineOptions(modelDir), maxNumBatchedTokens: 4096, ...extra },
        (events) => {
          for (const e of events) {
            if (e.finish === 'error') throw new Error(e.error);
            if (e.finish) done[k]++;
          }
        },
        (r) => {
          if (r.prefillTokens === 0 && r.decodeTokens === concurrency) {
            tokens[k] += r.decodeTokens;
            seconds[k] += (r.endMs - r.startMs) / 1000;
          }
        },
      ),
    );
  }
  const submit = (k: number) => {
    for (let i = 0; i < concurrency; i++) {
      const promptIds = [1, ...Array.from({ length: promptLens[k] - 1 }, (_, j) => 2 + ((i * 131 + j * 7) % 40000))];
      engines[k].scheduler.submit({ id: String(i), promptIds, maxTokens: newTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], sampling: GREEDY });
    }
  };
  submit(1);
  while (tokens[1] === 0) await engines[1].scheduler.step();
  submit(0);
  while (done[0] < concurrency || done[1] < concurrency) {
    for (const k of [0, 1]) for (let i = 0; i < TURN_STEPS && done[k] < concurrency; i++) await engines[k].scheduler.step();
    for (let i = 0; between && i < TURN_STEPS && tokens[0] > 0 && done[0] < concurrency; i++) await between();
  }
  for (const e of engines) await e.release();
  return [tokens[0] / seconds[0], tokens[1] / seconds[1]];
}

async function smolBench() {
  const dir = smolLM2ShapeModel();
  const config = loadModelFolder(dir).config;
  const params = parameterCount(config);
  const batch = 32;
  const newTokens = quick ? 16 : 48;
  // This machine's speed drifts by tens of percent over minutes, so each ratio's two sides are measured
  // back to back, in alternating rounds, and the medians compared.
  const rounds = quick ? 1 : 3;
  const median = (x: number[]) => [...x].sort((a, z) => a - z)[Math.floor(x.length / 2)];
  const rates: number[] = [];
  const shorts: number[] = [];
  const longs: number[] = [];
  const fullShorts: number[] = [];
  const fullLongs: number[] = [];
  const full = { kvCacheDtype: 'float32' as const };
  const probe = await matmulProbe(config, batch);
  for (let r = 0; r < rounds; r++) {
    // The MatMul rate is sampled between the decode steps it is compared with.
    const times: number[] = [];
    const [short, long] = await pairedDecodeRates(dir, batch, [128, 1024], newTokens, {}, async () => void times.push(await probe.time()));
    rates.push(probe.flops / median(times));
    shorts.push(short);
    longs.push(long);
    const [fullShort, fullLong] = await pairedDecodeRates(dir, batch, [128, 1024], newTokens, full);
    fullShorts.push(fullShort);
    fullLongs.push(fullLong);
  }
  await probe.release();
  const [rate, short, long] = [median(rates), median(shorts), median(longs)];
  const list = (x: number[], unit: (v: number) => string) => (x.length > 1 ? ` (rounds: ${x.map(unit).join(', ')})` : '');
  console.log(`\n3-4. SmolLM2-135M shape (random weights, ${(params / 1e6).toFixed(1)} M parameters), concurrency ${batch}, decode steps only, medians of ${rounds} rounds;`);
  console.log(`    in each round a 128-token and a 1024-token engine take turns of ${TURN_STEPS} steps, and the MatMuls run as often after each turn`);
  console.log(`ONNX Runtime fp32 MatMul rate at batch ${batch} over the model's linear weights: ${(rate / 1e9).toFixed(1)} GFLOP/s${list(rates, (v) => (v / 1e9).toFixed(1))}`);
  console.log(`KV cache float16 (the default with native attention):`);
  console.log(`decode at 128-token contexts:  ${short.toFixed(1)} tok/s = ${((short * 2 * params) / 1e9).toFixed(1)} GFLOP/s${list(shorts, (v) => v.toFixed(1))}`);
  console.log(`decode at 1024-token contexts: ${long.toFixed(1)} tok/s = ${((long * 2 * params) / 1e9).toFixed(1)} GFLOP/s${list(longs, (v) => v.toFixed(1))}`);
  // Each round's sides ran over the same minutes, so the bars are medians of the rounds' ratios.
  const bar3 = shorts.map((v, i) => (v * 2 * params) / rates[i]);
  const ratios = longs.map((l, i) => l / shorts[i]);
  const fullRatios = fullLongs.map((l, i) => l / fullShorts[i]);
  console.log(`bar 3: decode FLOP rate / MatMul rate = ${median(bar3).toFixed(3)} (≥ 0.5)${list(bar3, (v) => v.toFixed(3))}; of the medians above ${((short * 2 * params) / rate).toFixed(3)}   bar 4: 1024-token / 128-token = ${median(ratios).toFixed(3)} (≥ 0.65)${list(ratios, (v) => v.toFixed(3))}`);
  console.log(`with --kv-cache-dtype fp32 (twice the cache bytes): 128-token ${median(fullShorts).toFixed(1)} tok/s${list(fullShorts, (v) => v.toFixed(1))} = ${((median(fullShorts) * 2 * params) / rate).toFixed(3)} of the MatMul rate, 1024-token ${median(fullLongs).toFixed(1)} tok/s${list(fullLongs, (v) => v.toFixed(1))}, 1024 / 128 = ${median(fullRatios).toFixed(3)}${list(fullRatios, (v) => v.toFixed(3))}`);

  // Bar 2's comparison on this model: HTTP overhead is per token, so it shrinks as the model grows.
  const server = await startServerProcess(dir, ['--served-model-name', 'smol']);
  const promptIds = (i: number) => [1, ...Array.from({ length: 15 }, (_, j) => 2 + ((i * 131 + j * 7) % 40000))];
  const body = (i: number) => ({ model: 'smol', prompt: promptIds(i), max_tokens: newTokens, ignore_eos: true, temperature: 0 });
  const [https, loops]: number[][] = [[], []];
  for (let r = 0; r < rounds; r++) {
    https.push((await streamLoad(server.url, body, batch, batch)).tokensPerSecond);
    loops.push((await engineLoop(engineOptions(dir), promptIds, batch, batch, newTokens)).tokensPerSecond);
  }
  await server.stop();
  const httpRatios = https.map((h, i) => h / loops[i]);
  console.log(`same model, concurrency ${batch}, 16-token prompts, ${newTokens} tokens: HTTP ${median(https).toFixed(1)} tok/s, engine loop ${median(loops).toFixed(1)} tok/s, HTTP / engine = ${median(httpRatios).toFixed(3)}${list(httpRatios, (v) => v.toFixed(3))}`);
}

const addon = loadAttentionAddon();
console.log(`attention on the CPU: ${'binding' in addon ? `native/attention (${addon.binding.kernels} kernels), paged cache in float16` : `inside the ONNX graph (${addon.reason})`}`);
const only = process.argv.find((a) => a.startsWith('--only='))?.slice(7);
if (!only || only === 'stories') await storiesSweep();
if (!only || only === 'smol') await smolBench();
if (only === 'matmul') {
  const config = loadModelFolder(smolLM2ShapeModel()).config;
  const probe = await matmulProbe(config, 32);
  for (let i = 0; i < 12; i++) console.log(`MatMul rate at batch 32: ${(probe.flops / (await probe.time()) / 1e9).toFixed(1)} GFLOP/s`);
  await probe.release();
}
