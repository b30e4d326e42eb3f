/**
 * Hugging Face checkpoint folders (config.json, safetensors shards, tokenizer files) through `tally convert`:
 * the safetensors reader and writer, logits equal to a direct forward pass on the same (bf16/f16-rounded)
 * weights for the Llama, Qwen2 and Qwen3 shapes, HF's rotate-half q/k against GGUF's permuted layout, and
 * clear errors for what Tally does not convert.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { loadRunner } from '../src/engine/runners/load.ts';
import { convertCheckpoint } from '../src/model/convert.ts';
import { loadModelFolder } from '../src/model/folder.ts';
import { normalizeHfConfig, readHfCheckpoint } from '../src/model/hf-checkpoint.ts';
import { randomWeights } from '../src/model/random.ts';
import { f32ToBf16 } from '../src/model/half.ts';
import { readSafetensorsHeader, readTensorF32, writeSafetensors } from '../src/model/safetensors.ts';
import { TextTokenizer } from '../src/model/tokenizer.ts';
import type { LlamaConfig, WeightMap } from '../src/model/types.ts';
import { writeHfCheckpoint, writeLlamaGguf } from './helpers/hf-checkpoint.ts';
import { SHARED_MODELS } from './helpers/models.ts';
import { referenceLogits } from './helpers/reference-llama.ts';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-hf-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const out = (name: string) => path.join(tmp, name);
const published = (name: string) => JSON.parse(fs.readFileSync(path.join(SHARED_MODELS, name, 'config.json'), 'utf8')) as LlamaConfig;
const small = { hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256 };

/** Random weights, larger than an untrained model's so that attention is far from uniform. */
function weightsFor(config: LlamaConfig, seed = 3): WeightMap {
  const weights = randomWeights(config, seed);
  for (const [name, t] of weights) if (!name.includes('norm')) t.data.forEach((v, i) => (t.data[i] = v * 10));
  return weights;
}

/** The weights as a checkpoint folder holds them (rounded to its dtype). */
function storedWeights(dir: string): WeightMap {
  const ckpt = readHfCheckpoint(dir);
  return new Map([...ckpt.shapes.keys()].map((name) => [name, ckpt.weights.get(name)!]));
}

async function logitsOf(dir: string, tokens: number[], attention?: 'native' | 'onnx'): Promise<Float32Array[]> {
  const { runner } = await loadRunner(loadModelFolder(dir), { device: { kind: 'cpu' }, threads: 1, maxSlots: 1, maxModelLen: 256, attention, kvCacheDtype: attention === 'onnx' ? undefined : 'float32' });
  try {
    runner.open(1);
    const result: Float32Array[] = [];
    for (const t of tokens) result.push(Float32Array.from((await runner.forward([{ seq: 1, tokens: [t] }])).logits[0]));
    return result;
  } finally {
    await runner.release();
  }
}

function maxDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

/** A Qwen2.5-shaped (biases, untied) or Qwen3-shaped (q/k norms, head_dim 32, tied) checkpoint, written once. */
function qwenCheckpoint(modelType: string, dtype: 'BF16' | 'F16'): string {
  const base = published('Qwen2.5-0.5B-Instruct');
  const config: LlamaConfig = modelType === 'qwen2'
    ? { ...base, ...small, vocab_size: 512, tie_word_embeddings: false }
    : { ...base, ...small, vocab_size: 512, model_type: 'qwen3', architectures: ['Qwen3ForCausalLM'], head_dim: 32, attention_bias: false, tie_word_embeddings: true };
  const dir = out(`${modelType}-${dtype}-hf`);
  if (!fs.existsSync(dir)) writeHfCheckpoint(dir, config, weightsFor(config), { dtype, tokenizerOf: 'Qwen2.5-0.5B-Instruct' });
  return dir;
}

const TOKENS = [1, 17, 300, 5, 42, 250, 9, 77];
const PAIR_TOKENS = [1, 17, 200, 5, 42];

describe('safetensors', () => {
  it('writes and reads F32, F16 and BF16 tensors (header 8-byte aligned, offsets in order)', () => {
    const file = out('rt.safetensors');
    const a = Float32Array.from({ length: 30 }, (_, i) => Math.sin(i) * 3);
    writeSafetensors(file, [
      { name: 'a32', dtype: 'F32', shape: [5, 6], data: a },
      { name: 'a16', dtype: 'F16', shape: [30], data: a },
      { name: 'b16', dtype: 'BF16', shape: [6, 5], data: () => a },
    ], { format: 'pt' });
    const st = readSafetensorsHeader(file);
    expect(st.metadata).toEqual({ format: 'pt' });
    expect(st.tensors.get('b16')).toMatchObject({ dtype: 'BF16', shape: [6, 5] });
    expect(Number(fs.readFileSync(file).readBigUInt64LE(0)) % 8).toBe(0);
    expect(readTensorF32(st, 'a32')).toEqual(a);
    const f16 = readTensorF32(st, 'a16');
    const bf16 = readTensorF32(st, 'b16');
    for (let i = 0; i < a.length; i++) {
      expect(Math.abs(f16[i] - a[i])).toBeLessThanOrEqual(Math.abs(a[i]) * 2 ** -11);
      expect(bf16[i]).toBe(new Float32Array(new Uint32Array([f32ToBf16(a[i]) << 16]).buffer)[0]);
      expect(Math.abs(bf16[i] - a[i])).toBeLessThanOrEqual(Math.abs(a[i]) * 2 ** -8);
    }
  });

  it('says what is wrong with a truncated file or a file that is not safetensors', () => {
    const file = out('rt.safetensors');
    const cut = out('cut.safetensors');
    const bytes = fs.readFileSync(file);
    fs.writeFileSync(cut, bytes.subarray(0, bytes.length - 10));
    expect(() => readSafetensorsHeader(cut)).toThrow(/cut\.safetensors: truncated file: b16 needs bytes up to \d+, file is \d+ bytes/);
    fs.writeFileSync(cut, 'hello, world');
    expect(() => readSafetensorsHeader(cut)).toThrow(/cut\.safetensors: not a safetensors file/);
  });
});

describe('tally convert CHECKPOINT_DIR', () => {
  it('a SmolLM2-shaped bf16 checkpoint in 3 shards: logits are a direct forward pass on its weights; tokenizer and chat template kept', async () => {
    const config = { ...published('SmolLM2-135M-Instruct'), ...small };
    const dir = out('smol-hf');
    writeHfCheckpoint(dir, config, weightsFor(config), { dtype: 'BF16', shards: 3 });
    expect(fs.existsSync(path.join(dir, 'model-00002-of-00003.safetensors'))).toBe(true);
    const dest = out('smol-converted');
    convertCheckpoint(dir, dest);
    const folder = loadModelFolder(dest);
    expect(folder.config).toMatchObject({ model_type: 'llama', hidden_size: 64, vocab_size: 49152, tie_word_embeddings: true, num_key_value_heads: 2, torch_dtype: 'float32' });
    expect(String(folder.tokenizerConfig.chat_template)).toContain('<|im_start|>');
    expect(TextTokenizer.load(dest).encode('Hello there').length).toBeGreaterThan(0);
    const ref = referenceLogits(folder.config, storedWeights(dir), TOKENS);
    const got = await logitsOf(dest, TOKENS);
    got.forEach((l, i) => expect(maxDiff(l, ref[i])).toBeLessThan(2e-3));
  });

  it.each([
    ['Qwen2.5-shaped (q/k/v biases, untied head), f16', 'qwen2', 'F16' as const, 'native' as const],
    ['Qwen3-shaped (per-head q/k norms, head_dim 32 != hidden/heads), bf16, native attention', 'qwen3', 'BF16' as const, 'native' as const],
    ['Qwen3-shaped, attention in the graph', 'qwen3', 'BF16' as const, 'onnx' as const],
  ])('%s', async (_name, modelType, dtype, attention) => {
    const dir = qwenCheckpoint(modelType, dtype);
    const dest = out(`${modelType}-${dtype}-${attention}`);
    convertCheckpoint(dir, dest);
    const folder = loadModelFolder(dest);
    const ref = referenceLogits(folder.config, storedWeights(dir), TOKENS);
    const got = await logitsOf(dest, TOKENS, attention);
    got.forEach((l, i) => expect(maxDiff(l, ref[i])).toBeLessThan(2e-3));
  });

  it('--dtype fp16: a Qwen3-shaped checkpoint as a float16 graph (attention in the graph) stays within float16 rounding', async () => {
    const dir = qwenCheckpoint('qwen3', 'BF16');
    const dest = out('qwen3-fp16');
    convertCheckpoint(dir, dest, { dtype: 'float16' });
    const folder = loadModelFolder(dest);
    expect(path.basename(folder.onnxPath)).toBe('model_fp16.onnx');
    const ref = referenceLogits(folder.config, storedWeights(dir), TOKENS);
    const got = await logitsOf(dest, TOKENS, 'onnx');
    got.forEach((l, i) => expect(maxDiff(l, ref[i])).toBeLessThan(0.03));
  });

  it('config.json: defaults filled in; a Mistral sliding window caps the context, Qwen2 without use_sliding_window does not', () => {
    const base = { hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1, num_attention_heads: 4, vocab_size: 32 };
    expect(normalizeHfConfig({ ...base, model_type: 'llama' }, 'x')).toMatchObject({ num_key_value_heads: 4, rms_norm_eps: 1e-6, rope_theta: 10000, tie_word_embeddings: false });
    expect(normalizeHfConfig({ ...base, model_type: 'mistral', architectures: ['MistralForCausalLM'], max_position_embeddings: 32768, sliding_window: 4096 }, 'x').max_position_embeddings).toBe(4096);
    expect(normalizeHfConfig({ ...base, model_type: 'mistral', max_position_embeddings: 32768, sliding_window: null }, 'x').max_position_embeddings).toBe(32768);
    expect(normalizeHfConfig({ ...base, model_type: 'qwen2', max_position_embeddings: 32768, sliding_window: 4096, use_sliding_window: false }, 'x').max_position_embeddings).toBe(32768);
    expect(() => normalizeHfConfig({ ...base, model_type: 'llama', architectures: ['LlavaForConditionalGeneration'] }, 'x')).toThrow(/x: architecture LlavaForConditionalGeneration \(model_type "llama"\) is not supported/);
    expect(() => normalizeHfConfig({ ...base, model_type: 'qwen2', hidden_size: undefined }, 'x')).toThrow(/x: config\.json has no hidden_size/);
  });
});

describe('the same weights as an HF checkpoint (rotate-half q/k) and as a GGUF (interleaved q/k)', () => {
  it('give the same logits; a GGUF written without the permutation does not', async () => {
    const config: LlamaConfig = { ...published('TinyLlama-1.1B-Chat-v1.0'), ...small, vocab_size: 256 };
    const weights = weightsFor(config, 11);
    const hf = out('pair-hf');
    writeHfCheckpoint(hf, config, weights, { dtype: 'F32', tokenizerOf: 'TinyLlama-1.1B-Chat-v1.0' });
    writeLlamaGguf(out('pair.gguf'), config, weights, true);
    writeLlamaGguf(out('pair-unpermuted.gguf'), config, weights, false);
    convertCheckpoint(hf, out('pair-hf-out'));
    convertCheckpoint(out('pair.gguf'), out('pair-gguf-out'));
    convertCheckpoint(out('pair-unpermuted.gguf'), out('pair-unpermuted-out'));
    const fromHf = await logitsOf(out('pair-hf-out'), PAIR_TOKENS);
    const fromGguf = await logitsOf(out('pair-gguf-out'), PAIR_TOKENS);
    const wrong = await logitsOf(out('pair-unpermuted-out'), PAIR_TOKENS);
    fromHf.forEach((l, i) => expect(maxDiff(l, fromGguf[i])).toBeLessThan(1e-4));
    // Position 0 has no rotation; past it, the wrong layout shows.
    expect(maxDiff(fromHf[4], wrong[4])).toBeGreaterThan(0.05);
  });
});

describe('checkpoints Tally does not convert say why', () => {
  const config = { ...published('SmolLM2-135M-Instruct'), ...small, vocab_size: 128 };
  const make = (name: string, patchConfig: Record<string, unknown> = {}, patchWeights: (w: WeightMap) => void = () => {}) => {
    const dir = out(name);
    const weights = randomWeights(config, 1);
    patchWeights(weights);
    writeHfCheckpoint(dir, { ...config, ...patchConfig } as LlamaConfig, weights, { dtype: 'BF16' });
    return dir;
  };

  it('another architecture, named', () => {
    const dir = make('gemma', { model_type: 'gemma2', architectures: ['Gemma2ForCausalLM'] });
    expect(() => convertCheckpoint(dir, out('x'))).toThrow(/architecture Gemma2ForCausalLM \(model_type "gemma2"\) is not supported; Tally converts LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM/);
    expect(fs.existsSync(out('x'))).toBe(false);
  });

  it('a missing tensor, a wrong shape, an unknown rope scaling, no tokenizer.json, a folder without weights', () => {
    expect(() => convertCheckpoint(make('missing', {}, (w) => w.delete('model.layers.1.mlp.up_proj.weight')), out('x'))).toThrow(/has no tensor model\.layers\.1\.mlp\.up_proj\.weight, which LlamaForCausalLM needs/);
    expect(() => convertCheckpoint(make('shape', { intermediate_size: 96 }), out('x'))).toThrow(/model\.layers\.0\.mlp\.gate_proj\.weight is \[128,64\], config\.json implies \[96,64\]/);
    expect(() => convertCheckpoint(make('yarn', { rope_scaling: { rope_type: 'yarn', factor: 4 } }), out('x'))).toThrow(/rope_scaling type "yarn" is not supported/);
    const noTok = make('no-tokenizer');
    fs.rmSync(path.join(noTok, 'tokenizer.json'));
    expect(() => convertCheckpoint(noTok, out('x'))).toThrow(/no-tokenizer has no tokenizer\.json/);
    const empty = out('empty');
    fs.mkdirSync(empty);
    fs.writeFileSync(path.join(empty, 'config.json'), '{}');
    expect(() => convertCheckpoint(empty, out('x'))).toThrow(/empty is a folder but not a Hugging Face checkpoint \(config\.json and model\*\.safetensors\)/);
    expect(fs.existsSync(out('x'))).toBe(false);
  });
});
