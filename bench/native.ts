/**
 * The native runner against the JavaScript one (issue #20), side by side in one run, through HTTP: a `tally serve`
 * child per runner (--runner native / --runner js, everything else the same), streaming greedy completions at
 * concurrency 1 and 32, each request's max_tokens spread over 0.5-1.5× --tokens (so that, as in real traffic, requests end
 * and arrive one by one rather than in lockstep bursts whose TTFT is the whole burst's prefill; TTFT leaves out the
 * first wave of `concurrency` requests, sent together at the start). Per model and concurrency: output tokens/s, TTFT p50, per-token decode time p50 (each
 * request's (last token - first token) / (tokens - 1)), the server's peak RSS and its garbage-collection pause time
 * per 1,000 tokens (node --trace-gc, engine worker included). Rounds alternate the runners; the table gives medians
 * and native / js ratios.
 * Then the bare engine loop (no HTTP, no worker; bench/lib.ts), both runners in this one process, alternating:
 * output tokens/s at c=1 and c=32, the runners' own difference without the server around them. Last, decode passes
 * of the two runners interleaved in blocks of 10 (batch 1 and 32, after a 64-token prompt per row): the wall time of
 * a pass as the scheduler sees it, p50, the steadiest of the three comparisons on a shared machine.
 *   node --import tsx bench/native.ts [--rounds N] [--models stories260K,smollm2] [--tokens N] [--threads N] [--no-http]
 *     [--native-flags FLAG,...]   (more serve flags for the native runner's server, e.g. --spin-wait)
 * smollm2 is SmolLM2-135M's shape with random weights, smollm2-int8 / smollm2-int4 the same quantised (converted once
 * into models/.cache).
 * Bursts: 32 requests sent together to an idle server, their TTFT p50 against the floor, one batched prefill of the 32
 * prompts, as the prefill device-seconds the server measured for them (its /metrics), and against the decode time.
 */
import { spawnSync } from 'node:child_process';
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { resolveModel } from '../src/model/resolve.ts';
import { engineLoop, randomShapeModel } from './lib.ts';
import { peakRssMb, startServerProcess } from './server-process.ts';
import type { QuantChoice } from '../src/model/convert.ts';
import { loadRunner } from '../src/engine/runners/load.ts';
import { loadModelFolder } from '../src/model/folder.ts';

const arg = (name: string, fallback: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
};
const rounds = Number(arg('rounds', '1'));
const models = arg('models', 'stories260K,smollm2').split(',');
const maxTokens = Number(arg('tokens', '48'));
const threads = arg('threads', '');
/** More `tally serve` flags for the native runner's server only, comma-separated (e.g. --native-flags --spin-wait). */
const nativeFlags = arg('native-flags', '').split(',').filter(Boolean);

/** stories260K, or a random-weight model of SmolLM2-135M's shape: smollm2 (fp32), smollm2-int8, smollm2-int4. */
function modelDir(name: string): string {
  const smol = /^smollm2(?:-(int8|int4))?$/.exec(name);
  if (smol) return randomShapeModel('SmolLM2-135M-Instruct', smol[1] as QuantChoice | undefined);
  return resolveModel(name).dir;
}

interface Server {
  url: string;
  pid: number;
  gcMs: () => number;
  stop: () => Promise<void>;
}

/** A server with --trace-gc, its pauses summed ("... Scavenge 5.1 (6.0) -> 4.2 (7.0) MB, pooled: 0 MB, 0.52 / 0.00 ms ..."). */
async function startServer(model: string, runner: string): Promise<Server> {
  let gc = 0;
  const extra = ['--runner', runner, '--max-num-seqs', '32', ...(threads ? ['--threads', threads] : []), ...(runner === 'native' ? nativeFlags : [])];
  const server = await startServerProcess(model, extra, {
    nodeArgs: ['--trace-gc'],
    onStdoutLine: (line) => {
      const m = / ([\d.]+) \/ ([\d.]+) ms/.exec(line);
      if (m) gc += Number(m[1]);
    },
  });
  return { ...server, gcMs: () => gc };
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

/** One streamed greedy completion: when each token event arrived. */
function complete(url: string, prompt: string, tokens: number): Promise<{ start: number; times: number[] }> {
  return new Promise((resolve, reject) => {
    const body = JSON.stringify({ prompt, max_tokens: tokens, temperature: 0, ignore_eos: true, stream: true });
    const start = performance.now();
    const times: number[] = [];
    const req = http.request(`${url}/v1/completions`, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      if (res.statusCode !== 200) reject(new Error(`HTTP ${res.statusCode}`));
      let pending = '';
      res.on('data', (d: Buffer) => {
        const now = performance.now();
        pending += d.toString();
        let i;
        while ((i = pending.indexOf('\n\n')) >= 0) {
          const event = pending.slice(0, i);
          pending = pending.slice(i + 2);
          if (event.startsWith('data: {') && event.includes('"text"')) times.push(now);
        }
      });
      res.on('end', () => resolve({ start, times }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

interface Measure {
  tokensPerSecond: number;
  ttftMs: number;
  decodeMs: number;
  rssMb: number;
  gcMsPer1k: number;
}

const PROMPT = 'Once upon a time, there was a little girl named Lily who loved to play in the park with her friends.';

async function measure(server: Server, concurrency: number, requests: number): Promise<Measure> {
  const prompt = PROMPT;
  const gc0 = server.gcMs();
  const t0 = performance.now();
  let next = 0;
  const results: { start: number; times: number[]; index: number }[] = [];
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next < requests) {
      next++;
      const i = next - 1;
      results.push({ ...(await complete(server.url, prompt, Math.max(2, Math.round(maxTokens * (0.5 + ((i * 37) % 101) / 100))))), index: i });
    }
  }));
  const seconds = (performance.now() - t0) / 1000;
  const tokens = results.reduce((a, r) => a + r.times.length, 0);
  return {
    tokensPerSecond: tokens / seconds,
    // The first wave arrives at once (the load's start, not its steady state): its TTFT is the whole wave's prefill.
    ttftMs: median(results.filter((r) => r.index >= concurrency || requests <= concurrency).map((r) => r.times[0] - r.start)),
    decodeMs: median(results.filter((r) => r.times.length > 1).map((r) => (r.times.at(-1)! - r.times[0]) / (r.times.length - 1))),
    rssMb: peakRssMb(server.pid),
    gcMsPer1k: ((server.gcMs() - gc0) / tokens) * 1000,
  };
}

interface Burst {
  ttftMs: number;
  /** Prefill device-seconds the server attributed to the burst's requests (tally:device_seconds_total), ms. */
  prefillMs: number;
}

async function prefillSeconds(server: Server): Promise<number> {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  let sum = 0;
  for (const m of text.matchAll(/^tally:device_seconds_total\{[^}]*phase="prefill"[^}]*\} ([\d.e+-]+)$/gm)) sum += Number(m[1]);
  return sum;
}

/**
 * `n` requests sent together to an idle server, 4 tokens each: their TTFT p50 against the prefill time the server
 * itself measured for them — the floor the issue names, one batched prefill pass of all the prompts.
 */
async function measureBurst(server: Server, n: number): Promise<Burst> {
  const before = await prefillSeconds(server);
  const results = await Promise.all(Array.from({ length: n }, () => complete(server.url, PROMPT, 4)));
  const prefillMs = ((await prefillSeconds(server)) - before) * 1000;
  return { ttftMs: median(results.map((r) => r.times[0] - r.start)), prefillMs };
}

/**
 * The engine loop and pass tables of one model in a process of their own: ONNX Runtime's env, and with it the native
 * runner's shared thread pool, is made once per process at the first runner's thread count.
 */
function engineTableApart(model: string): void {
  const args = ['--import', 'tsx', fileURLToPath(import.meta.url), '--no-http', '--models', model, '--rounds', String(rounds), '--tokens', String(maxTokens), ...(threads ? ['--threads', threads] : [])];
  const r = spawnSync(process.execPath, args, { stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`the engine tables of ${model} failed (exit ${r.status})`);
}

const RUNNERS = ['native', 'js'] as const;
const overHttp = !process.argv.includes('--no-http');
for (const model of models) {
  if (!overHttp) {
    if (models.length > 1) engineTableApart(model);
    else await engineTable(model, modelDir(model));
    continue;
  }
  const dir = modelDir(model);
  const results: Record<string, Record<number, Measure[]>> = { native: { 1: [], 32: [] }, js: { 1: [], 32: [] } };
  const bursts: Record<string, Burst[]> = { native: [], js: [] };
  for (let round = 0; round < rounds; round++) {
    for (const runner of round % 2 ? [...RUNNERS].reverse() : RUNNERS) {
      const server = await startServer(dir, runner);
      try {
        // Warm-up, a burst of 32 among it: a server's first passes of a new size run ~20-30% slower (buffers growing).
        await measure(server, 32, 36);
        for (const c of [1, 32]) results[runner][c].push(await measure(server, c, c === 1 ? 8 : 64));
        for (let i = 0; i < 3; i++) bursts[runner].push(await measureBurst(server, 32));
      } finally {
        await server.stop();
      }
    }
  }
  const pick = (runner: string, c: number, key: keyof Measure) => median(results[runner][c].map((m) => m[key]));
  console.log(`\n${model} (${rounds} round${rounds > 1 ? 's' : ''}, ${maxTokens} tokens per request, medians${nativeFlags.length ? `; native: ${nativeFlags.join(' ')}` : ''})`);
  console.log('c   metric                 native        js   native/js');
  for (const c of [1, 32]) {
    for (const [key, label] of [['tokensPerSecond', 'tokens/s'], ['ttftMs', 'TTFT p50 ms'], ['decodeMs', 'decode/token p50 ms'], ['rssMb', 'peak RSS MB'], ['gcMsPer1k', 'GC ms / 1k tokens']] as const) {
      const [a, b] = [pick('native', c, key), pick('js', c, key)];
      // Each round's own ratio too: on a shared machine a round can be far off the others.
      const rounds = key === 'tokensPerSecond' ? `   rounds ${results.native[c].map((m, i) => (m[key] / results.js[c][i][key]).toFixed(2)).join(' ')}` : '';
      console.log(`${String(c).padEnd(3)} ${label.padEnd(20)} ${a.toFixed(2).padStart(9)} ${b.toFixed(2).padStart(9)} ${(a / b).toFixed(3).padStart(10)}${rounds}`);
    }
    console.log(`${String(c).padEnd(3)} TTFT p50 / decode p50  ${(pick('native', c, 'ttftMs') / pick('native', c, 'decodeMs')).toFixed(2).padStart(9)} ${(pick('js', c, 'ttftMs') / pick('js', c, 'decodeMs')).toFixed(2).padStart(9)}`);
  }
  const row = (label: string, a: number, b: number, ratio = true) =>
    console.log(`32  ${label.padEnd(22)} ${a.toFixed(2).padStart(9)} ${b.toFixed(2).padStart(9)} ${ratio ? (a / b).toFixed(3).padStart(10) : ''}`);
  const burst = (runner: string, key: keyof Burst) => median(bursts[runner].map((m) => m[key]));
  console.log(`bursts of 32 requests sent together (${bursts.native.length} per runner):`);
  row('TTFT p50 ms', burst('native', 'ttftMs'), burst('js', 'ttftMs'));
  row('prefill device-s ms', burst('native', 'prefillMs'), burst('js', 'prefillMs'));
  row('TTFT p50 / prefill', burst('native', 'ttftMs') / burst('native', 'prefillMs'), burst('js', 'ttftMs') / burst('js', 'prefillMs'), false);
  row('TTFT p50 / decode p50', burst('native', 'ttftMs') / pick('native', 32, 'decodeMs'), burst('js', 'ttftMs') / pick('js', 32, 'decodeMs'), false);
  engineTableApart(model);
}

async function passTable(model: string, dir: string): Promise<void> {
  const folder = loadModelFolder(dir);
  const options = { device: { kind: 'cpu' as const }, maxSlots: 32, maxModelLen: 1024, kvCacheTokens: 32 * 1024, threads: threads ? Number(threads) : undefined };
  console.log(`\n${model}, decode passes interleaved in blocks native / js (p50 ms per pass, wall as the scheduler sees it)`);
  for (const B of [1, 32]) {
    const runners = { native: (await loadRunner(folder, { ...options, runner: 'native' })).runner, js: (await loadRunner(folder, { ...options, runner: 'js' })).runner };
    const walls: Record<string, number[]> = { native: [], js: [] };
    for (const r of Object.values(runners)) {
      for (let s = 0; s < B; s++) r.open(s);
      await r.forwardTop!(Array.from({ length: B }, (_, s) => ({ seq: s, tokens: Array.from({ length: 64 }, (_, i) => 3 + ((i * 7 + s) % 300)) })), 1);
    }
    // Blocks of passes, not pass by pass: the native runner's pool threads spin on for a while after its pass and
    // would take a core from the JavaScript runner's next one. A block's first pass is not counted.
    const blocks = B === 1 ? 20 : 6;
    const block = 11;
    for (let i = 0; i < blocks; i++) {
      for (const [name, r] of i % 2 ? Object.entries(runners).reverse() : Object.entries(runners)) {
        for (let j = 0; j < block; j++) {
          const t0 = performance.now();
          await r.forwardTop!(Array.from({ length: B }, (_, s) => ({ seq: s, tokens: [3 + ((i * block + j + s) % 300)] })), 1);
          if (j > 0) walls[name].push(performance.now() - t0);
        }
      }
    }
    const [a, b] = [median(walls.native), median(walls.js)];
    console.log(`batch ${String(B).padEnd(3)} native ${a.toFixed(3).padStart(8)}  js ${b.toFixed(3).padStart(8)}  native/js ${(a / b).toFixed(3)}`);
    await runners.native.release();
    await runners.js.release();
  }
}

async function engineTable(model: string, dir: string): Promise<void> {
  const rates: Record<string, Record<number, number[]>> = { native: { 1: [], 32: [] }, js: { 1: [], 32: [] } };
  for (let round = 0; round < rounds; round++) {
    for (const runner of round % 2 ? [...RUNNERS].reverse() : RUNNERS) {
      for (const c of [1, 32]) {
        const options = { modelDir: dir, device: { kind: 'cpu' as const }, maxNumSeqs: 32, maxNumBatchedTokens: 2048, kvCacheBytes: 2 ** 28, runner, threads: threads ? Number(threads) : undefined };
        rates[runner][c].push((await engineLoop(options, () => [1, 9, 50, 120, 33, 7, 81, 200], c, c === 1 ? 2 : 64, maxTokens)).tokensPerSecond);
      }
    }
  }
  console.log(`\n${model}, engine loop without HTTP (${rounds} round${rounds > 1 ? 's' : ''}, ${maxTokens} tokens per request, medians)`);
  for (const c of [1, 32]) {
    const [a, b] = [median(rates.native[c]), median(rates.js[c])];
    console.log(`c=${String(c).padEnd(3)} tokens/s  native ${a.toFixed(1).padStart(9)}  js ${b.toFixed(1).padStart(9)}  native/js ${(a / b).toFixed(3)}`);
  }
  await passTable(model, dir);
}
agent.destroy();
