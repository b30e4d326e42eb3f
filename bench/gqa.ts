/**
 * The gqa runner (ONNX Runtime's GroupQueryAttention over a cache in the session's memory; the CUDA path) against
 * the native runner on the CPU, the bare engine loop (no HTTP), rounds alternating: output tokens/s at c=1 and
 * c=32, 48 tokens per request after a 16-token prompt, SmolLM2-135M's shape with random weights. On the CPU this
 * only says what the gqa path costs where it is not meant to serve; its figures on a GPU come from
 * bench/gpu-check.sh.
 *   node --import tsx bench/gqa.ts [--rounds N] [--quant int8|int4]
 */
import { engineLoop, randomShapeModel } from './lib.ts';
import type { QuantChoice } from '../src/model/convert.ts';
import { ENGINE_DEFAULTS } from '../src/engine/protocol.ts';

const arg = (name: string) => {
  const at = process.argv.indexOf(`--${name}`);
  return at >= 0 ? process.argv[at + 1] : undefined;
};
const rounds = Number(arg('rounds') ?? 2);
const quant = arg('quant') as QuantChoice | undefined;
const median = (x: number[]) => [...x].sort((a, b) => a - b)[Math.floor(x.length / 2)];
const dir = randomShapeModel('SmolLM2-135M-Instruct', quant);
const runners = ['native', 'gqa'] as const;
const rates: Record<string, Record<number, number[]>> = { native: { 1: [], 32: [] }, gqa: { 1: [], 32: [] } };
const prompt = (i: number) => [1, ...Array.from({ length: 15 }, (_, j) => 100 + ((i * 31 + j * 17) % 4000))];
for (let round = 0; round < rounds; round++) {
  for (const runner of round % 2 ? [...runners].reverse() : runners) {
    for (const c of [1, 32]) {
      const options = { ...ENGINE_DEFAULTS, modelDir: dir, device: { kind: 'cpu' as const }, maxNumSeqs: 32, maxModelLen: 1024, runner, kvCacheDtype: runner === 'native' ? ('float32' as const) : undefined };
      rates[runner][c].push((await engineLoop(options, prompt, c, c === 1 ? 3 : 64, 48)).tokensPerSecond);
    }
  }
}
console.log(`SmolLM2-135M shape ${quant ?? 'fp32'}, engine loop, ${rounds} rounds, medians (native with a float32 cache, as gqa's)`);
for (const c of [1, 32]) {
  const [g, n] = [median(rates.gqa[c]), median(rates.native[c])];
  console.log(`c=${String(c).padEnd(3)} tokens/s  gqa ${g.toFixed(1).padStart(8)}  native ${n.toFixed(1).padStart(8)}  gqa/native ${(g / n).toFixed(3)}   rounds ${rates.gqa[c].map((v, i) => (v / rates.native[c][i]).toFixed(2)).join(' ')}`);
}
