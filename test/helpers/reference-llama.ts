import { type LlamaConfig, type WeightMap, headDim, hasQkvBias } from '../../src/model/types.ts';

/** A direct, unbatched Llama forward pass in plain JavaScript (HF layout, rotate-half RoPE; Qwen3's q/k norm when present). */
export function referenceLogits(config: LlamaConfig, w: WeightMap, tokens: number[]): Float32Array[] {
  const H = config.hidden_size, nh = config.num_attention_heads, kvh = config.num_key_value_heads;
  const hd = headDim(config), ffn = config.intermediate_size, V = config.vocab_size;
  const get = (n: string) => w.get(n)!.data;
  const linear = (x: Float64Array, W: Float32Array, out: number, inn: number, bias?: Float32Array) => {
    const y = new Float64Array(out);
    for (let o = 0; o < out; o++) {
      let s = bias ? bias[o] : 0;
      for (let i = 0; i < inn; i++) s += W[o * inn + i] * x[i];
      y[o] = s;
    }
    return y;
  };
  const rms = (x: Float64Array, weight: Float32Array) => {
    let ss = 0;
    for (const v of x) ss += v * v;
    const r = 1 / Math.sqrt(ss / x.length + config.rms_norm_eps);
    return x.map((v, i) => v * r * weight[i]);
  };
  // Llama 3.1's rope_scaling, as transformers' _compute_llama3_parameters writes it.
  const scaling = config.rope_scaling as { factor: number; low_freq_factor: number; high_freq_factor: number; original_max_position_embeddings: number } | undefined;
  const invFreq = Array.from({ length: hd / 2 }, (_, i) => {
    const f = 1 / Math.pow(config.rope_theta, (2 * i) / hd);
    if (!scaling) return f;
    const { factor, low_freq_factor: lo, high_freq_factor: hi, original_max_position_embeddings: old } = scaling;
    const wavelen = (2 * Math.PI) / f;
    const smooth = (old / wavelen - lo) / (hi - lo);
    return wavelen < old / hi ? f : wavelen > old / lo ? f / factor : (1 - smooth) * (f / factor) + smooth * f;
  });
  const headRms = (x: Float64Array, heads: number, weight: Float32Array | undefined) => {
    if (!weight) return x;
    const out = new Float64Array(x.length);
    for (let h = 0; h < heads; h++) out.set(rms(x.subarray(h * hd, (h + 1) * hd), weight), h * hd);
    return out;
  };
  const rope = (x: Float64Array, heads: number, pos: number) => {
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < hd / 2; i++) {
        const a = pos * invFreq[i];
        const x1 = x[h * hd + i], x2 = x[h * hd + hd / 2 + i];
        x[h * hd + i] = x1 * Math.cos(a) - x2 * Math.sin(a);
        x[h * hd + hd / 2 + i] = x2 * Math.cos(a) + x1 * Math.sin(a);
      }
    }
  };
  const keys: Float64Array[][] = Array.from({ length: config.num_hidden_layers }, () => []);
  const values: Float64Array[][] = Array.from({ length: config.num_hidden_layers }, () => []);
  const result: Float32Array[] = [];
  const embed = get('model.embed_tokens.weight');
  tokens.forEach((tok, pos) => {
    let x = Float64Array.from(embed.subarray(tok * H, (tok + 1) * H));
    for (let l = 0; l < config.num_hidden_layers; l++) {
      const p = `model.layers.${l}`;
      const n = rms(x, get(`${p}.input_layernorm.weight`));
      const bias = hasQkvBias(config);
      const q = headRms(linear(n, get(`${p}.self_attn.q_proj.weight`), nh * hd, H, bias ? get(`${p}.self_attn.q_proj.bias`) : undefined), nh, w.get(`${p}.self_attn.q_norm.weight`)?.data);
      const k = headRms(linear(n, get(`${p}.self_attn.k_proj.weight`), kvh * hd, H, bias ? get(`${p}.self_attn.k_proj.bias`) : undefined), kvh, w.get(`${p}.self_attn.k_norm.weight`)?.data);
      const v = linear(n, get(`${p}.self_attn.v_proj.weight`), kvh * hd, H, bias ? get(`${p}.self_attn.v_proj.bias`) : undefined);
      rope(q, nh, pos);
      rope(k, kvh, pos);
      keys[l].push(k);
      values[l].push(v);
      const att = new Float64Array(nh * hd);
      for (let h = 0; h < nh; h++) {
        const kv = Math.floor(h / (nh / kvh));
        const scores = keys[l].map((kk) => {
          let s = 0;
          for (let d = 0; d < hd; d++) s += q[h * hd + d] * kk[kv * hd + d];
          return s / Math.sqrt(hd);
        });
        const m = Math.max(...scores);
        const e = scores.map((s) => Math.exp(s - m));
        const z = e.reduce((a, b) => a + b, 0);
        values[l].forEach((vv, t) => {
          for (let d = 0; d < hd; d++) att[h * hd + d] += (e[t] / z) * vv[kv * hd + d];
        });
      }
      const o = linear(att, get(`${p}.self_attn.o_proj.weight`), H, nh * hd);
      x = x.map((xv, i) => xv + o[i]);
      const n2 = rms(x, get(`${p}.post_attention_layernorm.weight`));
      const gate = linear(n2, get(`${p}.mlp.gate_proj.weight`), ffn, H);
      const up = linear(n2, get(`${p}.mlp.up_proj.weight`), ffn, H);
      const act = gate.map((gv, i) => (gv / (1 + Math.exp(-gv))) * up[i]);
      const down = linear(act, get(`${p}.mlp.down_proj.weight`), H, ffn);
      x = x.map((xv, i) => xv + down[i]);
    }
    const final = rms(x, get('model.norm.weight'));
    const head = w.get('lm_head.weight')?.data ?? embed;
    result.push(Float32Array.from(linear(final, head, V, H)));
  });
  return result;
}
