import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { GgufValueType, readGguf, writeGguf, type GgufMeta } from '../src/model/gguf.ts';
import { ggufByteLevelTokenizer } from '../src/model/gguf-tokenizer.ts';
import { convertCheckpoint } from '../src/model/convert.ts';
import { TextTokenizer } from '../src/model/tokenizer.ts';
import { SHARED_MODELS } from './helpers/models.ts';

const GGUF = path.join(SHARED_MODELS, 'gguf-tokenizer', 'smollm2-tiny.gguf');
const SMOL = path.join(SHARED_MODELS, 'SmolLM2-135M-Instruct');
const fixture = JSON.parse(fs.readFileSync(new URL('./fixtures/sp-stories260K.json', import.meta.url), 'utf8')) as { cases: { text: string }[] };
const CORPUS = [
  ...fixture.cases.map((c) => c.text),
  "I'm sure they'll say it's DON'T, we've, you'd",
  'Привет, как дела? Всё хорошо.',
  'مرحبا بالعالم، كيف حالك؟',
  'नमस्ते दुनिया, आप कैसे हैं?',
  'こんにちは世界。カタカナとひらがな、漢字。',
  '안녕하세요 세계',
  'Ελληνικά κείμενα και αριθμοί 2024',
  'def f(x):\n    return x ** 2  # square\n\n\tif x >= 10_000: pass',
  'prices: $1,234.56 vs €99 — 3×4=12; 0.000123e-7',
  '<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n',
  'text<|endoftext|>more <repo_name> and <|im_end|>',
  '   indented    spaces\u00a0nbsp\u2003em-space  ',
  'e\u0301 composed vs é precomposed, ﬁ ligature, Ａ fullwidth',
];

describe('GGUF byte-level BPE ("gpt2") tokenizers', () => {
  const g = readGguf(GGUF);
  const files = ggufByteLevelTokenizer(g.metadata);
  const built = TextTokenizer.fromFiles(files.tokenizerJson, files.tokenizerConfig);
  const real = TextTokenizer.load(SMOL);
  const realJson = JSON.parse(fs.readFileSync(path.join(SMOL, 'tokenizer.json'), 'utf8'));
  const realConfig = JSON.parse(fs.readFileSync(path.join(SMOL, 'tokenizer_config.json'), 'utf8'));

  it("smollm2-tiny.gguf becomes SmolLM2's own tokenizer.json", () => {
    const json = files.tokenizerJson as Record<string, any>;
    for (const key of ['normalizer', 'pre_tokenizer', 'decoder']) expect(json[key], key).toEqual(realJson[key]);
    expect(json.added_tokens).toEqual(realJson.added_tokens);
    expect(json.model.vocab).toEqual(realJson.model.vocab);
    expect(json.model.merges).toEqual(realJson.model.merges.map((m: string | string[]) => (Array.isArray(m) ? m : m.split(' '))));
  });

  it('encodes and decodes a multilingual corpus exactly as SmolLM2-135M-Instruct does', () => {
    let tokens = 0;
    for (const text of CORPUS) {
      const ids = real.encode(text);
      tokens += ids.length;
      expect(built.encode(text), JSON.stringify(text)).toEqual(ids);
      expect(built.encode(text, { addSpecialTokens: false })).toEqual(real.encode(text, { addSpecialTokens: false }));
      expect(built.decode(ids)).toBe(real.decode(ids));
      expect(built.decode(ids, { skipSpecialTokens: false })).toBe(text);
    }
    expect(tokens).toBeGreaterThan(300);
    expect(built.streamDecoding).toBe('bytelevel');
  });

  it('keeps the chat template and the end and start tokens of the metadata', () => {
    expect(files.tokenizerConfig.chat_template).toBe(realConfig.chat_template);
    expect([built.bosId, built.eosIds, built.addBosToken]).toEqual([real.bosId, real.eosIds, real.addBosToken]);
    expect([built.bosId, built.eosIds, built.addBosToken]).toEqual([1, [2], false]);
    expect(files.eosIds).toEqual([2]);
  });

  it('tally convert writes a folder whose tokenizer and generation config say the same', () => {
    const out = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-gguf-tok-'));
    try {
      convertCheckpoint(GGUF, out);
      const tok = TextTokenizer.load(out);
      const chat = '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n';
      expect(tok.encode(chat)).toEqual(real.encode(chat));
      const gen = JSON.parse(fs.readFileSync(path.join(out, 'generation_config.json'), 'utf8'));
      expect(gen.eos_token_id).toBe(2);
      const config = JSON.parse(fs.readFileSync(path.join(out, 'config.json'), 'utf8'));
      expect([config.bos_token_id, config.eos_token_id, config.vocab_size]).toEqual([1, 2, 49152]);
      expect(JSON.parse(fs.readFileSync(path.join(out, 'tokenizer_config.json'), 'utf8')).chat_template).toBe(realConfig.chat_template);
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  });

  it('an unknown tokenizer model or pre-tokenizer is an error, never a guess', () => {
    const meta = (changes: Record<string, unknown>) => {
      const m = new Map(g.metadata);
      for (const [k, v] of Object.entries(changes)) (v === undefined ? m.delete(k) : m.set(k, v));
      return m;
    };
    expect(() => ggufByteLevelTokenizer(meta({ 'tokenizer.ggml.pre': 'deepseek-coder' }))).toThrow(/unsupported tokenizer.ggml.pre "deepseek-coder" \(supported: .*smollm/);
    expect(() => ggufByteLevelTokenizer(meta({ 'tokenizer.ggml.pre': undefined }))).toThrow(/tokenizer.ggml.pre is missing/);
    expect(() => ggufByteLevelTokenizer(meta({ 'tokenizer.ggml.merges': undefined }))).toThrow(/needs tokenizer.ggml.merges/);

    const file = path.join(os.tmpdir(), `tally-bert-${process.pid}.gguf`);
    const s = (value: string): GgufMeta => ({ type: GgufValueType.STRING, value });
    const u32 = (value: number): GgufMeta => ({ type: GgufValueType.UINT32, value });
    writeGguf(file, {
      'general.architecture': s('llama'), 'llama.embedding_length': u32(8), 'llama.feed_forward_length': u32(8), 'llama.block_count': u32(0),
      'llama.attention.head_count': u32(2), 'llama.context_length': u32(8), 'llama.attention.layer_norm_rms_epsilon': { type: GgufValueType.FLOAT32, value: 1e-5 },
      'tokenizer.ggml.model': s('bert'), 'tokenizer.ggml.tokens': { type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value: ['a', 'b'] },
    }, []);
    try {
      expect(() => convertCheckpoint(file, path.join(os.tmpdir(), `tally-bert-out-${process.pid}`))).toThrow(/unsupported tokenizer.ggml.model "bert"/);
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  it('qwen2: Qwen2.5 metadata written as llama.cpp\'s converter writes it tokenizes as Qwen2.5 does', () => {
    const dir = path.join(SHARED_MODELS, 'Qwen2.5-0.5B-Instruct');
    const json = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer.json'), 'utf8'));
    const tokens: string[] = [];
    const types: number[] = [];
    for (const [piece, id] of Object.entries(json.model.vocab as Record<string, number>)) [tokens[id], types[id]] = [piece, 1];
    for (const a of json.added_tokens) [tokens[a.id], types[a.id]] = [a.content, a.special || /^<\|.*\|>$/.test(a.content) ? 3 : 4];
    for (let i = tokens.length; i < 151936; i++) [tokens[i], types[i]] = [`[PAD${i}]`, 4];
    const meta = new Map<string, unknown>([
      ['tokenizer.ggml.model', 'gpt2'], ['tokenizer.ggml.pre', 'qwen2'], ['tokenizer.ggml.tokens', tokens], ['tokenizer.ggml.token_type', types],
      ['tokenizer.ggml.merges', json.model.merges.map((m: string | string[]) => (Array.isArray(m) ? m.join(' ') : m))],
      ['tokenizer.ggml.eos_token_id', 151645], ['tokenizer.ggml.padding_token_id', 151643], ['tokenizer.ggml.bos_token_id', 151643], ['tokenizer.ggml.add_bos_token', false],
    ]);
    const files = ggufByteLevelTokenizer(meta);
    const qwen = TextTokenizer.fromFiles(files.tokenizerJson, files.tokenizerConfig);
    const realQwen = TextTokenizer.load(dir);
    for (const text of CORPUS) {
      const ids = realQwen.encode(text);
      expect(qwen.encode(text), JSON.stringify(text)).toEqual(ids);
      expect(qwen.decode(ids, { skipSpecialTokens: false })).toBe(realQwen.decode(ids, { skipSpecialTokens: false }));
    }
    expect(qwen.eosIds).toEqual([151645]);
    expect(qwen.encode('[PAD151700]')).toEqual(realQwen.encode('[PAD151700]'));
  });
});
