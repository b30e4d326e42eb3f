import type { ModelFolder } from '../model/folder.ts';
import { type LlamaConfig, headDim } from '../model/types.ts';
import type { AttentionMode, DeviceSpec } from './session.ts';
import type { KvCacheDtype } from './paged-runner.ts';
import type { SchedulerLimits } from './scheduler.ts';

export interface EngineOptions {
  modelDir: string;
  device: DeviceSpec;
  threads?: number;
  spinWait?: boolean;
  /** Where attention runs on the CPU: native (default when the addon is built) or onnx (inside the graph). */
  attention?: AttentionMode;
  /** Element type of the KV cache with native attention (default: the model's). */
  kvCacheDtype?: KvCacheDtype;
  maxNumSeqs: number;
  maxNumBatchedTokens: number;
  maxModelLen?: number;
  /** KV capacity in tokens; default: what fits in kvCacheBytes. */
  kvCacheTokens?: number;
  kvCacheBytes: number;
}

export const DEFAULT_ENGINE_OPTIONS = {
  maxNumSeqs: 64,
  maxNumBatchedTokens: 2048,
  kvCacheBytes: 4 * 2 ** 30,
};

/** elementBytes: 4 for a float32 cache, 2 for float16. */
export function kvBytesPerToken(config: LlamaConfig, elementBytes = 4): number {
  return config.num_hidden_layers * 2 * config.num_key_value_heads * headDim(config) * elementBytes;
}

export function resolveLimits(folder: ModelFolder, options: EngineOptions, kvElementBytes = 4): SchedulerLimits {
  const modelMax = folder.config.max_position_embeddings;
  const maxModelLen = options.maxModelLen ?? modelMax;
  if (maxModelLen > modelMax) throw new Error(`--max-model-len ${maxModelLen} exceeds the model's max_position_embeddings (${modelMax})`);
  if (options.maxNumBatchedTokens < options.maxNumSeqs) {
    throw new Error(`--max-num-batched-tokens (${options.maxNumBatchedTokens}) must be at least --max-num-seqs (${options.maxNumSeqs})`);
  }
  const kvCapacityTokens = options.kvCacheTokens ?? Math.floor(options.kvCacheBytes / kvBytesPerToken(folder.config, kvElementBytes));
  if (kvCapacityTokens < 2) throw new Error('the KV cache holds fewer than 2 tokens: raise --kv-cache-tokens or --kv-cache-gb');
  return { maxNumSeqs: options.maxNumSeqs, maxNumBatchedTokens: options.maxNumBatchedTokens, maxModelLen, kvCapacityTokens };
}
