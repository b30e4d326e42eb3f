import { type LlamaConfig, headDim } from '../model/types.ts';

/**
 * How a forward pass's device time is shared among the sequences in it: in proportion to the FLOPs
 * each did, by this model —
 *   linear layers: 2 × (per-layer weights) × layers per token,
 *   attention:     4 × layers × heads × headDim per (query token, attended position),
 *   output head:   2 × hidden × vocab per row whose logits are computed (one per row).
 */
export interface ModelShape {
  layers: number;
  hidden: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  ffn: number;
  vocab: number;
}

export function modelShape(config: LlamaConfig): ModelShape {
  return {
    layers: config.num_hidden_layers,
    hidden: config.hidden_size,
    heads: config.num_attention_heads,
    kvHeads: config.num_key_value_heads,
    headDim: headDim(config),
    ffn: config.intermediate_size,
    vocab: config.vocab_size,
  };
}

export function linearFlopsPerToken(s: ModelShape): number {
  const attnWeights = s.hidden * (s.heads + 2 * s.kvHeads) * s.headDim + s.heads * s.headDim * s.hidden;
  const mlpWeights = 3 * s.hidden * s.ffn;
  return 2 * s.layers * (attnWeights + mlpWeights);
}

/** FLOPs of `tokens` new tokens appended after `past` cached positions, with one logits row. */
export function chunkFlops(s: ModelShape, past: number, tokens: number): number {
  const attended = tokens * past + (tokens * (tokens + 1)) / 2;
  return tokens * linearFlopsPerToken(s) + 4 * s.layers * s.heads * s.headDim * attended + 2 * s.hidden * s.vocab;
}

/** Splits `seconds` in proportion to `weights`; the parts sum to `seconds` exactly. */
export function splitSeconds(seconds: number, weights: number[]): number[] {
  const total = weights.reduce((a, b) => a + b, 0);
  if (weights.length === 0) return [];
  if (total <= 0) return weights.map((_, i) => (i === 0 ? seconds : 0));
  const parts = weights.map((w) => (seconds * w) / total);
  const rest = parts.slice(0, -1).reduce((a, b) => a + b, 0);
  parts[parts.length - 1] = seconds - rest;
  return parts;
}
