import type { NBitsWeight } from './quant.ts';

/** The subset of a Hugging Face `config.json` that a Llama-family decoder needs. */
export interface LlamaConfig {
  model_type: string;
  architectures?: string[];
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim?: number;
  vocab_size: number;
  max_position_embeddings: number;
  rms_norm_eps: number;
  rope_theta: number;
  tie_word_embeddings: boolean;
  attention_bias?: boolean;
  bos_token_id?: number;
  eos_token_id?: number | number[];
  torch_dtype?: string;
  [key: string]: unknown;
}

export function headDim(config: LlamaConfig): number {
  return config.head_dim ?? config.hidden_size / config.num_attention_heads;
}

/** Qwen2 puts biases on q/k/v without saying so in config.json. */
export function hasQkvBias(config: LlamaConfig): boolean {
  return config.attention_bias ?? config.model_type === 'qwen2';
}

/** SentencePiece piece types, as in sentencepiece_model.proto and GGUF's tokenizer.ggml.token_type. */
export enum PieceType {
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
}

/** A SentencePiece-style vocabulary (llama2.c tokenizer.bin, tokenizer.model, or GGUF metadata). */
export interface SpVocab {
  pieces: { piece: string; score: number; type: PieceType }[];
  bosId: number;
  eosId: number;
  unkId: number;
  addDummyPrefix: boolean;
}

/**
 * Weights in Hugging Face naming and layout (Linear weights are [out, in]; q/k rows in the
 * rotate-half RoPE order that HF Llama uses), all fp32.
 *   model.embed_tokens.weight [vocab, hidden]
 *   model.layers.{i}.input_layernorm.weight, post_attention_layernorm.weight [hidden]
 *   model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (+ {q,k,v}_proj.bias for Qwen2)
 *   model.layers.{i}.mlp.{gate,up,down}_proj.weight
 *   model.norm.weight, lm_head.weight (absent when tied)
 */
export interface Tensor32 {
  shape: number[];
  data: Float32Array;
  /** A GGUF tensor's own type, and for Q4_0 / Q8_0 its blocks as MatMulNBits takes them (kept, not re-quantised). */
  ggml?: { type: number; nbits?: NBitsWeight };
}
export type WeightMap = Map<string, Tensor32>;

/** Where a graph builder gets weights: a WeightMap, or a checkpoint that reads each one when asked. */
export interface WeightSource {
  get(name: string): Tensor32 | undefined;
  has(name: string): boolean;
}

/** A checkpoint's tokenizer as Hugging Face files, where it is not a SentencePiece vocabulary. */
export interface TokenizerFiles {
  tokenizerJson: object;
  tokenizerConfig: Record<string, unknown>;
  bosId: number | undefined;
  /** End-of-generation ids for generation_config.json. */
  eosIds: number[];
}

/** What every checkpoint reader returns. */
export interface Checkpoint {
  config: LlamaConfig;
  weights: WeightMap;
  /** For a checkpoint with `tokenizer`, its ids only (bos, eos, unk) matter. */
  vocab: SpVocab;
  tokenizer?: TokenizerFiles;
}
