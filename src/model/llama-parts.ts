import { DataType, type ModelSpec, type TensorSpec } from './onnx-proto.ts';
import { GraphBuilder, TALLY_GRAPH_VERSION, headNorm, quantLinearOf, ropeTables } from './llama-graph.ts';
import { type LlamaConfig, headDim } from './types.ts';

/**
 * A Tally graph cut at its attention, for runners that attend outside ONNX Runtime (native/attention).
 * Part 0 embeds the tokens and projects layer 0's q, k and v; part l (1 … L-1) finishes layer l-1 from its
 * attention output and projects layer l's; part L finishes the last layer and returns the logits as the
 * whole graph does. The parts take the whole graph's initializers as they are: weights in its external
 * data file stay there, shared.
 *
 * Inputs: input_ids [batch, new] (part 0); hidden_in [N, H] and attn [N, heads × head_dim] (N = batch × new,
 * parts 1 … L); logits_index [batch] (part L).
 * Outputs: hidden [N, H] and qkv [N, (heads + 2 × kv_heads) × head_dim], the projections as they are (the
 * attention applies RoPE and the 1/√head_dim scale); part L: logits, top_logits, top_ids.
 */
/** The pieces every Llama graph is made of, drawn into one GraphBuilder: a cut graph's part or a whole graph. */
function llamaPieces(g: GraphBuilder, config: LlamaConfig, tensors: Map<string, TensorSpec>) {
  const get = (name: string): TensorSpec => {
    const t = tensors.get(name);
    if (!t) throw new Error(`the graph has no initializer ${name}`);
    return t;
  };
  const H = config.hidden_size;
  const nh = config.num_attention_heads;
  const kvh = config.num_key_value_heads;
  const hd = headDim(config);
  const ffn = config.intermediate_size;
  const linear = (x: string, base: string, k: number): string => {
    const q = quantLinearOf(tensors, base, k);
    return q ? g.matMulNBits(x, q) : g.op1('MatMul', [x, g.tensor(get(`${base}.weight_t`))]);
  };
  const rmsNorm = (x: string, weight: string): string =>
    g.op1('SimplifiedLayerNormalization', [x, g.tensor(get(weight))], { axis: -1, epsilon: { float: config.rms_norm_eps }, stash_type: 1 });
  const hasHeadNorms = (l: number) => tensors.has(`model.layers.${l}.self_attn.q_norm.weight`);
  // The fused projection (and bias) of layer l.
  const project = (hidden: string, l: number): string => {
    const p = `model.layers.${l}`;
    const qkv = linear(rmsNorm(hidden, `${p}.input_layernorm.weight`), `${p}.self_attn.qkv`, H);
    const bias = tensors.get(`${p}.self_attn.qkv.bias`);
    return bias ? g.op1('Add', [qkv, g.tensor(bias)]) : qkv;
  };
  // Qwen3 normalises q and k per head: the parts are made apart, and joined only where one value is wanted.
  const qkvParts = (hidden: string, l: number): string[] => {
    const [q, k, v] = g.op('Split', [project(hidden, l), g.ints([nh * hd, kvh * hd, kvh * hd])], { axis: -1 }, 3);
    if (!hasHeadNorms(l)) return [q, k, v];
    const p = `model.layers.${l}.self_attn`;
    return [headNorm(g, q, g.tensor(get(`${p}.q_norm.weight`)), nh * hd, hd, config.rms_norm_eps), headNorm(g, k, g.tensor(get(`${p}.k_norm.weight`)), kvh * hd, hd, config.rms_norm_eps), v];
  };
  return {
    /** input_ids [batch, new] → their embeddings [batch × new, H]. */
    embed(): string {
      g.inputs.push({ name: 'input_ids', type: DataType.INT64, dims: ['batch', 'new'] });
      const quantEmbed = quantLinearOf(tensors, 'model.embed_tokens', H);
      const rows = quantEmbed ? g.gatherNBits('input_ids', quantEmbed) : g.op1('Gather', [g.tensor(get('model.embed_tokens.weight')), 'input_ids']);
      return g.op1('Reshape', [rows, g.ints([-1, H])]);
    },
    /** Layer l's q, k and v of each token [rows, (heads + 2 × kv_heads) × head_dim], as projected (no RoPE). */
    qkv(hidden: string, l: number): string {
      return hasHeadNorms(l) ? g.op1('Concat', qkvParts(hidden, l), { axis: -1 }) : project(hidden, l);
    },
    /** The same as three values, q [rows, heads × head_dim], k and v [rows, kv_heads × head_dim]. */
    qkvParts(hidden: string, l: number): string[] {
      return qkvParts(hidden, l);
    },
    /** Layer l from its attention output [rows, heads × head_dim]: the output projection, residuals and MLP. */
    finish(hiddenIn: string, attn: string, l: number): string {
      const p = `model.layers.${l}`;
      const hidden = g.op1('Add', [hiddenIn, linear(attn, `${p}.self_attn.o_proj`, nh * hd)]);
      const gu = linear(rmsNorm(hidden, `${p}.post_attention_layernorm.weight`), `${p}.mlp.gate_up`, H);
      const [gate, up] = g.op('Split', [gu, g.ints([ffn, ffn])], { axis: -1 }, 2);
      const act = g.op1('Mul', [g.op1('Mul', [gate, g.op1('Sigmoid', [gate])]), up]);
      return g.op1('Add', [hidden, linear(act, `${p}.mlp.down_proj`, ffn)]);
    },
    /** The logits of the rows logits_index [batch] picks (each row's last token), and their top_k. */
    logits(hidden: string): void {
      g.inputs.push({ name: 'logits_index', type: DataType.INT64, dims: ['batch'] });
      const picked = g.op1('Gather', [hidden, 'logits_index'], { axis: 0 });
      const quantHead = quantLinearOf(tensors, 'lm_head', H);
      const head = quantHead ?? g.tensor(tensors.get('lm_head.weight') ?? get('model.embed_tokens.weight'));
      g.logitsOutputs(rmsNorm(picked, 'model.norm.weight'), head, config.vocab_size);
    },
  };
}

function graphDtype(tensors: Map<string, TensorSpec>): DataType.FLOAT | DataType.FLOAT16 {
  const dt = tensors.get('model.norm.weight')?.type;
  if (dt !== DataType.FLOAT && dt !== DataType.FLOAT16) throw new Error(`unsupported weight type ${dt}`);
  return dt;
}

export function buildLlamaParts(config: LlamaConfig, tensors: Map<string, TensorSpec>): ModelSpec[] {
  const dt = graphDtype(tensors);
  const H = config.hidden_size;
  const L = config.num_hidden_layers;
  const nh = config.num_attention_heads;
  const kvh = config.num_key_value_heads;
  const hd = headDim(config);
  const parts: ModelSpec[] = [];

  for (let part = 0; part <= L; part++) {
    const g = new GraphBuilder(dt);
    const pieces = llamaPieces(g, config, tensors);
    let hidden: string;
    if (part === 0) {
      pieces.embed();
      hidden = g.nameLast('hidden');
    } else {
      g.inputs.push({ name: 'hidden_in', type: dt, dims: ['rows', H] });
      g.inputs.push({ name: 'attn', type: dt, dims: ['rows', nh * hd] });
      hidden = pieces.finish('hidden_in', 'attn', part - 1);
      if (part < L) hidden = g.nameLast('hidden');
    }
    if (part < L) {
      pieces.qkv(hidden, part);
      g.nameLast('qkv');
      g.outputs.push({ name: 'hidden', type: dt, dims: ['rows', H] });
      g.outputs.push({ name: 'qkv', type: dt, dims: ['rows', (nh + 2 * kvh) * hd] });
    } else {
      pieces.logits(hidden);
    }
    parts.push({
      graphName: `${config.model_type}-tally-part${part}`,
      nodes: g.nodes,
      inputs: g.inputs,
      outputs: g.outputs,
      initializers: g.initializers,
      opsets: [{ domain: '', version: 17 }, { domain: 'com.microsoft', version: 1 }],
      metadata: { 'tally.graph': 'tally-part', 'tally.graph_version': TALLY_GRAPH_VERSION, 'tally.part': String(part) },
    });
  }
  return parts;
}

/**
 * The whole model as one graph whose attention is ONNX Runtime's com.microsoft GroupQueryAttention over a KV cache
 * held outside the graph: per layer, past_key.l / past_value.l [slots, kv_heads, max_positions, head_dim] (BNSH),
 * bound to the same memory as present_key.l / present_value.l (the shared-buffer mode: each pass writes only its
 * new positions, in place). The cache can so live in device memory on CUDA, where nothing but token ids and
 * logits cross PCIe. RoPE (the model's tables, llama3 scaling included) and the 1/√head_dim scale are the
 * operator's.
 *
 * Inputs: input_ids [batch, new]; seqlens_k [batch] int32 (each row's length after the pass, less one);
 * total_sequence_length [] int32 (the longest of them); the caches; logits_index [batch] (each row's last new
 * token among batch × new), top_k. Outputs: logits, top_logits, top_ids; the caches.
 * ONNX Runtime 1.30's CPU kernel takes a batch of single new tokens, a batch of first prompts, or one row
 * continuing its prompt; head_dim must be a multiple of 16.
 */
export function buildLlamaGqaGraph(config: LlamaConfig, tensors: Map<string, TensorSpec>, maxPositions: number): ModelSpec {
  const dt = graphDtype(tensors);
  const L = config.num_hidden_layers;
  const nh = config.num_attention_heads;
  const kvh = config.num_key_value_heads;
  const hd = headDim(config);
  const g = new GraphBuilder(dt);
  const pieces = llamaPieces(g, config, tensors);
  const rope = ropeTables(config);
  const half = hd / 2;
  const positions = Math.min(maxPositions, rope.cos.length / half);
  const cos = g.weight('rope_cos', rope.cos.subarray(0, positions * half), [positions, half]);
  const sin = g.weight('rope_sin', rope.sin.subarray(0, positions * half), [positions, half]);
  let hidden = pieces.embed();
  g.inputs.push({ name: 'seqlens_k', type: DataType.INT32, dims: ['batch'] });
  g.inputs.push({ name: 'total_sequence_length', type: DataType.INT32, dims: [] });
  // [batch, new, width] from the [batch × new, width] rows: the operator's layout.
  const idsShape = g.op1('Shape', ['input_ids']);
  const batched = (x: string, width: number) => g.op1('Reshape', [x, g.op1('Concat', [idsShape, g.ints([width])], { axis: 0 })]);
  for (let l = 0; l < L; l++) {
    const [q, k, v] = pieces.qkvParts(hidden, l);
    const cache = (kind: string) => {
      g.inputs.push({ name: `past_${kind}.${l}`, type: dt, dims: ['slots', kvh, 'max_positions', hd] });
      g.outputs.push({ name: `present_${kind}.${l}`, type: dt, dims: ['slots', kvh, 'max_positions', hd] });
      return `past_${kind}.${l}`;
    };
    const pastKey = cache('key');
    const pastValue = cache('value');
    g.nodes.push({
      opType: 'GroupQueryAttention',
      domain: 'com.microsoft',
      name: `GroupQueryAttention_${l}`,
      inputs: [batched(q, nh * hd), batched(k, kvh * hd), batched(v, kvh * hd), pastKey, pastValue, 'seqlens_k', 'total_sequence_length', cos, sin],
      outputs: [`attn_${l}`, `present_key.${l}`, `present_value.${l}`],
      attributes: { num_heads: nh, kv_num_heads: kvh, do_rotary: 1, rotary_interleaved: 0 },
    });
    hidden = pieces.finish(hidden, g.op1('Reshape', [`attn_${l}`, g.ints([-1, nh * hd])]), l);
  }
  pieces.logits(hidden);
  return {
    graphName: `${config.model_type}-tally-gqa`,
    nodes: g.nodes,
    inputs: g.inputs,
    outputs: g.outputs,
    initializers: g.initializers,
    opsets: [{ domain: '', version: 17 }, { domain: 'com.microsoft', version: 1 }],
    metadata: { 'tally.graph': 'tally-gqa', 'tally.graph_version': TALLY_GRAPH_VERSION },
  };
}
