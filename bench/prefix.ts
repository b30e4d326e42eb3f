/**
 * Prefix caching (issue #21): requests that share a 2,000-token prefix, over HTTP against `tally serve` on the
 * SmolLM2-135M shape (random weights, native attention's paged cache). Each round sends a new prefix twice,
 * one request after the other, each with its own 20-token question: the first misses the cache, the second
 * hits it. Side by side in one run: TTFT, the prefill device-seconds of usage.cost, and cached_tokens.
 *
 *   node --import tsx bench/prefix.ts [--rounds N] [--prefix-len L]
 */
import { parseArgs } from 'node:util';
import { loadModelFolder } from '../src/model/folder.ts';
import { seededRandom } from '../src/loadgen/stats.ts';
import { startServerProcess } from './server-process.ts';
import { smolLM2ShapeModel } from './lib.ts';

const { values } = parseArgs({ options: { rounds: { type: 'string' }, 'prefix-len': { type: 'string' } } });
const rounds = Number(values.rounds ?? 5);
const prefixLen = Number(values['prefix-len'] ?? 2000);
const QUESTION = 20;


interface Measured {
  ttftMs: number;
  cached: number;
  prompt: number;
  prefillSeconds: number;
}

/** One streamed completion: time to the first token, and the final usage. */
async function measure(url: string, prompt: number[]): Promise<Measured> {
  const t0 = performance.now();
  const res = await fetch(`${url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'smol', prompt, max_tokens: 4, ignore_eos: true, temperature: 0, stream: true, stream_options: { include_usage: true } }),
  });
  if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}: ${await res.text()}`);
  let ttftMs: number | undefined;
  let usage: { prompt_tokens: number; prompt_tokens_details: { cached_tokens: number }; cost: { device_seconds: { prefill: number } } } | undefined;
  let buffer = '';
  const decoder = new TextDecoder();
  for await (const chunk of res.body) {
    buffer += decoder.decode(chunk as Uint8Array, { stream: true });
    let cut;
    while ((cut = buffer.indexOf('\n\n')) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!event.startsWith('data: {')) continue;
      const data = JSON.parse(event.slice(6));
      if (ttftMs === undefined && data.choices?.[0]?.text) ttftMs = performance.now() - t0;
      if (data.usage) usage = data.usage;
    }
  }
  if (ttftMs === undefined || !usage) throw new Error('no token or no usage in the stream');
  return { ttftMs, cached: usage.prompt_tokens_details.cached_tokens, prompt: usage.prompt_tokens, prefillSeconds: usage.cost.device_seconds.prefill };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

async function main(): Promise<void> {
  const dir = smolLM2ShapeModel();
  const vocab = loadModelFolder(dir).config.vocab_size;
  const rand = seededRandom(21);
  const tokens = (n: number) => Array.from({ length: n }, () => 100 + Math.floor(rand() * (vocab - 200)));
  const server = await startServerProcess(dir, ['--served-model-name', 'smol', '--max-num-seqs', '4']);
  try {
    // Warm-up: one miss and one hit on a prefix of its own.
    const warm = tokens(prefixLen);
    await measure(server.url, [...warm, ...tokens(QUESTION)]);
    await measure(server.url, [...warm, ...tokens(QUESTION)]);

    const miss: Measured[] = [];
    const hit: Measured[] = [];
    console.log(`prefix caching, SmolLM2-135M shape, ${prefixLen}-token prefix + ${QUESTION}-token question, ${rounds} rounds (each a new prefix: miss, then hit)`);
    for (let r = 0; r < rounds; r++) {
      const prefix = tokens(prefixLen);
      const a = await measure(server.url, [...prefix, ...tokens(QUESTION)]);
      const b = await measure(server.url, [...prefix, ...tokens(QUESTION)]);
      miss.push(a);
      hit.push(b);
      console.log(`  round ${r + 1}: miss TTFT ${a.ttftMs.toFixed(0)} ms, prefill ${a.prefillSeconds.toFixed(4)} dev-s, cached ${a.cached}/${a.prompt}; ` +
        `hit TTFT ${b.ttftMs.toFixed(0)} ms, prefill ${b.prefillSeconds.toFixed(4)} dev-s, cached ${b.cached}/${b.prompt}`);
    }
    const ttft = median(hit.map((h) => h.ttftMs)) / median(miss.map((m) => m.ttftMs));
    const prefill = median(hit.map((h) => h.prefillSeconds)) / median(miss.map((m) => m.prefillSeconds));
    console.log(`\nmedians, hit / miss: TTFT ${ttft.toFixed(3)} (target ≤ 0.2), prefill device-seconds ${prefill.toFixed(3)} (target ≤ 0.2)`);
    console.log(`cached_tokens of the hits: ${Math.min(...hit.map((h) => h.cached))}..${Math.max(...hit.map((h) => h.cached))} of ${hit[0].prompt} (target ≥ ${Math.floor(prefixLen / 64) * 64}); of the misses: ${Math.max(...miss.map((m) => m.cached))}`);
  } finally {
    await server.stop();
  }
}

await main();
