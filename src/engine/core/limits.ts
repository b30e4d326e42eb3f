import type { ModelFolder } from '../../model/folder.ts';
import { type LlamaConfig, headDim } from '../../model/types.ts';
import { EngineOptionError, type EngineOptions, type SchedulerLimits } from '../protocol.ts';

/** elementBytes: 4 for a float32 cache, 2 for float16. */
export function kvBytesPerToken(config: LlamaConfig, elementBytes = 4): number {
  return config.num_hidden_layers * 2 * config.num_key_value_heads * headDim(config) * elementBytes;
}

/** KV capacity in tokens: `kvCacheTokens` when given, else what fits in `kvCacheBytes`. */
export function kvCapacityTokens(config: LlamaConfig, size: { kvCacheTokens?: number; kvCacheBytes: number }, elementBytes: number): number {
  return size.kvCacheTokens ?? Math.floor(size.kvCacheBytes / kvBytesPerToken(config, elementBytes));
}

/** The scheduler's limits for this model, or an error that says which limit is out of range. */
export function resolveLimits(folder: ModelFolder, options: EngineOptions, kvElementBytes = 4): SchedulerLimits {
  const modelMax = folder.config.max_position_embeddings;
  const maxModelLen = options.maxModelLen ?? modelMax;
  if (maxModelLen > modelMax) throw new EngineOptionError('maxModelLen', `${maxModelLen} exceeds the model's max_position_embeddings (${modelMax})`);
  if (options.maxNumBatchedTokens < options.maxNumSeqs) {
    throw new EngineOptionError('maxNumBatchedTokens', `${options.maxNumBatchedTokens} must be at least the sequences decoded together (${options.maxNumSeqs})`);
  }
  const capacity = kvCapacityTokens(folder.config, options, kvElementBytes);
  if (capacity < 2) throw new EngineOptionError(options.kvCacheTokens === undefined ? 'kvCacheBytes' : 'kvCacheTokens', 'leaves room for fewer than 2 tokens in the KV cache');
  return { maxNumSeqs: options.maxNumSeqs, maxNumBatchedTokens: options.maxNumBatchedTokens, maxModelLen, kvCapacityTokens: capacity };
}
