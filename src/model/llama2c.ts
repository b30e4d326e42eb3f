import { readFileSync } from 'node:fs';
import { unpermuteQk } from './gguf.ts';
import type { Checkpoint, LlamaConfig, SpVocab, WeightMap } from './types.ts';

/** A llama2.c legacy checkpoint (run.c's format: 7 int32 header, then fp32 tensors) in HF naming and layout. */
export function readLlama2c(binPath: string, vocab: SpVocab): Checkpoint {
  const buf = readFileSync(binPath);
  if (buf.length < 28) throw new Error(`${binPath}: too short for a llama2.c header (${buf.length} bytes)`);
  const [dim, hidden, layers, heads, kvHeads, signedVocab, seqLen] = Array.from({ length: 7 }, (_, i) => buf.readInt32LE(4 * i));
  if ([dim, hidden, layers, heads, kvHeads, seqLen].some((v) => v <= 0) || dim % heads || heads % kvHeads) {
    throw new Error(`${binPath}: implausible llama2.c header [${[dim, hidden, layers, heads, kvHeads, signedVocab, seqLen]}]`);
  }
  const vocabSize = Math.abs(signedVocab), tied = signedVocab > 0;
  if (vocabSize !== vocab.pieces.length) throw new Error(`${binPath}: vocab_size ${vocabSize} but the tokenizer has ${vocab.pieces.length} pieces`);
  const hd = dim / heads, kvDim = kvHeads * hd;

  const floats = (buf.length - 28) / 4;
  const expected = vocabSize * dim + layers * (2 * dim + 2 * dim * dim + 2 * dim * kvDim + 3 * dim * hidden) + dim + seqLen * hd + (tied ? 0 : vocabSize * dim);
  if (floats !== expected) throw new Error(`${binPath}: ${buf.length - 28} bytes of weights, expected ${expected * 4} for this header`);
  const all = buf.byteOffset % 4 === 0 ? new Float32Array(buf.buffer, buf.byteOffset + 28, floats) : new Float32Array(buf.buffer.slice(buf.byteOffset + 28, buf.byteOffset + buf.length));
  let pos = 0;
  const take = (n: number) => all.subarray(pos, (pos += n));
  const perLayer = (rows: number, cols: number) => Array.from({ length: layers }, () => take(rows * cols));

  const weights: WeightMap = new Map();
  const set = (name: string, shape: number[], data: Float32Array) => weights.set(name, { shape, data });
  const layer = (i: number, name: string) => `model.layers.${i}.${name}.weight`;

  set('model.embed_tokens.weight', [vocabSize, dim], take(vocabSize * dim));
  const groups: [string, number, number][] = [
    ['input_layernorm', dim, 1],
    ['self_attn.q_proj', dim, dim],
    ['self_attn.k_proj', kvDim, dim],
    ['self_attn.v_proj', kvDim, dim],
    ['self_attn.o_proj', dim, dim],
    ['post_attention_layernorm', dim, 1],
    ['mlp.gate_proj', hidden, dim],
    ['mlp.down_proj', dim, hidden],
    ['mlp.up_proj', hidden, dim],
  ];
  for (const [name, rows, cols] of groups) {
    perLayer(rows, cols).forEach((data: Float32Array, i) => {
      if (name === 'self_attn.q_proj') data = unpermuteQk(data, heads, hd, cols);
      if (name === 'self_attn.k_proj') data = unpermuteQk(data, kvHeads, hd, cols);
      set(layer(i, name), cols === 1 ? [rows] : [rows, cols], data);
    });
  }
  set('model.norm.weight', [dim], take(dim));
  take(seqLen * hd); // freq_cis_real, freq_cis_imag
  if (!tied) set('lm_head.weight', [vocabSize, dim], take(vocabSize * dim));

  const config: LlamaConfig = {
    model_type: 'llama',
    architectures: ['LlamaForCausalLM'],
    hidden_size: dim,
    intermediate_size: hidden,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    vocab_size: vocabSize,
    max_position_embeddings: seqLen,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    tie_word_embeddings: tied,
    bos_token_id: vocab.bosId,
    eos_token_id: vocab.eosId,
  };
  return { config, weights, vocab };
}
