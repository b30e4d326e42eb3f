import { DataType, type ModelSpec, type TensorSpec } from './onnx-proto.ts';
import { GraphBuilder, TALLY_GRAPH_VERSION, headNorm, quantLinearOf } from './llama-graph.ts';
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
export function buildLlamaParts(config: LlamaConfig, tensors: Map<string, TensorSpec>): ModelSpec[] {
  const get = (name: string): TensorSpec => {
    const t = tensors.get(name);
    if (!t) throw new Error(`the graph has no initializer ${name}`);
    return t;
  };
  const dt = get('model.norm.weight').type;
  if (dt !== DataType.FLOAT && dt !== DataType.FLOAT16) throw new Error(`unsupported weight type ${dt}`);
  const H = config.hidden_size;
  const L = config.num_hidden_layers;
  const nh = config.num_attention_heads;
  const kvh = config.num_key_value_heads;
  const hd = headDim(config);
  const V = config.vocab_size;
  const ffn = config.intermediate_size;
  const parts: ModelSpec[] = [];

  for (let part = 0; part <= L; part++) {
    const g = new GraphBuilder(dt);
    const linear = (x: string, base: string, k: number): string => {
      const q = quantLinearOf(tensors, base, k);
      return q ? g.matMulNBits(x, q) : g.op1('MatMul', [x, g.tensor(get(`${base}.weight_t`))]);
    };
    const rmsNorm = (x: string, weight: string): string =>
      g.op1('SimplifiedLayerNormalization', [x, g.tensor(get(weight))], { axis: -1, epsilon: { float: config.rms_norm_eps }, stash_type: 1 });
    let hidden: string;
    if (part === 0) {
      g.inputs.push({ name: 'input_ids', type: DataType.INT64, dims: ['batch', 'new'] });
      const quantEmbed = quantLinearOf(tensors, 'model.embed_tokens', H);
      const rows = quantEmbed ? g.gatherNBits('input_ids', quantEmbed) : g.op1('Gather', [g.tensor(get('model.embed_tokens.weight')), 'input_ids']);
      g.op1('Reshape', [rows, g.ints([-1, H])]);
      hidden = g.nameLast('hidden');
    } else {
      g.inputs.push({ name: 'hidden_in', type: dt, dims: ['rows', H] });
      g.inputs.push({ name: 'attn', type: dt, dims: ['rows', nh * hd] });
      const p = `model.layers.${part - 1}`;
      hidden = g.op1('Add', ['hidden_in', linear('attn', `${p}.self_attn.o_proj`, nh * hd)]);
      const gu = linear(rmsNorm(hidden, `${p}.post_attention_layernorm.weight`), `${p}.mlp.gate_up`, H);
      const [gate, up] = g.op('Split', [gu, g.ints([ffn, ffn])], { axis: -1 }, 2);
      const act = g.op1('Mul', [g.op1('Mul', [gate, g.op1('Sigmoid', [gate])]), up]);
      hidden = g.op1('Add', [hidden, linear(act, `${p}.mlp.down_proj`, ffn)]);
      if (part < L) hidden = g.nameLast('hidden');
    }
    if (part < L) {
      const p = `model.layers.${part}`;
      const qkv = linear(rmsNorm(hidden, `${p}.input_layernorm.weight`), `${p}.self_attn.qkv`, H);
      const bias = tensors.get(`${p}.self_attn.qkv.bias`);
      if (bias) g.op1('Add', [qkv, g.tensor(bias)]);
      const qNorm = tensors.get(`${p}.self_attn.q_norm.weight`);
      if (qNorm) {
        const [q, k, v] = g.op('Split', [g.nodes[g.nodes.length - 1].outputs[0], g.ints([nh * hd, kvh * hd, kvh * hd])], { axis: -1 }, 3);
        const kNorm = get(`${p}.self_attn.k_norm.weight`);
        g.op1('Concat', [headNorm(g, q, g.tensor(qNorm), nh * hd, hd, config.rms_norm_eps), headNorm(g, k, g.tensor(kNorm), kvh * hd, hd, config.rms_norm_eps), v], { axis: -1 });
      }
      g.nameLast('qkv');
      g.outputs.push({ name: 'hidden', type: dt, dims: ['rows', H] });
      g.outputs.push({ name: 'qkv', type: dt, dims: ['rows', (nh + 2 * kvh) * hd] });
    } else {
      g.inputs.push({ name: 'logits_index', type: DataType.INT64, dims: ['batch'] });
      const picked = g.op1('Gather', [hidden, 'logits_index'], { axis: 0 });
      const quantHead = quantLinearOf(tensors, 'lm_head', H);
      const head = quantHead ?? g.tensor(tensors.get('lm_head.weight') ?? get('model.embed_tokens.weight'));
      g.logitsOutputs(rmsNorm(picked, 'model.norm.weight'), head, V);
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
