import { type LlamaConfig, type WeightMap, headDim, hasQkvBias } from './types.ts';

/** sfc32 seeded through splitmix32: fast, deterministic, good enough for weights. */
export function seededUniform(seed: number): () => number {
  let s = seed >>> 0;
  const split = () => {
    s = (s + 0x9e3779b9) >>> 0;
    let z = s;
    z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
    z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
    return (z ^ (z >>> 16)) >>> 0;
  };
  let a = split(), b = split(), c = split(), d = split();
  return () => {
    const t = (((a + b) >>> 0) + d) >>> 0;
    d = (d + 1) >>> 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) >>> 0;
    c = ((c << 21) | (c >>> 11)) >>> 0;
    c = (c + t) >>> 0;
    return t / 4294967296;
  };
}

/**
 * Random weights of exactly the architecture in `config` (HF layout), as an untrained model would
 * have them: linear weights uniform with std 0.02, norms 1, biases small.
 */
export function randomWeights(config: LlamaConfig, seed: number): WeightMap {
  const rand = seededUniform(seed);
  const H = config.hidden_size;
  const hd = headDim(config);
  const nh = config.num_attention_heads;
  const kvh = config.num_key_value_heads;
  const ffn = config.intermediate_size;
  const amplitude = 0.02 * Math.sqrt(3);
  const weights: WeightMap = new Map();
  const uniform = (name: string, shape: number[], amp = amplitude) => {
    const data = new Float32Array(shape.reduce((a, b) => a * b, 1));
    for (let i = 0; i < data.length; i++) data[i] = (rand() * 2 - 1) * amp;
    weights.set(name, { shape, data });
  };
  const ones = (name: string, n: number) => weights.set(name, { shape: [n], data: new Float32Array(n).fill(1) });

  uniform('model.embed_tokens.weight', [config.vocab_size, H]);
  for (let l = 0; l < config.num_hidden_layers; l++) {
    const p = `model.layers.${l}`;
    ones(`${p}.input_layernorm.weight`, H);
    ones(`${p}.post_attention_layernorm.weight`, H);
    uniform(`${p}.self_attn.q_proj.weight`, [nh * hd, H]);
    uniform(`${p}.self_attn.k_proj.weight`, [kvh * hd, H]);
    uniform(`${p}.self_attn.v_proj.weight`, [kvh * hd, H]);
    uniform(`${p}.self_attn.o_proj.weight`, [H, nh * hd]);
    if (hasQkvBias(config)) {
      uniform(`${p}.self_attn.q_proj.bias`, [nh * hd]);
      uniform(`${p}.self_attn.k_proj.bias`, [kvh * hd]);
      uniform(`${p}.self_attn.v_proj.bias`, [kvh * hd]);
    }
    if (config.model_type === 'qwen3') {
      uniform(`${p}.self_attn.q_norm.weight`, [hd], 1);
      uniform(`${p}.self_attn.k_norm.weight`, [hd], 1);
    }
    uniform(`${p}.mlp.gate_proj.weight`, [ffn, H]);
    uniform(`${p}.mlp.up_proj.weight`, [ffn, H]);
    uniform(`${p}.mlp.down_proj.weight`, [H, ffn]);
  }
  ones('model.norm.weight', H);
  if (!config.tie_word_embeddings) uniform('lm_head.weight', [config.vocab_size, H]);
  return weights;
}
