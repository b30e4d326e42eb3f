/**
 * What `tally convert` writes: the model folder's files, equal logits from the GGUF and the llama2.c
 * conversions of stories260K, random-weight models with published architectures (shapes, biases, tied
 * embeddings, tokenizer and chat template kept), seed determinism, and clear errors on bad inputs.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import ort from 'onnxruntime-node';
import { afterAll, describe, expect, it } from 'vitest';
import { loadRunner } from '../src/engine/runners/load.ts';
import { convertCheckpoint, convertRandomLike, readCheckpoint } from '../src/model/convert.ts';
import { loadModelFolder, writeModelFolder } from '../src/model/folder.ts';
import { buildLlamaGraph } from '../src/model/llama-graph.ts';
import { randomWeights } from '../src/model/random.ts';
import { TextTokenizer } from '../src/model/tokenizer.ts';
import type { LlamaConfig } from '../src/model/types.ts';
import { SHARED_MODELS } from './helpers/models.ts';

const STORIES = path.join(SHARED_MODELS, 'stories260K');
const GGUF = path.join(STORIES, 'stories260K.gguf');
const BIN = path.join(STORIES, 'stories260K.bin');
const SMOL = path.join(SHARED_MODELS, 'SmolLM2-135M-Instruct');
const QWEN = path.join(SHARED_MODELS, 'Qwen2.5-0.5B-Instruct');

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-convert-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const out = (name: string) => path.join(tmp, name);
const readJson = (dir: string, f: string) => JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8'));

/** Last-position logits after each chunk of `chunks`, for one sequence. */
async function logitsOf(dir: string, chunks: number[][]): Promise<Float32Array[]> {
  const { runner } = await loadRunner(loadModelFolder(dir), { device: { kind: 'cpu' }, threads: 1, maxSlots: 1, maxModelLen: 256 });
  try {
    runner.open(1);
    const result: Float32Array[] = [];
    for (const tokens of chunks) result.push(Float32Array.from((await runner.forward([{ seq: 1, tokens }])).logits[0]));
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

describe('tally convert on stories260K', () => {
  const fromGguf = out('stories-gguf');
  const fromBin = out('stories-bin');

  it('writes config, tokenizer, generation config and an ONNX graph with external weights', () => {
    convertCheckpoint(GGUF, fromGguf);
    for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'onnx/model.onnx', 'onnx/model.onnx_data']) {
      expect(fs.existsSync(path.join(fromGguf, f)), f).toBe(true);
    }
    const config = readJson(fromGguf, 'config.json');
    expect(config).toMatchObject({
      model_type: 'llama', hidden_size: 64, intermediate_size: 172, num_hidden_layers: 5, num_attention_heads: 8,
      num_key_value_heads: 4, vocab_size: 512, tie_word_embeddings: true, bos_token_id: 1, eos_token_id: 2,
    });
    // llama2.c stories end with BOS, so generation stops there too.
    expect(readJson(fromGguf, 'generation_config.json').eos_token_id).toEqual([2, 1]);
    expect(readJson(fromGguf, 'tokenizer_config.json')).toMatchObject({ bos_token: '<s>', eos_token: '</s>', model_max_length: 2048 });
    // The weights (≈ 260K floats) live in model.onnx_data, which model.onnx names; the graph itself is small.
    const onnx = fs.readFileSync(path.join(fromGguf, 'onnx/model.onnx'));
    const data = fs.statSync(path.join(fromGguf, 'onnx/model.onnx_data')).size;
    expect(onnx.includes('model.onnx_data')).toBe(true);
    expect(onnx.length).toBeLessThan(200_000);
    const weightBytes = (512 * 64 + 5 * (2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 172) + 64) * 4;
    expect(data).toBeGreaterThanOrEqual(weightBytes);
    expect(data).toBeLessThan(weightBytes * 3);
    const tok = TextTokenizer.load(fromGguf);
    expect(tok.vocabSize).toBe(512);
    expect(tok.encode('Once upon a time')[0]).toBe(1);
  });

  it('the .bin conversion (tokenizer found beside it) gives the same logits as the GGUF one', async () => {
    convertCheckpoint(BIN, fromBin); // picks tok512.model from the same folder
    expect(readJson(fromBin, 'config.json')).toMatchObject({ max_position_embeddings: 512, tie_word_embeddings: true, vocab_size: 512 });
    const text = 'Once upon a time, there was a little girl named Lily. She loved to play outside.';
    const ids = TextTokenizer.load(fromGguf).encode(text);
    expect(TextTokenizer.load(fromBin).encode(text)).toEqual(ids);
    const chunks = [ids.slice(0, 9), ids.slice(9, 17), [ids[17]], [ids[18]], ids.slice(19)];
    const [a, b] = [await logitsOf(fromGguf, chunks), await logitsOf(fromBin, chunks)];
    a.forEach((row, i) => expect(maxDiff(row, b[i]), `chunk ${i}`).toBeLessThan(1e-5));
    // …and they are real predictions, not constants.
    expect(maxDiff(a[0], a[1])).toBeGreaterThan(0.1);
  });
});

describe('tally convert --dtype fp16', () => {
  const run = (args: string[]) => spawnSync(process.execPath, ['bin/tally.js', 'convert', ...args], { encoding: 'utf8' });

  it('writes onnx/model_fp16.onnx with float16 weights and KV cache, float32 logits, close to the float32 model', async () => {
    const fp32 = out('stories-fp32');
    const fp16 = out('stories-fp16');
    convertCheckpoint(GGUF, fp32);
    const r = run([GGUF, fp16, '--dtype', 'fp16']);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(fs.existsSync(path.join(fp16, 'onnx/model.onnx'))).toBe(false);
    expect(readJson(fp16, 'config.json').torch_dtype).toBe('float16');
    expect(readJson(fp32, 'config.json').torch_dtype).toBe('float32');
    // Half the weight bytes (a few int64 constants aside).
    const bytes16 = fs.statSync(path.join(fp16, 'onnx/model_fp16.onnx_data')).size;
    const bytes32 = fs.statSync(path.join(fp32, 'onnx/model.onnx_data')).size;
    expect(bytes16 / bytes32).toBeGreaterThan(0.45);
    expect(bytes16 / bytes32).toBeLessThan(0.55);
    const folder = loadModelFolder(fp16);
    expect(folder.onnxPath).toBe(path.join(fp16, 'onnx/model_fp16.onnx'));
    const session = await ort.InferenceSession.create(folder.onnxPath);
    const typeOf = (list: readonly ort.InferenceSession.ValueMetadata[], name: string) => {
      const m = list.find((x) => x.name === name);
      return m && m.isTensor ? m.type : undefined;
    };
    expect(typeOf(session.inputMetadata, 'past_key.0')).toBe('float16');
    expect(typeOf(session.inputMetadata, 'past_value.4')).toBe('float16');
    expect(typeOf(session.outputMetadata, 'new_kv')).toBe('float16');
    expect(typeOf(session.outputMetadata, 'logits')).toBe('float32');
    await session.release();

    const ids = TextTokenizer.load(fp16).encode('Once upon a time, there was a little girl named Lily. She loved to play outside.');
    const chunks = [ids.slice(0, 9), [ids[9]], ids.slice(10)];
    const [a, b] = [await logitsOf(fp32, chunks), await logitsOf(fp16, chunks)];
    a.forEach((row, i) => {
      const d = maxDiff(row, b[i]);
      expect(d, `chunk ${i}`).toBeGreaterThan(0); // really computed in fp16
      expect(d, `chunk ${i}`).toBeLessThan(0.1);
    });
    const { runner } = await loadRunner(folder, { device: { kind: 'cpu' }, threads: 1, maxSlots: 1, maxModelLen: 256 });
    expect(runner.kvElementBytes).toBe(2);
    await runner.release();
  });

  it('the onnx-community interface in fp16 runs on the plain path and agrees with Tally\'s fp16 graph', async () => {
    const hf = out('stories-fp16-hf');
    const r = run([GGUF, hf, '--dtype', 'fp16', '--format', 'hf']);
    expect(r.status, r.stderr).toBe(0);
    const { runner } = await loadRunner(loadModelFolder(hf), { device: { kind: 'cpu' }, threads: 1, maxSlots: 1, maxModelLen: 256 });
    expect(runner.kind).toBe('plain');
    expect(runner.kvElementBytes).toBe(2);
    await runner.release();
    const ids = TextTokenizer.load(hf).encode('Once upon a time');
    const chunks = [ids, [42], [7]];
    const [a, b] = [await logitsOf(hf, chunks), await logitsOf(out('stories-fp16'), chunks)];
    a.forEach((row, i) => expect(maxDiff(row, b[i]), `chunk ${i}`).toBeLessThan(0.05));
  });

  it('an unknown --dtype is refused', () => {
    const r = run([GGUF, out('bad-dtype'), '--dtype', 'int3']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/--dtype must be fp32 or fp16/);
    expect(fs.existsSync(out('bad-dtype'))).toBe(false);
  });
});

describe('random-weight models of published architectures', () => {
  it('SmolLM2 with only the layer count reduced keeps its shape, tokenizer and chat template', async () => {
    const dir = out('smol-1');
    convertRandomLike(SMOL, dir, { seed: 1, overrides: { num_hidden_layers: 1 } });
    const config = readJson(dir, 'config.json') as LlamaConfig;
    expect(config).toMatchObject({
      model_type: 'llama', hidden_size: 576, num_attention_heads: 9, num_key_value_heads: 3, vocab_size: 49152,
      intermediate_size: 1536, num_hidden_layers: 1, tie_word_embeddings: true, rope_theta: 100000, torch_dtype: 'float32',
    });
    const published = readJson(SMOL, 'tokenizer_config.json');
    expect(typeof published.chat_template).toBe('string');
    expect(readJson(dir, 'tokenizer_config.json').chat_template).toBe(published.chat_template);
    expect(readJson(dir, 'tokenizer.json')).toEqual(readJson(SMOL, 'tokenizer.json'));
    expect(readJson(dir, 'generation_config.json')).toEqual(readJson(SMOL, 'generation_config.json'));
    // Tied: one [vocab, hidden] matrix, no lm_head.
    const embedBytes = 49152 * 576 * 4;
    const data = fs.statSync(path.join(dir, 'onnx/model.onnx_data')).size;
    expect(data).toBeGreaterThan(embedBytes);
    expect(data).toBeLessThan(1.5 * embedBytes);
    expect(fs.readFileSync(path.join(dir, 'onnx/model.onnx')).includes('lm_head.weight')).toBe(false);
    // The graph runs at full width with the real tokenizer.
    const ids = TextTokenizer.load(dir).encode('<|im_start|>user\nHello<|im_end|>');
    expect(ids[0]).toBe(1); // <|im_start|>
    const [logits] = await logitsOf(dir, [ids]);
    expect(logits).toHaveLength(49152);
    expect(logits.every(Number.isFinite)).toBe(true);
  });

  it('Qwen2.5 (1 layer) has QKV biases and tied embeddings', () => {
    const dir = out('qwen-1');
    convertRandomLike(QWEN, dir, { seed: 1, overrides: { num_hidden_layers: 1 } });
    const config = readJson(dir, 'config.json') as LlamaConfig;
    expect(config).toMatchObject({
      model_type: 'qwen2', hidden_size: 896, num_attention_heads: 14, num_key_value_heads: 2, vocab_size: 151936,
      num_hidden_layers: 1, tie_word_embeddings: true,
    });
    expect(readJson(dir, 'tokenizer_config.json').chat_template).toBe(readJson(QWEN, 'tokenizer_config.json').chat_template);
    const onnx = fs.readFileSync(path.join(dir, 'onnx/model.onnx'));
    expect(onnx.includes('model.layers.0.self_attn.qkv.bias')).toBe(true);
    expect(onnx.includes('lm_head.weight')).toBe(false);
    const embedBytes = 151936 * 896 * 4;
    const data = fs.statSync(path.join(dir, 'onnx/model.onnx_data')).size;
    expect(data).toBeGreaterThan(embedBytes);
    expect(data).toBeLessThan(1.5 * embedBytes);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('the Qwen2 biases matter: zeroing them changes the logits', async () => {
    const small = { num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 151936 };
    const dir = out('qwen-small');
    convertRandomLike(QWEN, dir, { seed: 3, overrides: small });
    const config = readJson(dir, 'config.json') as LlamaConfig;
    const weights = randomWeights(config, 3);
    const bias = weights.get('model.layers.0.self_attn.k_proj.bias');
    expect(bias).toBeDefined();
    expect(bias!.data.some((v) => v !== 0)).toBe(true);
    // Larger biases than the default init, so that their effect is far above float noise.
    for (const [name, t] of weights) if (name.endsWith('.bias')) t.data.forEach((v, i) => (t.data[i] = v * 50));
    const rebuilt = (name: string) => {
      const d = out(name);
      writeModelFolder(d, {
        config, generationConfig: {}, tokenizerJson: readJson(dir, 'tokenizer.json'), tokenizerConfig: readJson(dir, 'tokenizer_config.json'),
        graph: buildLlamaGraph(config, weights, { interface: 'tally' }),
      });
      return d;
    };
    const withBias = rebuilt('qwen-bias');
    for (const [name, t] of weights) if (name.endsWith('.bias')) t.data.fill(0);
    const withoutBias = rebuilt('qwen-nobias');
    const ids = TextTokenizer.load(dir).encode('Hello, world! How are you?');
    const chunks = [ids.slice(0, 4), ids.slice(4)];
    const [a, b] = [await logitsOf(withBias, chunks), await logitsOf(withoutBias, chunks)];
    expect(maxDiff(a[1], b[1])).toBeGreaterThan(1e-3);
    // The converter's own output is the seed-3 weights with their (unscaled) biases: it differs from both.
    const c = await logitsOf(dir, chunks);
    expect(maxDiff(c[1], b[1])).toBeGreaterThan(1e-5);
  });

  it('the same seed gives identical bytes; another seed gives other weights', () => {
    const small = { num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16 };
    const make = (name: string, seed: number) => {
      const d = out(name);
      convertRandomLike(SMOL, d, { seed, overrides: small });
      return { onnx: fs.readFileSync(path.join(d, 'onnx/model.onnx')), data: fs.readFileSync(path.join(d, 'onnx/model.onnx_data')) };
    };
    const a = make('seed-a', 7);
    const b = make('seed-b', 7);
    const c = make('seed-c', 8);
    expect(a.data.equals(b.data)).toBe(true);
    expect(a.onnx.equals(b.onnx)).toBe(true);
    expect(c.data.length).toBe(a.data.length);
    expect(c.data.equals(a.data)).toBe(false);
    // Not just a few bytes: most of the weights differ.
    const fa = new Float32Array(a.data.buffer, a.data.byteOffset, a.data.length / 4);
    const fc = new Float32Array(c.data.buffer, c.data.byteOffset, c.data.length / 4);
    let same = 0;
    for (let i = 0; i < fa.length; i++) if (fa[i] === fc[i]) same++;
    expect(same / fa.length).toBeLessThan(0.5);
  });
});

describe('convert errors', () => {
  it('a missing input file', () => {
    const dest = out('missing');
    expect(() => convertCheckpoint(path.join(tmp, 'nope.gguf'), dest)).toThrow(/nope\.gguf does not exist/);
    expect(() => convertRandomLike(path.join(tmp, 'no-such-model'), dest, { seed: 1 })).toThrow(/has no config\.json/);
    expect(fs.existsSync(dest)).toBe(false);
  });

  it('a config that is not a Llama-family decoder', () => {
    const like = out('gpt2-like');
    fs.mkdirSync(like, { recursive: true });
    fs.writeFileSync(path.join(like, 'config.json'), JSON.stringify({
      model_type: 'gpt2', architectures: ['GPT2LMHeadModel'], hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1,
      num_attention_heads: 4, vocab_size: 49152, max_position_embeddings: 128,
    }));
    fs.copyFileSync(path.join(SMOL, 'tokenizer.json'), path.join(like, 'tokenizer.json'));
    const dest = out('gpt2-out');
    expect(() => convertRandomLike(like, dest, { seed: 1 })).toThrow(/model_type gpt2 is not a Llama-family decoder \(llama, qwen2, mistral, qwen3\)/);
    expect(fs.existsSync(dest)).toBe(false);
  });

  it('a GGUF with a bad magic', () => {
    const bad = out('bad-magic.gguf');
    const bytes = fs.readFileSync(GGUF);
    bytes.write('GGUX', 0, 'latin1');
    fs.writeFileSync(bad, bytes);
    const dest = out('bad-out');
    expect(() => convertCheckpoint(bad, dest)).toThrow(/bad-magic\.gguf: not a GGUF file \(bad magic\)/);
    expect(() => readCheckpoint(bad, { tokenizer: path.join(STORIES, 'tok512.model') })).toThrow(/not a GGUF file \(bad magic\)/);
    expect(fs.existsSync(dest)).toBe(false);
  });

  it('a llama2.c checkpoint with no tokenizer beside it or given', () => {
    const lonely = out('lonely');
    fs.mkdirSync(lonely, { recursive: true });
    fs.copyFileSync(BIN, path.join(lonely, 'model.bin'));
    expect(() => convertCheckpoint(path.join(lonely, 'model.bin'), out('lonely-out'))).toThrow(/no tokenizer given .*--tokenizer/);
  });
});
