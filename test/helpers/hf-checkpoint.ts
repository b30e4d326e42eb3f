import fs from 'node:fs';
import path from 'node:path';
import { GgmlType, GgufValueType, writeGguf, type GgufMeta } from '../../src/model/gguf.ts';
import { writeSafetensors, type SafetensorsDtype } from '../../src/model/safetensors.ts';
import type { LlamaConfig, WeightMap } from '../../src/model/types.ts';
import { SHARED_MODELS } from './models.ts';

/**
 * Writes a Hugging Face checkpoint folder as transformers' save_pretrained lays it out: config.json,
 * model.safetensors (or model-0000k-of-0000n.safetensors with model.safetensors.index.json), and the tokenizer
 * files of a published model from ../shared/models.
 */
export function writeHfCheckpoint(dir: string, config: LlamaConfig, weights: WeightMap, options: { dtype?: SafetensorsDtype; shards?: number; tokenizerOf?: string } = {}): void {
  const dtype = options.dtype ?? 'BF16';
  const shards = options.shards ?? 1;
  fs.mkdirSync(dir, { recursive: true });
  const torchDtype = { BF16: 'bfloat16', F16: 'float16', F32: 'float32' }[dtype];
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config, torch_dtype: torchDtype }, null, 2));
  const names = [...weights.keys()];
  const per = Math.ceil(names.length / shards);
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < shards; s++) {
    const file = shards === 1 ? 'model.safetensors' : `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
    const mine = names.slice(s * per, (s + 1) * per);
    for (const n of mine) weightMap[n] = file;
    writeSafetensors(path.join(dir, file), mine.map((name) => ({ name, dtype, shape: weights.get(name)!.shape, data: weights.get(name)!.data })), { format: 'pt' });
  }
  if (shards > 1) fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }, null, 2));
  const tokenizerOf = path.join(SHARED_MODELS, options.tokenizerOf ?? 'SmolLM2-135M-Instruct');
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
    if (fs.existsSync(path.join(tokenizerOf, f))) fs.copyFileSync(path.join(tokenizerOf, f), path.join(dir, f));
  }
}

/** llama.cpp's convert_hf_to_gguf permute: each head's rows (half, j) → (j, half), for GGUF's interleaved RoPE. */
function ggufPermute(data: Float32Array, heads: number, rows: number, cols: number): Float32Array {
  const hd = rows / heads, half = hd / 2, outp = new Float32Array(data.length);
  for (let h = 0; h < heads; h++)
    for (let t = 0; t < 2; t++)
      for (let j = 0; j < half; j++) outp.set(data.subarray((h * hd + t * half + j) * cols, (h * hd + t * half + j + 1) * cols), (h * hd + 2 * j + t) * cols);
  return outp;
}

/** The same weights as a llama GGUF (F32), q/k permuted as llama.cpp's converter does unless `permute` is false. */
export function writeLlamaGguf(file: string, config: LlamaConfig, weights: WeightMap, permute: boolean): void {
  const u32 = (value: number): GgufMeta => ({ type: GgufValueType.UINT32, value });
  const f32 = (value: number): GgufMeta => ({ type: GgufValueType.FLOAT32, value });
  const V = config.vocab_size;
  const metadata: Record<string, GgufMeta> = {
    'general.architecture': { type: GgufValueType.STRING, value: 'llama' },
    'llama.embedding_length': u32(config.hidden_size),
    'llama.feed_forward_length': u32(config.intermediate_size),
    'llama.block_count': u32(config.num_hidden_layers),
    'llama.attention.head_count': u32(config.num_attention_heads),
    'llama.attention.head_count_kv': u32(config.num_key_value_heads),
    'llama.context_length': u32(config.max_position_embeddings),
    'llama.attention.layer_norm_rms_epsilon': f32(config.rms_norm_eps),
    'llama.rope.freq_base': f32(config.rope_theta),
    'tokenizer.ggml.model': { type: GgufValueType.STRING, value: 'llama' },
    'tokenizer.ggml.tokens': { type: GgufValueType.ARRAY, itemType: GgufValueType.STRING, value: Array.from({ length: V }, (_, i) => `t${i}`) },
    'tokenizer.ggml.bos_token_id': u32(1),
    'tokenizer.ggml.eos_token_id': u32(2),
  };
  const names: Record<string, string> = {
    input_layernorm: 'attn_norm', 'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
    post_attention_layernorm: 'ffn_norm', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down',
  };
  const tensors = [...weights].map(([name, t]) => {
    const m = /^model\.layers\.(\d+)\.(.+)\.weight$/.exec(name);
    const gguf = m ? `blk.${m[1]}.${names[m[2]]}.weight` : { 'model.embed_tokens.weight': 'token_embd.weight', 'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight' }[name]!;
    let data = t.data;
    if (permute && m?.[2] === 'self_attn.q_proj') data = ggufPermute(data, config.num_attention_heads, t.shape[0], t.shape[1]);
    if (permute && m?.[2] === 'self_attn.k_proj') data = ggufPermute(data, config.num_key_value_heads, t.shape[0], t.shape[1]);
    return { name: gguf, shape: t.shape, type: GgmlType.F32, data };
  });
  writeGguf(file, metadata, tensors);
}
