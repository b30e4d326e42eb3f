import { float32ToFloat16 } from './half.ts';
import { DataType, type AttributeValue, type ModelSpec, type NodeSpec, type TensorSpec, type ValueInfo, rawBytes } from './onnx-proto.ts';
import { type LlamaConfig, type Tensor32, type WeightSource, headDim, hasQkvBias } from './types.ts';
import { GgmlType } from './ggml-quants.ts';
import { QUANT_ACCURACY_LEVEL, nbitsAttributes, rowBlockSize, quantizeNBits, stackNBits, type NBitsWeight } from './quant.ts';

/**
 * Two graph interfaces:
 *  - 'tally': the KV cache lives in JavaScript-owned slot buffers that are passed in as inputs
 *    (zero-copy on CPU); the graph returns only the new positions' keys and values and the logits
 *    of one chosen position per row. Per-step traffic grows with new tokens, not with context.
 *  - 'hf': the interface of onnx-community / Optimum exports (past_key_values.N.key/value in,
 *    present.N.key/value out, attention_mask, optional position_ids), used to test the plain path.
 */
export type GraphInterface = 'tally' | 'hf';

export const TALLY_GRAPH_VERSION = '8';

/** The most of a row's largest logits that runners ask Tally's graphs for (greedy rows need nothing else). */
export const TOP_LOGITS = 16;

/** A linear layer's MatMulNBits initializers; k: its input width. */
export interface QuantLinear {
  b: TensorSpec;
  scales: TensorSpec;
  zp?: TensorSpec;
  k: number;
}

/** The MatMulNBits initializers of `${base}` among a graph's, if it has them. */
export function quantLinearOf(tensors: Map<string, TensorSpec>, base: string, k: number): QuantLinear | undefined {
  const b = tensors.get(`${base}.weight_q`);
  const scales = tensors.get(`${base}.weight_scales`);
  if (!b || !scales) return undefined;
  return { b, scales, zp: tensors.get(`${base}.weight_zp`), k };
}

export class GraphBuilder {
  nodes: NodeSpec[] = [];
  initializers: TensorSpec[] = [];
  inputs: ValueInfo[] = [];
  outputs: ValueInfo[] = [];
  private counter = 0;
  private constants = new Map<string, string>();

  /** dtype: the type of weights, activations and the KV cache; masks, softmax and logits stay float32. */
  constructor(readonly dtype: DataType.FLOAT | DataType.FLOAT16) {}

  op(opType: string, inputs: string[], attributes?: Record<string, AttributeValue>, outputs = 1, domain?: string): string[] {
    const id = this.counter++;
    const outs = Array.from({ length: outputs }, (_, i) => `${opType.toLowerCase()}_${id}${outputs > 1 ? `_${i}` : ''}`);
    this.nodes.push({ opType, inputs, outputs: outs, name: `${opType}_${id}`, attributes, domain });
    return outs;
  }

  op1(opType: string, inputs: string[], attributes?: Record<string, AttributeValue>, domain?: string): string {
    return this.op(opType, inputs, attributes, 1, domain)[0];
  }

  /** Renames the output of the last node (for graph outputs). */
  nameLast(name: string): string {
    this.nodes[this.nodes.length - 1].outputs[0] = name;
    return name;
  }

  /** An initializer as it already is (e.g. read from another graph, with its external data). */
  tensor(spec: TensorSpec): string {
    if (!this.initializers.includes(spec)) this.initializers.push(spec);
    return spec.name;
  }

  /** A block-quantised weight's initializers, named `${base}.weight_q`, `.weight_scales`, `.weight_zp`. */
  nbitsWeight(base: string, q: NBitsWeight): QuantLinear {
    const blocks = q.scales.length / q.n;
    const b: TensorSpec = { name: `${base}.weight_q`, type: DataType.UINT8, dims: [q.n, blocks, q.packed.length / (q.n * blocks)], raw: q.packed };
    const scales: TensorSpec = { name: `${base}.weight_scales`, type: this.dtype, dims: [q.n, blocks], raw: rawBytes(this.dtype === DataType.FLOAT16 ? float32ToFloat16(q.scales) : q.scales) };
    const zp: TensorSpec | undefined = q.zeroPoints && { name: `${base}.weight_zp`, type: DataType.UINT8, dims: [q.zeroPoints.length], raw: q.zeroPoints };
    return { b, scales, zp, k: q.k };
  }

  /** An embedding table [V, H] as GatherBlockQuantized takes it: data [V, H × bits / 8], scales and zero points [V, ·]. */
  embeddingWeight(base: string, q: NBitsWeight): QuantLinear {
    const blocks = q.scales.length / q.n;
    const b: TensorSpec = { name: `${base}.weight_q`, type: DataType.UINT8, dims: [q.n, q.packed.length / q.n], raw: q.packed };
    const scales: TensorSpec = { name: `${base}.weight_scales`, type: this.dtype, dims: [q.n, blocks], raw: rawBytes(this.dtype === DataType.FLOAT16 ? float32ToFloat16(q.scales) : q.scales) };
    const zp: TensorSpec = { name: `${base}.weight_zp`, type: DataType.UINT8, dims: [q.n, q.zeroPoints!.length / q.n], raw: q.zeroPoints! };
    return { b, scales, zp, k: q.k };
  }

  /** The rows of a block-quantised embedding table (embeddingWeight) for ids, dequantised. */
  gatherNBits(ids: string, w: QuantLinear): string {
    const blocks = w.scales.dims[1], blockSize = w.k / blocks, bits = (w.b.dims[1] * 8) / w.k;
    return this.op1('GatherBlockQuantized', [this.tensor(w.b), ids, this.tensor(w.scales), this.tensor(w.zp!)], { gather_axis: 0, quantize_axis: 1, block_size: blockSize, bits }, 'com.microsoft');
  }

  /** x [.., K] times a block-quantised [N, K] weight, as ONNX Runtime's MatMulNBits. */
  matMulNBits(x: string, w: QuantLinear): string {
    const { bits, blockSize } = nbitsAttributes(w.k, w.b.dims);
    const inputs = [x, this.tensor(w.b), this.tensor(w.scales), ...(w.zp ? [this.tensor(w.zp)] : [])];
    return this.op1('MatMulNBits', inputs, { K: w.k, N: w.b.dims[0], bits, block_size: blockSize, accuracy_level: QUANT_ACCURACY_LEVEL }, 'com.microsoft');
  }

  /** A weight in the graph's dtype; given as a function, its values are made only when the model is written. */
  weight(name: string, data: Float32Array | (() => Float32Array), dims: number[]): string {
    const bytes = (d: Float32Array) => rawBytes(this.dtype === DataType.FLOAT16 ? float32ToFloat16(d) : d);
    if (typeof data !== 'function') {
      this.initializers.push({ name, type: this.dtype, dims, raw: bytes(data) });
    } else {
      const length = dims.reduce((a, b) => a * b, 1) * (this.dtype === DataType.FLOAT16 ? 2 : 4);
      this.initializers.push({ name, type: this.dtype, dims, raw: new Uint8Array(0), lazy: { length, read: () => bytes(data()) } });
    }
    return name;
  }

  /**
   * Tally's logits outputs from the final-normed rows [B, H]: `logits` [B, V] in float32 and each row's
   * `top_k` largest (an input, [1]) as `top_logits` / `top_ids`, largest first, ties to the lower id (as an
   * argmax over the row): enough for greedy rows, so the full logits need not be fetched (a copy of batch ×
   * vocab floats per step). A row's plain greedy token needs top_k 1, one more per token it may not be: ONNX
   * Runtime's TopK costs grow with k, so callers ask for no more than they need.
   */
  logitsOutputs(normed: string, head: string | QuantLinear, vocab: number): void {
    this.toFloat32(typeof head === 'string' ? this.op1('Gemm', [normed, head], { transB: 1 }) : this.matMulNBits(normed, head));
    this.nameLast('logits');
    this.outputs.push({ name: 'logits', type: DataType.FLOAT, dims: ['batch', vocab] });
    this.inputs.push({ name: 'top_k', type: DataType.INT64, dims: [1] });
    this.nodes.push({ opType: 'TopK', inputs: ['logits', 'top_k'], outputs: ['top_logits', 'top_ids'], name: 'TopK_logits', attributes: { axis: -1, largest: 1, sorted: 1 } });
    this.outputs.push({ name: 'top_logits', type: DataType.FLOAT, dims: ['batch', 'top_k'] });
    this.outputs.push({ name: 'top_ids', type: DataType.INT64, dims: ['batch', 'top_k'] });
  }

  /** x as float32 (a Cast in float16 graphs). */
  toFloat32(x: string): string {
    return this.dtype === DataType.FLOAT ? x : this.op1('Cast', [x], { to: DataType.FLOAT });
  }

  /** x, a float32 value, in the graph's dtype. */
  toDtype(x: string): string {
    return this.dtype === DataType.FLOAT ? x : this.op1('Cast', [x], { to: this.dtype });
  }

  ints(values: number[]): string {
    const key = `i64:${values.join(',')}`;
    let name = this.constants.get(key);
    if (!name) {
      name = `const_i64_${this.constants.size}`;
      this.initializers.push({ name, type: DataType.INT64, dims: [values.length], raw: rawBytes(BigInt64Array.from(values.map(BigInt))) });
      this.constants.set(key, name);
    }
    return name;
  }

  scalar(value: number, type: DataType.FLOAT | DataType.FLOAT16 = DataType.FLOAT): string {
    const key = `${type}:${value}`;
    let name = this.constants.get(key);
    if (!name) {
      name = `const_${type === DataType.FLOAT ? 'f32' : 'f16'}_${this.constants.size}`;
      const data = Float32Array.of(value);
      this.initializers.push({ name, type, dims: [], raw: rawBytes(type === DataType.FLOAT ? data : float32ToFloat16(data)) });
      this.constants.set(key, name);
    }
    return name;
  }
}

/** RMSNorm over each head_dim slice of [N, width] rows. */
export function headNorm(g: GraphBuilder, x: string, weight: string, width: number, hd: number, eps: number): string {
  const normed = g.op1('SimplifiedLayerNormalization', [g.op1('Reshape', [x, g.ints([-1, hd])]), weight], { axis: -1, epsilon: { float: eps }, stash_type: 1 });
  return g.op1('Reshape', [normed, g.ints([-1, width])]);
}

function transpose(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = data[base + c];
  }
  return out;
}

/** [out, in] HF Linear weights stacked along out, returned as one [in, sum(out)] MatMul weight. */
function fusedLinear(parts: Float32Array[], outs: number[], inDim: number): Float32Array {
  const total = outs.reduce((a, b) => a + b, 0);
  const stacked = new Float32Array(total * inDim);
  let offset = 0;
  parts.forEach((p, i) => {
    stacked.set(p, offset);
    offset += outs[i] * inDim;
  });
  return transpose(stacked, total, inDim);
}

function req(weights: WeightSource, name: string): Float32Array {
  const t = weights.get(name);
  if (!t) throw new Error(`checkpoint is missing tensor ${name}`);
  return t.data;
}

/** [max_position, head_dim / 2] tables, as ONNX Runtime's RotaryEmbedding takes them. */
export function ropeTables(config: LlamaConfig): { cos: Float32Array; sin: Float32Array } {
  const hd = headDim(config);
  const half = hd / 2;
  const maxPos = config.max_position_embeddings;
  const cos = new Float32Array(maxPos * half);
  const sin = new Float32Array(maxPos * half);
  const invFreq = Array.from({ length: half }, (_, i) => scaledInvFreq(config, 1 / Math.pow(config.rope_theta, (2 * i) / hd)));
  for (let p = 0; p < maxPos; p++) {
    for (let i = 0; i < half; i++) {
      const angle = p * invFreq[i];
      cos[p * half + i] = Math.cos(angle);
      sin[p * half + i] = Math.sin(angle);
    }
  }
  return { cos, sin };
}

/** Llama 3.1's rope_scaling (rope_type "llama3"), as transformers' _compute_llama3_parameters; else f as is. */
function scaledInvFreq(config: LlamaConfig, f: number): number {
  const s = config.rope_scaling as { rope_type?: string; type?: string; factor: number; low_freq_factor: number; high_freq_factor: number; original_max_position_embeddings: number } | null | undefined;
  const type = s?.rope_type ?? s?.type;
  if (!s || type === 'default') return f;
  if (type !== 'llama3') throw new Error(`rope_scaling of type ${String(type)} is not supported (only llama3)`);
  const wavelen = (2 * Math.PI) / f;
  const lowWavelen = s.original_max_position_embeddings / s.low_freq_factor;
  const highWavelen = s.original_max_position_embeddings / s.high_freq_factor;
  if (wavelen < highWavelen) return f;
  if (wavelen > lowWavelen) return f / s.factor;
  const smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  return (1 - smooth) * (f / s.factor) + smooth * f;
}

export interface BuildOptions {
  interface: GraphInterface;
  /** hf interface only: whether the graph takes position_ids (else it derives them from attention_mask). */
  positionIds?: boolean;
  /** Weights, activations and KV cache (default float32). */
  dtype?: ModelDtype;
  /** Linear layers (and the output head) as MatMulNBits blocks, the embedding table as 8-bit blocks; norms stay in dtype. */
  quant?: QuantOptions;
}

export interface QuantOptions {
  /** Bits for weights that are not already quantised, or all weights when `keep` is false (GGUF Q4_0 / Q8_0 blocks of those bits are kept as they are either way). */
  bits: 4 | 8;
  blockSize: number;
  /**
   * Weights from a quantised GGUF keep their precision: Q4_0 and Q8_0 blocks as they are, Q4_K as 4 bits,
   * Q5_K and Q6_K as 8 bits (re-quantised); a fused layer takes the most bits of its parts.
   */
  keep: boolean;
  /** The output head's bits when not `bits` (default: 8, as llama.cpp keeps Q4 models' output at 6–8 bits); 'float' keeps it in dtype. */
  headBits?: 4 | 8 | 'float';
}

/** The bits a weight becomes under `quant`. */
export function targetBits(t: Tensor32, quant: QuantOptions): 4 | 8 {
  if (!quant.keep || !t.ggml) return quant.bits;
  switch (t.ggml.type) {
    case GgmlType.Q4_0: case GgmlType.Q4_K: return 4;
    case GgmlType.Q5_K: case GgmlType.Q6_K: case GgmlType.Q8_0: return 8;
    default: return quant.bits;
  }
}

/** HF [out, in] weights stacked along out as one block-quantised [sum(out), in] weight. */
export function quantizeLinear(parts: Tensor32[], inDim: number, quant: QuantOptions): NBitsWeight {
  const bits = Math.max(...parts.map((p) => targetBits(p, quant))) as 4 | 8;
  const kept = parts.map((p) => (p.ggml?.nbits?.bits === bits ? p.ggml.nbits : undefined));
  if (kept.every((q) => q !== undefined)) return stackNBits(kept as NBitsWeight[]);
  return stackNBits(parts.map((p) => quantizeNBits(p.data, p.shape[0], inDim, bits, rowBlockSize(inDim, quant.blockSize))));
}

export type ModelDtype = 'float32' | 'float16';

export function buildLlamaGraph(config: LlamaConfig, weights: WeightSource, options: BuildOptions): ModelSpec {
  const dt = options.dtype === 'float16' ? DataType.FLOAT16 : DataType.FLOAT;
  const g = new GraphBuilder(dt);
  const H = config.hidden_size;
  const L = config.num_hidden_layers;
  const nh = config.num_attention_heads;
  const kvh = config.num_key_value_heads;
  const hd = headDim(config);
  const group = nh / kvh;
  const ffn = config.intermediate_size;
  const V = config.vocab_size;
  const eps = config.rms_norm_eps;
  const tally = options.interface === 'tally';
  const withPositionIds = tally || options.positionIds !== false;

  g.inputs.push({ name: 'input_ids', type: DataType.INT64, dims: ['batch', 'new'] });
  if (tally) {
    g.inputs.push({ name: 'position_ids', type: DataType.INT64, dims: ['batch', 'new'] });
    // [batch, 1, heads/kv_heads × new, past], expanded so that adding it broadcasts over KV heads only.
    g.inputs.push({ name: 'past_mask', type: DataType.FLOAT, dims: ['batch', 1, 'group_new', 'past'] });
    // [batch, 1, 1, query, key]: additive, causal within the new tokens and padding.
    g.inputs.push({ name: 'new_mask', type: DataType.FLOAT, dims: ['batch', 1, 1, 'new', 'new'] });
    g.inputs.push({ name: 'logits_index', type: DataType.INT64, dims: ['batch'] });
  } else {
    g.inputs.push({ name: 'attention_mask', type: DataType.INT64, dims: ['batch', 'total'] });
    if (withPositionIds) g.inputs.push({ name: 'position_ids', type: DataType.INT64, dims: ['batch', 'new'] });
  }
  for (let l = 0; l < L; l++) {
    if (tally) {
      g.inputs.push({ name: `past_key.${l}`, type: dt, dims: ['batch', kvh, 'past', hd] });
      g.inputs.push({ name: `past_value.${l}`, type: dt, dims: ['batch', kvh, 'past', hd] });
    } else {
      g.inputs.push({ name: `past_key_values.${l}.key`, type: dt, dims: ['batch', kvh, 'past', hd] });
      g.inputs.push({ name: `past_key_values.${l}.value`, type: dt, dims: ['batch', kvh, 'past', hd] });
    }
  }

  const shapeIds = g.op1('Shape', ['input_ids']);
  const batchDim = g.op1('Slice', [shapeIds, g.ints([0]), g.ints([1])]);
  const newDim = g.op1('Slice', [shapeIds, g.ints([1]), g.ints([2])]);

  let positions: string;
  let additiveMask = '';
  if (withPositionIds) {
    positions = 'position_ids';
  } else {
    // As Optimum does: cumsum(attention_mask) - 1 over the whole sequence, last `new` positions.
    const cum = g.op1('CumSum', ['attention_mask', g.ints([1])]);
    const pos = g.op1('Sub', [cum, g.ints([1])]);
    const negNew = g.op1('Neg', [newDim]);
    positions = g.op1('Slice', [pos, negNew, g.ints([2 ** 62]), g.ints([1])]);
    positions = g.op1('Relu', [g.op1('Cast', [positions], { to: DataType.FLOAT })]);
    positions = g.op1('Cast', [positions], { to: DataType.INT64 });
  }
  if (!tally) {
    // Additive mask [batch, 1, new, total]: padding from attention_mask, causal by absolute index.
    const maskShape = g.op1('Shape', ['attention_mask']);
    const totalDim = g.op1('Slice', [maskShape, g.ints([1]), g.ints([2])]);
    const pastDim = g.op1('Sub', [totalDim, newDim]);
    const kIdx = g.op1('Range', [g.op1('Squeeze', [g.ints([0])]), g.op1('Squeeze', [totalDim]), g.op1('Squeeze', [g.ints([1])])]);
    const qIdx = g.op1('Range', [g.op1('Squeeze', [pastDim]), g.op1('Squeeze', [totalDim]), g.op1('Squeeze', [g.ints([1])])]);
    const causal = g.op1('LessOrEqual', [g.op1('Unsqueeze', [kIdx, g.ints([0])]), g.op1('Unsqueeze', [qIdx, g.ints([1])])]);
    const pad = g.op1('Cast', [g.op1('Unsqueeze', ['attention_mask', g.ints([1, 2])])], { to: DataType.BOOL });
    const allowed = g.op1('And', [g.op1('Unsqueeze', [causal, g.ints([0, 1])]), pad]);
    additiveMask = g.op1('Where', [allowed, g.scalar(0), g.scalar(-1e9)]);
  }

  const rope = ropeTables(config);
  const cosTable = g.weight('rope.cos', rope.cos, [config.max_position_embeddings, hd / 2]);
  const sinTable = g.weight('rope.sin', rope.sin, [config.max_position_embeddings, hd / 2]);
  // HF's rotate_half RoPE in one contrib kernel, on [B, T, heads × hd].
  const applyRope = (x: string, heads: number): string =>
    g.op1('RotaryEmbedding', [x, positions, cosTable, sinTable], { interleaved: 0, num_heads: heads }, 'com.microsoft');
  const rmsNorm = (x: string, weight: string): string =>
    g.op1('SimplifiedLayerNormalization', [x, weight], { axis: -1, epsilon: { float: eps }, stash_type: 1 });
  const tensorOf = (name: string): Tensor32 => weights.get(name) ?? (req(weights, name) as never);
  /**
   * x times HF [out, in] weights stacked along out: MatMulNBits, or MatMul on [in, sum(outs)] (`${base}.weight_t`)
   * whose values are read from the checkpoint only when the model is written.
   */
  const linear = (x: string, base: string, names: string[], inDim: number, outs: number[]): string => {
    if (options.quant) return g.matMulNBits(x, g.nbitsWeight(base, quantizeLinear(names.map(tensorOf), inDim, options.quant)));
    const w = () => (names.length === 1 ? transpose(req(weights, names[0]), outs[0], inDim) : fusedLinear(names.map((n) => req(weights, n)), outs, inDim));
    return g.op1('MatMul', [x, g.weight(`${base}.weight_t`, w, [inDim, outs.reduce((a, b) => a + b, 0)])]);
  };

  const hasLmHead = weights.has('lm_head.weight');
  const headBits = options.quant?.headBits ?? 8;
  // With the head quantised apart (or untied), the table serves only lookups: 8-bit blocks, a quarter the bytes.
  const embedBlock = options.quant && rowBlockSize(H, options.quant.blockSize);
  const quantEmbed = options.quant && (headBits !== 'float' || hasLmHead) && H % embedBlock! === 0;
  let embed = '';
  let hidden: string;
  if (quantEmbed) {
    const q = quantizeNBits(req(weights, 'model.embed_tokens.weight'), V, H, 8, embedBlock!);
    hidden = g.op1('Reshape', [g.gatherNBits('input_ids', g.embeddingWeight('model.embed_tokens', q)), g.ints([-1, H])]);
  } else {
    embed = g.weight('model.embed_tokens.weight', () => req(weights, 'model.embed_tokens.weight'), [V, H]);
    hidden = g.op1('Reshape', [g.op1('Gather', [embed, 'input_ids']), g.ints([-1, H])]); // [N, H]
  }

  const shape = (...parts: (string | number[])[]) => g.op1('Concat', parts.map((x) => (typeof x === 'string' ? x : g.ints(x))), { axis: 0 });
  const qShape = shape(batchDim, newDim, [nh, hd]);
  const kvShape = shape(batchDim, newDim, [kvh, hd]);
  const rowsShape = shape(batchDim, newDim, [-1]); // [B, T, heads × hd]
  const groupedShape5 = shape(batchDim, newDim, [kvh, group, hd]); // [B, T, kvh, g, hd]
  const qRowsShape = shape(batchDim, [kvh, -1, hd]); // [B, kvh, g*T, hd]
  const scoresNewShape5 = shape(batchDim, [kvh, group], newDim, newDim); // [B, kvh, g, T(query), T(key)]
  const scoresNewShape4 = shape(batchDim, [kvh, -1], newDim);
  const attnShape5 = shape(batchDim, [kvh, group], newDim, [hd]); // [B, kvh, g, T, hd]
  const scale = g.scalar(1 / Math.sqrt(hd), dt);
  const qkvBias = hasQkvBias(config);
  const newKv: string[] = [];

  for (let l = 0; l < L; l++) {
    const p = `model.layers.${l}`;
    const lw = (n: string) => req(weights, `${p}.${n}`);
    const normed = rmsNorm(hidden, g.weight(`${p}.input_layernorm.weight`, () => lw('input_layernorm.weight'), [H]));
    const qkvOut = [nh * hd, kvh * hd, kvh * hd];
    let qkv = linear(normed, `${p}.self_attn.qkv`, ['q', 'k', 'v'].map((x) => `${p}.self_attn.${x}_proj.weight`), H, qkvOut);
    if (qkvBias) {
      const total = qkvOut[0] + qkvOut[1] + qkvOut[2];
      const bias = () => {
        const b = new Float32Array(total);
        b.set(lw('self_attn.q_proj.bias'), 0);
        b.set(lw('self_attn.k_proj.bias'), qkvOut[0]);
        b.set(lw('self_attn.v_proj.bias'), qkvOut[0] + qkvOut[1]);
        return b;
      };
      qkv = g.op1('Add', [qkv, g.weight(`${p}.self_attn.qkv.bias`, bias, [total])]);
    }
    const split = g.op('Split', [qkv, g.ints(qkvOut)], { axis: -1 }, 3);
    let [qFlat, kFlat] = split;
    const vFlat = split[2];
    if (weights.has(`${p}.self_attn.q_norm.weight`)) {
      // Qwen3: RMSNorm over each head's q and k, before RoPE.
      qFlat = headNorm(g, qFlat, g.weight(`${p}.self_attn.q_norm.weight`, () => lw('self_attn.q_norm.weight'), [hd]), nh * hd, hd, eps);
      kFlat = headNorm(g, kFlat, g.weight(`${p}.self_attn.k_norm.weight`, () => lw('self_attn.k_norm.weight'), [hd]), kvh * hd, hd, eps);
    }
    const q = g.op1('Reshape', [g.op1('Mul', [applyRope(g.op1('Reshape', [qFlat, rowsShape]), nh), scale]), qShape]); // [B, T, nh, hd]
    const kRows = g.op1('Reshape', [applyRope(g.op1('Reshape', [kFlat, rowsShape]), kvh), kvShape]); // [B, T, kvh, hd]
    const vRows = g.op1('Reshape', [vFlat, kvShape]);
    const k = g.op1('Transpose', [kRows], { perm: [0, 2, 1, 3] }); // [B, kvh, T, hd]
    const v = g.op1('Transpose', [vRows], { perm: [0, 2, 1, 3] });

    let attnFlat: string;
    if (tally) {
      // Query rows ordered (group, token) per KV head: [B, kvh, g*T, hd].
      const qG = g.op1('Reshape', [g.op1('Transpose', [g.op1('Reshape', [q, groupedShape5])], { perm: [0, 2, 3, 1, 4] }), qRowsShape]);
      const kT = g.op1('Transpose', [kRows], { perm: [0, 2, 3, 1] }); // [B, kvh, hd, T]
      // ONNX Runtime fuses this Transpose into the MatMul (FusedMatMul, transB): the cache is not copied.
      const kPastT = g.op1('Transpose', [`past_key.${l}`], { perm: [0, 1, 3, 2] });
      const scoresPast = g.op1('Add', [g.toFloat32(g.op1('MatMul', [qG, kPastT])), 'past_mask']); // [B, kvh, g*T, past]
      const scoresNew5 = g.op1('Add', [g.op1('Reshape', [g.toFloat32(g.op1('MatMul', [qG, kT])), scoresNewShape5]), 'new_mask']);
      const scoresNew = g.op1('Reshape', [scoresNew5, scoresNewShape4]); // [B, kvh, g*T, T]
      const probs = g.toDtype(g.op1('Softmax', [g.op1('Concat', [scoresPast, scoresNew], { axis: -1 })], { axis: -1 }));
      const pastLen = g.op1('Slice', [g.op1('Shape', [`past_value.${l}`]), g.ints([2]), g.ints([3])]);
      const probsPast = g.op1('Slice', [probs, g.ints([0]), pastLen, g.ints([-1])]);
      const probsNew = g.op1('Slice', [probs, pastLen, g.ints([2 ** 62]), g.ints([-1])]);
      const attn = g.op1('Add', [g.op1('MatMul', [probsPast, `past_value.${l}`]), g.op1('MatMul', [probsNew, v])]); // [B, kvh, g*T, hd]
      const attnRows = g.op1('Transpose', [g.op1('Reshape', [attn, attnShape5])], { perm: [0, 3, 1, 2, 4] }); // [B, T, kvh, g, hd]
      attnFlat = g.op1('Reshape', [attnRows, g.ints([-1, nh * hd])]);
      newKv.push(g.op1('Unsqueeze', [k, g.ints([0])]), g.op1('Unsqueeze', [v, g.ints([0])]));
    } else {
      g.op1('Concat', [`past_key_values.${l}.key`, k], { axis: 2 });
      const kAll = g.nameLast(`present.${l}.key`);
      g.op1('Concat', [`past_key_values.${l}.value`, v], { axis: 2 });
      const vAll = g.nameLast(`present.${l}.value`);
      const qGrouped = g.op1('Reshape', [g.op1('Transpose', [q], { perm: [0, 2, 1, 3] }), shape(batchDim, [kvh, -1, hd])]); // [B, kvh, g*T, hd]
      const scores = g.toFloat32(g.op1('MatMul', [qGrouped, g.op1('Transpose', [kAll], { perm: [0, 1, 3, 2] })])); // [B,kvh,gT,S]
      const scores5 = g.op1('Reshape', [scores, shape(batchDim, [kvh, group], newDim, [-1])]);
      const masked = g.op1('Add', [scores5, g.op1('Unsqueeze', [additiveMask, g.ints([1])])]);
      const probs = g.toDtype(g.op1('Softmax', [g.op1('Reshape', [masked, shape(batchDim, [kvh, -1], g.op1('Slice', [g.op1('Shape', [kAll]), g.ints([2]), g.ints([3])]))])], { axis: -1 }));
      const attn = g.op1('MatMul', [probs, vAll]); // [B, kvh, g*T, hd]
      const attnHeads = g.op1('Transpose', [g.op1('Reshape', [attn, shape(batchDim, [nh], newDim, [hd])])], { perm: [0, 2, 1, 3] });
      attnFlat = g.op1('Reshape', [attnHeads, g.ints([-1, nh * hd])]);
      g.outputs.push({ name: `present.${l}.key`, type: dt, dims: ['batch', kvh, 'total', hd] });
      g.outputs.push({ name: `present.${l}.value`, type: dt, dims: ['batch', kvh, 'total', hd] });
    }
    hidden = g.op1('Add', [hidden, linear(attnFlat, `${p}.self_attn.o_proj`, [`${p}.self_attn.o_proj.weight`], nh * hd, [H])]);

    const normed2 = rmsNorm(hidden, g.weight(`${p}.post_attention_layernorm.weight`, () => lw('post_attention_layernorm.weight'), [H]));
    const gu = linear(normed2, `${p}.mlp.gate_up`, [`${p}.mlp.gate_proj.weight`, `${p}.mlp.up_proj.weight`], H, [ffn, ffn]);
    const [gate, up] = g.op('Split', [gu, g.ints([ffn, ffn])], { axis: -1 }, 2);
    const act = g.op1('Mul', [g.op1('Mul', [gate, g.op1('Sigmoid', [gate])]), up]);
    hidden = g.op1('Add', [hidden, linear(act, `${p}.mlp.down_proj`, [`${p}.mlp.down_proj.weight`], ffn, [H])]);
  }

  const finalNorm = g.weight('model.norm.weight', () => req(weights, 'model.norm.weight'), [H]);
  const headWeight: string | QuantLinear = options.quant && headBits !== 'float'
    ? g.nbitsWeight('lm_head', quantizeLinear([tensorOf(hasLmHead ? 'lm_head.weight' : 'model.embed_tokens.weight')], H, { ...options.quant, bits: headBits! }))
    : hasLmHead ? g.weight('lm_head.weight', () => req(weights, 'lm_head.weight'), [V, H]) : embed;
  if (tally) {
    const picked = g.op1('Gather', [hidden, 'logits_index'], { axis: 0 }); // [B, H]
    g.logitsOutputs(rmsNorm(picked, finalNorm), headWeight, V);
    g.op1('Concat', newKv, { axis: 0 });
    g.nameLast('new_kv');
    g.outputs.push({ name: 'new_kv', type: dt, dims: [2 * L, 'batch', kvh, 'new', hd] });
  } else {
    const normedAll = rmsNorm(hidden, finalNorm);
    const logits2d = g.toFloat32(typeof headWeight === 'string' ? g.op1('Gemm', [normedAll, headWeight], { transB: 1 }) : g.matMulNBits(normedAll, headWeight));
    g.op1('Reshape', [logits2d, g.op1('Concat', [batchDim, newDim, g.ints([V])], { axis: 0 })]);
    g.nameLast('logits');
    g.outputs.unshift({ name: 'logits', type: DataType.FLOAT, dims: ['batch', 'new', V] });
  }

  return {
    graphName: `${config.model_type}-${options.interface}`,
    nodes: g.nodes,
    inputs: g.inputs,
    outputs: g.outputs,
    initializers: g.initializers,
    opsets: [{ domain: '', version: 17 }, { domain: 'com.microsoft', version: 1 }],
    metadata: tally
      ? { 'tally.graph': options.interface, 'tally.graph_version': TALLY_GRAPH_VERSION, 'tally.dtype': options.dtype ?? 'float32', ...(options.quant && { 'tally.quant': `int${options.quant.bits}` }) }
      : {},
  };
}
