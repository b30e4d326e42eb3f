/**
 * stories260K end to end against an independent reference: a port of llama2.c's run.c reading the raw
 * legacy checkpoint (test/helpers/llama2c-reference.ts). Tally's engine, on the model converted from the
 * GGUF and on the one converted from the .bin, must produce the reference's greedy tokens for the whole
 * story, and the text the README quotes.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import type { EngineOptions } from '../src/engine/protocol.ts';
import type { GenerationRequest, RequestEvent } from '../src/engine/protocol.ts';
import { convertCheckpoint } from '../src/model/convert.ts';
import { Llama2cTokenizer, Llama2cTransformer, generateGreedy } from './helpers/llama2c-reference.ts';
import { SHARED_MODELS, storiesModel } from './helpers/models.ts';

const STORIES = path.join(SHARED_MODELS, 'stories260K');
const BIN = path.join(STORIES, 'stories260K.bin');
const README_SENTENCE =
  'Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball.';
const BOY_PROMPT = 'Once upon a time, there was a little boy';
const BOY_CONTINUATION = ' named Timmy. Timmy loved to play with his toys';
const BOY_TOKENS = 16;

interface Generation {
  tokens: number[];
  text: string;
  finish?: string;
  stoppedBy?: string | number;
}

/** Runs greedy requests one after another on a fresh in-process engine. */
async function greedyOnEngine(modelDir: string, prompts: number[][], maxTokens: number, options: Partial<EngineOptions> = {}) {
  const results = new Map<string, Generation>();
  const done = new Map<string, () => void>();
  const engine = await createEngineCore(
    { modelDir, device: { kind: 'cpu' }, threads: 1, maxNumSeqs: 4, maxNumBatchedTokens: 512, kvCacheBytes: 2 ** 26, ...options },
    (events: RequestEvent[]) => {
      for (const e of events) {
        const r = results.get(e.id)!;
        r.tokens.push(...e.tokens.map((t) => t.id));
        r.text += e.text;
        if (e.finish) {
          r.finish = e.finish;
          r.stoppedBy = e.stoppedBy;
          done.get(e.id)!();
        }
      }
    },
    () => {},
  );
  const loop = engine.scheduler.run();
  const out: Generation[] = [];
  try {
    for (const [i, promptIds] of prompts.entries()) {
      const id = `r${i}`;
      results.set(id, { tokens: [], text: '' });
      const finished = new Promise<void>((resolve) => done.set(id, resolve));
      const req: GenerationRequest = {
        id, promptIds, maxTokens, minTokens: 0, ignoreEos: false, stop: [], stopTokenIds: [],
        sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 },
      };
      engine.scheduler.submit(req);
      await finished;
      out.push(results.get(id)!);
    }
  } finally {
    engine.scheduler.stop();
    await loop;
    await engine.release();
  }
  return { out, info: engine.info, tokenizer: engine.tokenizer };
}

describe('stories260K against a port of llama2.c', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-story-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  let refTok: Llama2cTokenizer;
  /** Reference greedy story from BOS, ending with the BOS that ends it. */
  let refStory: number[];
  let refStoryText: string;
  let boyPrompt: number[];
  let refBoy: number[];

  beforeAll(() => {
    const model = new Llama2cTransformer(BIN);
    refTok = new Llama2cTokenizer(path.join(STORIES, 'tok512.bin'), model.config.vocabSize);
    refStory = generateGreedy(model, [1], 512);
    refStoryText = refTok.decode(1, refStory.filter((t) => t !== 1));
    boyPrompt = refTok.encode(BOY_PROMPT, true, false);
    refBoy = generateGreedy(new Llama2cTransformer(BIN), boyPrompt, boyPrompt.length - 1 + BOY_TOKENS);
  });

  it('the reference reads the checkpoint as the README describes and writes the quoted story', () => {
    const ref = new Llama2cTransformer(BIN);
    expect(ref.config).toEqual({ dim: 64, hiddenDim: 172, nLayers: 5, nHeads: 8, nKvHeads: 4, vocabSize: 512, seqLen: 512, sharedWeights: true });
    // The story ends with BOS (run.c's end of a story) well before the context is full.
    expect(refStory.at(-1)).toBe(1);
    expect(refStory.length).toBeGreaterThan(100);
    expect(refStory.length).toBeLessThan(512);
    expect(refStory.slice(0, -1)).not.toContain(1);
    expect(refStoryText.startsWith(README_SENTENCE)).toBe(true);
    expect(refTok.decode(boyPrompt.at(-1)!, refBoy).startsWith(BOY_CONTINUATION)).toBe(true);
  });

  it('Tally on the GGUF conversion: the same tokens for the whole story (native runner, paged cache in float16, the default, and in float32; the JavaScript runner too), and the README text', async () => {
    const dir = storiesModel();
    const { out, info, tokenizer } = await greedyOnEngine(dir, [[1]], 512);
    expect([info.runner, info.kvCacheDtype]).toEqual(['native', 'float16']);
    const fp32 = await greedyOnEngine(dir, [[1]], 512, { kvCacheDtype: 'float32' });
    expect([fp32.info.runner, fp32.info.kvCacheDtype]).toEqual(['native', 'float32']);
    expect(fp32.out[0].tokens).toEqual(refStory);
    const js = await greedyOnEngine(dir, [[1]], 512, { runner: 'js' });
    expect([js.info.runner, js.info.kvCacheDtype]).toEqual(['paged', 'float16']);
    expect(js.out[0].tokens).toEqual(refStory);
    expect(info.eosIds).toContain(1);
    const [story] = out;
    expect(story.finish).toBe('stop');
    expect(story.stoppedBy).toBe(1);
    expect(story.tokens).toEqual(refStory);
    expect(story.text.startsWith(README_SENTENCE)).toBe(true);
    expect(story.text).toBe(refStoryText);
    // Tally's tokenizer encodes the prompt as llama2.c does.
    expect(tokenizer.encode(BOY_PROMPT)).toEqual(boyPrompt);
  });

  it('Tally on the .bin + tok512.model conversion, attention inside the graph: the same tokens for the whole story', async () => {
    const dir = path.join(tmp, 'from-bin');
    convertCheckpoint(BIN, dir, { tokenizer: path.join(STORIES, 'tok512.model') });
    const { out, info } = await greedyOnEngine(dir, [[1]], 512, { attention: 'onnx' });
    expect(info.runner).toBe('slot');
    expect(info.limits.maxModelLen).toBe(512);
    const [story] = out;
    expect(story.finish).toBe('stop');
    expect(story.tokens).toEqual(refStory);
    expect(story.text).toBe(refStoryText);
  });

  it('Tally on a float16 conversion (fp16 weights; the native runner, and attention in the graph with an fp16 KV cache): the same tokens for the whole story', async () => {
    const dir = storiesModel('float16');
    expect(fs.existsSync(path.join(dir, 'onnx', 'model_fp16.onnx'))).toBe(true);
    for (const options of [{}, { attention: 'onnx' as const }]) {
      const { out, info } = await greedyOnEngine(dir, [[1], boyPrompt], 512, options);
      expect(info.runner).toBe(options.attention ? 'slot' : 'native');
      const [story, boy] = out;
      expect(story.finish).toBe('stop');
      expect(story.tokens).toEqual(refStory);
      expect(story.text).toBe(refStoryText);
      expect(boy.tokens.slice(0, BOY_TOKENS)).toEqual(refBoy);
    }
  });

  it('"…a little boy" continues " named Timmy. Timmy loved to play with his toys" on both conversions', async () => {
    expect(refBoy).toHaveLength(BOY_TOKENS);
    const bin = path.join(tmp, 'from-bin-2');
    convertCheckpoint(BIN, bin, { tokenizer: path.join(STORIES, 'tok512.model') });
    for (const dir of [storiesModel(), bin]) {
      const { out, tokenizer } = await greedyOnEngine(dir, [boyPrompt], BOY_TOKENS);
      const [gen] = out;
      expect(gen.finish).toBe('length');
      expect(gen.tokens).toEqual(refBoy);
      expect(gen.text.startsWith(BOY_CONTINUATION)).toBe(true);
      expect(tokenizer.decode(gen.tokens)).toBe(gen.text.slice(1)); // a standalone decode drops the leading space
    }
  });
});
