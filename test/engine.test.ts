/**
 * The engine on real graphs: I/O detection (Tally's graph vs onnx-community-style 'hf' exports, with and
 * without position_ids), clear errors for unknown graphs and a missing CUDA provider, every sampling
 * parameter's effect through the scheduler on stories260K, and the worker-thread EngineClient.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { EngineClient } from '../src/engine/client/engine-client.ts';
import type { EngineOptions } from '../src/engine/protocol.ts';
import type { SamplingParams } from '../src/engine/protocol.ts';
import type { GenerationRequest, RequestEvent } from '../src/engine/protocol.ts';
import { cudaProviderProblem } from '../src/engine/runners/ort-session.ts';
import { readCheckpoint } from '../src/model/convert.ts';
import { writeModelFolder } from '../src/model/folder.ts';
import { buildLlamaGraph } from '../src/model/llama-graph.ts';
import { DataType } from '../src/model/onnx-proto.ts';
import type { TextTokenizer } from '../src/model/tokenizer.ts';
import { SHARED_MODELS, storiesModel } from './helpers/models.ts';

const GREEDY: SamplingParams = { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };

function request(id: string, promptIds: number[], maxTokens: number, sampling: Partial<SamplingParams> = {}, extra: Partial<GenerationRequest> = {}): GenerationRequest {
  return { id, promptIds, maxTokens, minTokens: 0, ignoreEos: false, stop: [], stopTokenIds: [], sampling: { ...GREEDY, ...sampling }, ...extra };
}

interface Outcome {
  tokens: number[];
  events: RequestEvent[];
  text: string;
  final: RequestEvent;
}

const baseOptions = (modelDir: string): EngineOptions => ({
  modelDir, device: { kind: 'cpu' }, threads: 1, maxNumSeqs: 8, maxNumBatchedTokens: 512, kvCacheBytes: 2 ** 26,
});

/** An in-process engine with its scheduler loop running. */
async function startEngine(options: EngineOptions) {
  const events = new Map<string, RequestEvent[]>();
  const done = new Map<string, (o: Outcome) => void>();
  const engine = await createEngineCore(
    options,
    (evs) => {
      for (const e of evs) {
        const list = events.get(e.id) ?? [];
        events.set(e.id, list);
        list.push(e);
        if (e.finish) {
          done.get(e.id)?.({ tokens: list.flatMap((x) => x.tokens.map((t) => t.id)), events: list, text: list.map((x) => x.text).join(''), final: e });
        }
      }
    },
    () => {},
  );
  const loop = engine.scheduler.run();
  let n = 0;
  return {
    info: engine.info,
    tokenizer: engine.tokenizer as TextTokenizer,
    generate(promptIds: number[], maxTokens: number, sampling: Partial<SamplingParams> = {}, extra: Partial<GenerationRequest> = {}): Promise<Outcome> {
      const req = request(`r${n++}`, promptIds, maxTokens, sampling, extra);
      const p = new Promise<Outcome>((resolve) => done.set(req.id, resolve));
      engine.scheduler.submit(req);
      return p;
    },
    async close() {
      engine.scheduler.stop();
      await loop;
      await engine.release();
    },
  };
}
type Engine = Awaited<ReturnType<typeof startEngine>>;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-engine-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const BOY = 'Once upon a time, there was a little boy';

/** A model folder for stories260K with the given graph, reusing the converted folder's tokenizer files. */
function storiesFolder(name: string, graph: Parameters<typeof writeModelFolder>[1]['graph'], configPatch: Record<string, unknown> = {}): string {
  const src = storiesModel();
  const json = (f: string) => JSON.parse(fs.readFileSync(path.join(src, f), 'utf8'));
  const dir = path.join(tmp, name);
  writeModelFolder(dir, {
    config: { ...json('config.json'), ...configPatch },
    generationConfig: json('generation_config.json'),
    tokenizerJson: json('tokenizer.json'),
    tokenizerConfig: json('tokenizer_config.json'),
    graph,
  });
  return dir;
}

describe('graph I/O detection', () => {
  const ckpt = readCheckpoint(path.join(SHARED_MODELS, 'stories260K', 'stories260K.gguf'));
  let tally: Engine;
  let boyPrompt: number[];
  let expectedStory: number[];
  let expectedBoy: number[];

  beforeAll(async () => {
    tally = await startEngine(baseOptions(storiesModel()));
    boyPrompt = tally.tokenizer.encode(BOY);
    expectedStory = (await tally.generate([1], 120)).tokens;
    expectedBoy = (await tally.generate(boyPrompt, 40)).tokens;
  });
  afterAll(() => tally.close());

  it('Tally\'s own graph gets the native runner (native attention, the whole pass in native code) on the CPU', () => {
    expect(tally.info.runner).toBe('native');
    expect(expectedStory).toHaveLength(120);
  });

  it.each([
    ['with position_ids', true],
    ['without position_ids (derived from attention_mask)', false],
  ])('an hf-interface export %s gets the plain runner and generates the same greedy tokens', async (name, positionIds) => {
    const graph = buildLlamaGraph(ckpt.config, ckpt.weights, { interface: 'hf', positionIds });
    expect(graph.inputs.some((i) => i.name === 'position_ids')).toBe(positionIds);
    const dir = storiesFolder(`hf-${positionIds}`, graph);
    const e = await startEngine(baseOptions(dir));
    try {
      expect(e.info.runner).toBe('plain');
      expect(e.info.vocabSize).toBe(512);
      // Two at once: the plain runner runs rows one by one, each with its own cache.
      const [story, boy] = await Promise.all([e.generate([1], 120), e.generate(boyPrompt, 40)]);
      expect(story.tokens).toEqual(expectedStory);
      expect(boy.tokens).toEqual(expectedBoy);
      expect(boy.text.startsWith(' named Timmy.')).toBe(true);
    } finally {
      await e.close();
    }
  });

  it('the plain runner takes the KV shape from the session metadata, not from config.json', async () => {
    const graph = buildLlamaGraph(ckpt.config, ckpt.weights, { interface: 'hf', positionIds: true });
    // config.json misstates the KV layout (the graph has 4 KV heads of size 8).
    const dir = storiesFolder('hf-misstated', graph, { num_key_value_heads: 2, head_dim: 16 });
    const e = await startEngine(baseOptions(dir));
    try {
      expect(e.info.runner).toBe('plain');
      expect((await e.generate(boyPrompt, 40)).tokens).toEqual(expectedBoy);
    } finally {
      await e.close();
    }
  });

  it('a Tally graph from before version 6 (K cached transposed) is refused, asking for a new conversion', async () => {
    const dims = (l: 'k' | 'v') => (l === 'k' ? ['batch', 4, 8, 'past'] : ['batch', 4, 'past', 8]);
    const dir = storiesFolder('graph-v5', {
      graphName: 'old',
      nodes: [{ opType: 'Identity', inputs: ['past_key.0'], outputs: ['new_kv'], name: 'id' }],
      inputs: [{ name: 'past_key.0', type: DataType.FLOAT, dims: dims('k') }, { name: 'past_value.0', type: DataType.FLOAT, dims: dims('v') }],
      outputs: [{ name: 'new_kv', type: DataType.FLOAT, dims: dims('k') }],
      initializers: [],
      opsets: [{ domain: '', version: 17 }],
      metadata: {},
    });
    await expect(createEngineCore(baseOptions(dir), () => {}, () => {})).rejects.toThrow(/converted by an older Tally .*convert the checkpoint again with `tally convert`/);
  });

  it('an ONNX graph with neither interface is refused with a clear error', async () => {
    const dir = storiesFolder('identity', {
      graphName: 'identity',
      nodes: [{ opType: 'Identity', inputs: ['x'], outputs: ['y'], name: 'id' }],
      inputs: [{ name: 'x', type: DataType.FLOAT, dims: ['n'] }],
      outputs: [{ name: 'y', type: DataType.FLOAT, dims: ['n'] }],
      initializers: [],
      opsets: [{ domain: '', version: 17 }],
      metadata: {},
    });
    await expect(createEngineCore(baseOptions(dir), () => {}, () => {})).rejects.toThrow(
      /model\.onnx has neither Tally's interface \(past_key\.N, new_kv\) nor a decoder-with-past interface .*inputs: x$/,
    );
  });
});

describe.skipIf(cudaProviderProblem() === undefined)('devices on a machine without the CUDA provider', () => {
  it('--device cuda fails, naming the missing CUDA provider library', async () => {
    const err = await createEngineCore({ ...baseOptions(storiesModel()), device: { kind: 'cuda', index: 0 } }, () => {}, () => {}).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toMatch(/libonnxruntime_providers_cuda\.so is missing/);
    expect((err as Error).message).toMatch(/npm run install-cuda/);
    expect((err as Error).message).toMatch(/--device cpu/);
  });

  it('--device auto falls back to the CPU with a note, and works', async () => {
    const e = await startEngine({ ...baseOptions(storiesModel()), device: { kind: 'auto' } });
    try {
      expect(e.info.device).toBe('cpu');
      expect(e.info.deviceNote).toMatch(/^--device auto: .*libonnxruntime_providers_cuda\.so is missing.*; using the CPU$/);
      expect((await e.generate([1], 5)).tokens).toHaveLength(5);
    } finally {
      await e.close();
    }
  });
});

describe('sampling parameters through the engine (stories260K)', () => {
  let e: Engine;
  let story: Outcome; // the greedy story from BOS, ended by BOS
  const eos = [1, 2];

  beforeAll(async () => {
    e = await startEngine(baseOptions(storiesModel()));
    expect(e.info.eosIds.sort()).toEqual(eos);
    story = await e.generate([1], 500);
    expect(story.final.finish).toBe('stop');
    expect(story.tokens.at(-1)).toBe(1);
  });
  afterAll(() => e.close());

  const repeats = (tokens: number[]) => tokens.length - new Set(tokens).size;

  it('temperature 0 is deterministic and greedy', async () => {
    const a = await e.generate([1], 60);
    const b = await e.generate([1], 60, { temperature: 0, seed: 5 });
    expect(a.tokens).toEqual(story.tokens.slice(0, 60));
    expect(b.tokens).toEqual(a.tokens);
  });

  it('the same seed gives the same tokens; another seed differs', async () => {
    const [a, b, c] = await Promise.all([
      e.generate([1], 60, { temperature: 1, seed: 42 }),
      e.generate([1], 60, { temperature: 1, seed: 42 }),
      e.generate([1], 60, { temperature: 1, seed: 43 }),
    ]);
    expect(b.tokens).toEqual(a.tokens);
    expect(c.tokens).not.toEqual(a.tokens);
    expect(a.tokens).not.toEqual(story.tokens.slice(0, a.tokens.length));
  });

  it('top_k 1 is greedy whatever the temperature and seed', async () => {
    const a = await e.generate([1], 80, { temperature: 1.5, topK: 1, seed: 7 });
    expect(a.tokens).toEqual(story.tokens.slice(0, 80));
  });

  it('min_tokens holds back EOS; ignore_eos suppresses it for the whole request', async () => {
    const end = story.tokens.length - 1; // where greedy emits BOS
    const minTokens = end + 10;
    const held = await e.generate([1], minTokens + 20, {}, { minTokens });
    expect(held.tokens.length).toBeGreaterThanOrEqual(minTokens);
    expect(held.tokens.slice(0, minTokens).some((t) => eos.includes(t))).toBe(false);
    expect(held.tokens.slice(0, end)).toEqual(story.tokens.slice(0, end));

    const ignored = await e.generate([1], end + 40, {}, { ignoreEos: true });
    expect(ignored.final.finish).toBe('length');
    expect(ignored.tokens).toHaveLength(end + 40);
    expect(ignored.tokens.some((t) => eos.includes(t))).toBe(false);
  });

  it('max_tokens ends with finish "length" after exactly that many tokens', async () => {
    for (const n of [1, 7, 33]) {
      const r = await e.generate([1], n);
      expect(r.final.finish).toBe('length');
      expect(r.tokens).toHaveLength(n);
      expect(r.final.completionTokens).toBe(n);
      expect(r.final.promptTokens).toBe(1);
    }
  });

  it('a stop string truncates the text and never leaks into the stream', async () => {
    const r = await e.generate([1], 100, {}, { stop: ['Lily'] });
    expect(r.final.finish).toBe('stop');
    expect(r.final.stoppedBy).toBe('Lily');
    expect(r.text).toBe('Once upon a time, there was a little girl named ');
    for (const ev of r.events) expect(ev.text).not.toContain('Lily');
  });

  it('a stop string that spans two tokens is caught, and held back while it is only a prefix', async () => {
    const stop = 'rl nam';
    // It really spans tokens: no single token of the story holds it, and it starts mid-token.
    const pieces = story.tokens.map((t) => e.tokenizer.decode([t]));
    expect(pieces.some((p) => p.includes(stop))).toBe(false);
    const r = await e.generate([1], 100, {}, { stop: ['never appears', stop] });
    expect(r.final.finish).toBe('stop');
    expect(r.final.stoppedBy).toBe(stop);
    expect(r.text).toBe('Once upon a time, there was a little gi');
    let streamed = '';
    for (const ev of r.events) {
      streamed += ev.text;
      expect(streamed.includes('rl')).toBe(false);
    }
  });

  it('stop_token_ids end the request at that token, which is not in the text', async () => {
    const index = 12;
    const id = story.tokens[index];
    const first = story.tokens.indexOf(id);
    const r = await e.generate([1], 100, {}, { stopTokenIds: [id] });
    expect(r.final.finish).toBe('stop');
    expect(r.final.stoppedBy).toBe(id);
    expect(r.tokens).toEqual(story.tokens.slice(0, first + 1));
    expect(r.text).toBe(e.tokenizer.decode(story.tokens.slice(0, first)));
  });

  it('logprobs are present, ≤ 0, and the greedy token is the top one', async () => {
    const r = await e.generate([1], 30, { logprobs: 3 });
    const tokens = r.events.flatMap((ev) => ev.tokens);
    expect(tokens).toHaveLength(30);
    for (const t of tokens) {
      expect(Number.isFinite(t.logprob)).toBe(true);
      expect(t.logprob!).toBeLessThanOrEqual(0);
      expect(t.topLogprobs).toHaveLength(3);
      const top = t.topLogprobs!;
      expect(top[0].token).toBe(t.id);
      expect(top[0].logprob).toBeCloseTo(t.logprob!, 6);
      expect(top[0].logprob).toBeGreaterThanOrEqual(top[1].logprob);
      expect(top[1].logprob).toBeGreaterThanOrEqual(top[2].logprob);
    }
    const sampled = (await e.generate([1], 30, { temperature: 1.5, seed: 3, logprobs: 0 })).events.flatMap((ev) => ev.tokens);
    for (const t of sampled) {
      expect(t.logprob!).toBeLessThanOrEqual(0);
      expect(t.topLogprobs).toBeUndefined();
    }
    const none = (await e.generate([1], 5)).events.flatMap((ev) => ev.tokens);
    for (const t of none) expect(t.logprob).toBeUndefined();
  });

  it('repetition_penalty changes the greedy output and reduces repeats', async () => {
    const plain = story.tokens.slice(0, 150);
    const penalised = await e.generate([1], 150, { repetitionPenalty: 1.5 }, { ignoreEos: true });
    expect(penalised.tokens).not.toEqual(plain);
    expect(repeats(penalised.tokens)).toBeLessThan(repeats(plain));
    // And the presence/frequency penalties likewise.
    const freq = await e.generate([1], 150, { frequencyPenalty: 1, presencePenalty: 0.5 }, { ignoreEos: true });
    expect(freq.tokens).not.toEqual(plain);
    expect(repeats(freq.tokens)).toBeLessThan(repeats(plain));
  });
});

describe('EngineClient (engine in a worker thread)', () => {
  it('generates the same tokens as in-process, and the main thread stays responsive meanwhile', async () => {
    const inProcess = await startEngine(baseOptions(storiesModel()));
    const expected = await inProcess.generate([1], 100);
    const long = await inProcess.generate([1], 300, {}, { ignoreEos: true });
    await inProcess.close();

    const client = await EngineClient.start({ ...baseOptions(storiesModel()), maxNumBatchedTokens: 2048 });
    try {
      expect(client.info.runner).toBe('native');
      const run = (req: GenerationRequest) =>
        new Promise<Outcome>((resolve) => {
          const events: RequestEvent[] = [];
          client.submit(req, (ev) => {
            events.push(ev);
            if (ev.finish) resolve({ tokens: events.flatMap((x) => x.tokens.map((t) => t.id)), events, text: events.map((x) => x.text).join(''), final: ev });
          });
        });
      const a = await run(request('w1', [1], 100));
      expect(a.tokens).toEqual(expected.tokens);
      expect(a.text).toBe(expected.text);

      // While the worker generates 300 tokens, a 5 ms timer on this thread keeps ticking.
      let last = performance.now();
      let maxGap = 0;
      let ticks = 0;
      const timer = setInterval(() => {
        const now = performance.now();
        maxGap = Math.max(maxGap, now - last);
        last = now;
        ticks++;
      }, 5);
      const started = performance.now();
      const b = await run(request('w2', [1], 300, {}, { ignoreEos: true }));
      const elapsed = performance.now() - started;
      clearInterval(timer);
      expect(b.tokens).toEqual(long.tokens);
      expect(b.final.finish).toBe('length');
      expect(maxGap).toBeLessThan(100);
      expect(ticks).toBeGreaterThanOrEqual(Math.floor(elapsed / 100));

      // A long prompt prefilled in one forward pass: that pass blocks the worker's thread for longer
      // than this thread ever stalls (it would stall this thread that long if the engine ran here).
      let longestPass = 0;
      client.on('step', (r) => (longestPass = Math.max(longestPass, r.busySeconds * 1000)));
      const prompt = [1, ...Array.from({ length: 999 }, (_, i) => long.tokens[i % 300])];
      last = performance.now();
      maxGap = 0;
      const timer2 = setInterval(() => {
        const now = performance.now();
        maxGap = Math.max(maxGap, now - last);
        last = now;
      }, 5);
      const c = await run(request('w3', prompt, 3));
      clearInterval(timer2);
      expect(c.final.finish).toBe('length');
      expect(c.final.promptTokens).toBe(1000);
      expect(maxGap).toBeLessThan(100);
      expect(longestPass).toBeGreaterThan(maxGap);
      expect(client.inFlight).toBe(0);
    } finally {
      await client.close();
    }
  });
});
