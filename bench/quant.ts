/**
 * Quantised weights (issue #19): random-weight models of SmolLM2-135M's shape as fp32, int8 and int4
 * (MatMulNBits) served over HTTP side by side, single stream (c=1) and c=32, and TinyLlama-1.1B's shape as int4
 * at c=1 and c=8 with the server's peak RSS. Only ratios measured in this one run are compared.
 * --engine-loop: instead, the bare engine loop (no HTTP) at c=32, fp32/int8/int4 alternating.
 *   node --import tsx bench/quant.ts [--rounds N] [--no-tinyllama | --only-tinyllama] [--engine-loop]
 */
import fs from 'node:fs';
import path from 'node:path';
import { streamLoad } from './http-load.ts';
import { peakRssMb, startServerProcess } from './server-process.ts';
import type { QuantChoice } from '../src/model/convert.ts';
import { engineLoop, randomShapeModel } from './lib.ts';

const arg = (name: string) => process.argv[process.argv.indexOf(name) + 1];
const rounds = process.argv.includes('--rounds') ? Number(arg('--rounds')) : 3;
const median = (x: number[]) => [...x].sort((a, b) => a - b)[Math.floor(x.length / 2)];

function onnxDataMb(dir: string): number {
  return fs.statSync(path.join(dir, 'onnx', 'model.onnx_data')).size / 2 ** 20;
}

const prompt = (i: number) => [1, ...Array.from({ length: 15 }, (_, j) => 100 + ((i * 31 + j * 17) % 4000))];

async function smolLM2(): Promise<void> {
  const variants = ['fp32', 'int8', 'int4'] as const;
  const dirs = variants.map((v) => randomShapeModel('SmolLM2-135M-Instruct', v === 'fp32' ? undefined : v));
  variants.forEach((v, i) => console.log(`SmolLM2-135M shape ${v}: weights file ${onnxDataMb(dirs[i]).toFixed(0)} MiB`));
  // All three servers up at once, idle but one at a time under load; each round measures every variant at c=1
  // and then at c=32, so a drift of the machine's speed hits them alike.
  const servers = [];
  for (const [i, v] of variants.entries()) servers.push(await startServerProcess(dirs[i], ['--served-model-name', v]));
  try {
    const rates = new Map<string, number[]>();
    const body = (model: string, maxTokens: number) => (i: number) => ({ model, prompt: prompt(i), max_tokens: maxTokens, ignore_eos: true, temperature: 0 });
    for (const [i, v] of variants.entries()) await streamLoad(servers[i].url, body(v, 16), 32, 32); // warm-up: first runs at each batch shape
    for (let r = 0; r < rounds; r++) {
      for (const c of [1, 32]) {
        for (const [i, v] of variants.entries()) {
          const res = await streamLoad(servers[i].url, body(v, c === 1 ? 128 : 64), c, c === 1 ? 2 : 2 * c);
          if (res.errors) throw new Error(`${res.errors} HTTP errors (${v}, c=${c})`);
          const key = `${v} c=${c}`;
          rates.set(key, [...(rates.get(key) ?? []), res.tokensPerSecond]);
        }
      }
    }
    for (const c of [1, 32]) {
      const base = rates.get(`fp32 c=${c}`)!;
      for (const v of variants) {
        const x = rates.get(`${v} c=${c}`)!;
        const ratios = x.map((y, i) => y / base[i]);
        console.log(`SmolLM2-135M ${v} c=${c}: ${median(x).toFixed(1)} tok/s (rounds ${x.map((y) => y.toFixed(1)).join(', ')}); / fp32 c=${c}: median ${median(ratios).toFixed(2)} (rounds ${ratios.map((y) => y.toFixed(2)).join(', ')})`);
      }
    }
    const ratio = (v: string, c: number) => median(rates.get(`${v} c=${c}`)!.map((y, i) => y / rates.get(`fp32 c=${c}`)![i]));
    for (const [v, c, bar] of [['int8', 1, 1.7], ['int4', 1, 2.2], ['int8', 32, 1], ['int4', 32, 1]] as const) {
      const r = ratio(v, c);
      console.log(`bar: ${v} c=${c} / fp32 c=${c} = ${r.toFixed(2)} (>= ${bar}): ${r >= bar ? 'met' : 'NOT met'}`);
    }
    for (const [i, v] of variants.entries()) {
      const cost = await (await fetch(`${servers[i].url}/v1/cost?window=1h&models=openai:gpt-5`)).json();
      const models = await (await fetch(`${servers[i].url}/v1/models`)).json();
      console.log(`  ${v}: /v1/models precision ${models.data[0].precision}, /v1/cost ${JSON.stringify(cost.model)}, peak RSS ${peakRssMb(servers[i].pid).toFixed(0)} MiB`);
    }
  } finally {
    for (const s of servers) await s.stop();
  }
}

async function tinyLlama(): Promise<void> {
  const dir = randomShapeModel('TinyLlama-1.1B-Chat-v1.0', 'int4');
  console.log(`TinyLlama-1.1B shape int4: weights file ${onnxDataMb(dir).toFixed(0)} MiB`);
  const server = await startServerProcess(dir, ['--served-model-name', 'tinyllama-int4', '--kv-cache-gb', '1']);
  try {
    const body = (i: number) => ({ model: 'tinyllama-int4', prompt: prompt(i), max_tokens: 64, ignore_eos: true, temperature: 0 });
    await streamLoad(server.url, body, 1, 1);
    for (const c of [1, 8]) {
      const res = await streamLoad(server.url, body, c, c === 1 ? 2 : c);
      if (res.errors) throw new Error(`${res.errors} HTTP errors (TinyLlama c=${c})`);
      console.log(`TinyLlama-1.1B int4 c=${c}: ${res.tokensPerSecond.toFixed(1)} tok/s, server peak RSS so far ${peakRssMb(server.pid).toFixed(0)} MiB`);
    }
  } finally {
    await server.stop();
  }
}

async function engineLoopC32(): Promise<void> {
  const variants = ['fp32', 'int8', 'int4'] as const;
  const dirs = variants.map((v) => randomShapeModel('SmolLM2-135M-Instruct', v === 'fp32' ? undefined : v));
  const rates = variants.map(() => [] as number[]);
  for (let r = 0; r < rounds; r++) {
    for (const [i, dir] of dirs.entries()) {
      const res = await engineLoop({ modelDir: dir, device: { kind: 'cpu' }, maxNumSeqs: 64, maxNumBatchedTokens: 2048, kvCacheBytes: 2 ** 30 }, prompt, 32, 32, 32);
      rates[i].push(res.tokensPerSecond);
    }
  }
  for (const [i, v] of variants.entries()) {
    const ratios = rates[i].map((y, r) => y / rates[0][r]);
    console.log(`SmolLM2-135M engine loop c=32 ${v}: ${median(rates[i]).toFixed(1)} tok/s (rounds ${rates[i].map((y) => y.toFixed(1)).join(', ')}); / fp32: median ${median(ratios).toFixed(2)} (rounds ${ratios.map((y) => y.toFixed(2)).join(', ')})`);
  }
}

if (process.argv.includes('--engine-loop')) {
  await engineLoopC32();
} else {
  if (!process.argv.includes('--only-tinyllama')) await smolLM2();
  if (!process.argv.includes('--no-tinyllama')) await tinyLlama();
}
