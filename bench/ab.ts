/**
 * Two `tally serve` processes side by side: the same streaming workload against each, alternating in every round
 * (A, B, B, A, so a drift within the round cancels), medians of the per-round B / A ratios. A and B differ by
 * checkout (`--a-root DIR`, e.g. a worktree of an older commit) or by flags (`--a-flags`, `--b-flags`).
 *   node --import tsx bench/ab.ts --model stories260K [--a-root DIR] [--b-root DIR] [--a-flags "..."] [--b-flags "..."]
 *        [--levels 1,32] [--rounds 5] [--max-tokens 256] [--spread]
 * --spread: each request's max_tokens is spread over 0.5-1.5× --max-tokens, so that requests end and arrive one by
 * one (prompts join running decodes) rather than in lockstep bursts.
 */
import path from 'node:path';
import { parseArgs } from 'node:util';
import { streamLoad } from './http-load.ts';
import { startServerProcess } from './server-process.ts';
import { resolveModel } from '../src/model/resolve.ts';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const { values } = parseArgs({
  options: {
    model: { type: 'string', default: 'stories260K' },
    'a-root': { type: 'string', default: ROOT },
    'b-root': { type: 'string', default: ROOT },
    'a-flags': { type: 'string', default: '' },
    'b-flags': { type: 'string', default: '' },
    levels: { type: 'string', default: '1,32' },
    rounds: { type: 'string', default: '5' },
    'max-tokens': { type: 'string', default: '256' },
    spread: { type: 'boolean', default: false },
  },
});
const levels = values.levels.split(',').map(Number);
const rounds = Number(values.rounds);
const maxTokens = Number(values['max-tokens']);
const median = (x: number[]) => [...x].sort((a, b) => a - b)[Math.floor(x.length / 2)];
const flags = (s: string) => s.split(' ').filter(Boolean);

const { dir } = resolveModel(values.model, (m) => console.log(m));
const name = path.basename(dir);
const tokensOf = (i: number) => (values.spread ? Math.max(2, Math.round(maxTokens * (0.5 + ((i * 37) % 101) / 100))) : maxTokens);
const body = (i: number) => ({ model: name, prompt: [1, ...Array.from({ length: 15 }, (_, j) => 3 + ((i * 31 + j * 17) % 500))], max_tokens: tokensOf(i), ignore_eos: true, temperature: 0 });
const a = await startServerProcess(dir, ['--served-model-name', name, ...flags(values['a-flags'])], { root: values['a-root'] });
const b = await startServerProcess(dir, ['--served-model-name', name, ...flags(values['b-flags'])], { root: values['b-root'] });
try {
  for (const s of [a, b]) await streamLoad(s.url, body, 4, 8);
  console.log(`A: ${values['a-root']} ${values['a-flags']}\nB: ${values['b-root']} ${values['b-flags']}`);
  console.log(`${name}, 16-token prompts, ${values.spread ? `0.5-1.5 × ${maxTokens}` : maxTokens} tokens (ignore_eos), streaming; ${rounds} rounds of A, B, B, A`);
  console.log('concurrency | A tok/s | B tok/s | B / A | rounds (B / A)');
  for (const c of levels) {
    const requests = Math.max(2 * c, 8);
    const run = async (s: { url: string }) => {
      const r = await streamLoad(s.url, body, c, requests);
      if (r.errors) throw new Error(`${r.errors} HTTP errors at concurrency ${c}`);
      return r.tokensPerSecond;
    };
    const ra: number[] = [];
    const rb: number[] = [];
    for (let r = 0; r < rounds; r++) {
      const a1 = await run(a);
      const [b1, b2] = [await run(b), await run(b)];
      const a2 = await run(a);
      ra.push((a1 + a2) / 2);
      rb.push((b1 + b2) / 2);
    }
    const ratios = rb.map((v, i) => v / ra[i]);
    console.log(`${String(c).padStart(11)} | ${median(ra).toFixed(0).padStart(7)} | ${median(rb).toFixed(0).padStart(7)} | ${median(ratios).toFixed(3)} | ${ratios.map((r) => r.toFixed(2)).join(' ')}`);
  }
} finally {
  await a.stop();
  await b.stop();
}
