/**
 * Single-stream decode speed of the bare engine on stories260K (issue #2): greedy from BOS, 256 tokens
 * (ignore_eos), the median of several runs.
 *   node --import tsx bench/single-stream.ts [runs]
 */
import { engineLoop } from './lib.ts';
import { resolveModel } from '../src/model/resolve.ts';

const runs = Number(process.argv[2] ?? 7);
const { dir } = resolveModel('stories260K');
const rates: number[] = [];
for (let i = 0; i < runs; i++) {
  const r = await engineLoop({ modelDir: dir, device: { kind: 'cpu' }, maxNumSeqs: 1, maxNumBatchedTokens: 512, kvCacheBytes: 2 ** 28 }, () => [1], 1, 1, 256);
  rates.push(r.tokensPerSecond);
}
rates.sort((a, b) => a - b);
console.log(`stories260K single stream, 256 tokens from BOS: median ${rates[Math.floor(runs / 2)].toFixed(0)} tok/s over ${runs} runs (min ${rates[0].toFixed(0)}, max ${rates[runs - 1].toFixed(0)})`);
