/** What precision a conversion writes: the --quant choice, a quantised GGUF's own, and config.json's record of it. */
import { GgmlType } from './ggml-quants.ts';
import { targetBits, type QuantOptions } from './llama-graph.ts';
import { QUANT_ACCURACY_LEVEL, QUANT_BLOCK_SIZES } from './quant.ts';
import type { LlamaConfig, WeightMap } from './types.ts';

export type QuantChoice = 'int8' | 'int4' | 'none';

/**
 * ONNX Runtime's int8-compute CPU kernels (accuracy_level 4) ran a SmolLM2-sized MatMulNBits faster at 64 than
 * at 32 or 16, int8 and int4 alike; narrow rows get smaller blocks (rowBlockSize).
 */
export const DEFAULT_QUANT_BLOCK = 64;

export function quantOptions(choice: QuantChoice | undefined, blockSize = DEFAULT_QUANT_BLOCK, weights?: WeightMap): QuantOptions | undefined {
  if (choice === 'none') return undefined;
  if (!QUANT_BLOCK_SIZES.includes(blockSize)) throw new Error(`--block-size must be one of ${QUANT_BLOCK_SIZES.join(', ')} (got ${blockSize})`);
  if (choice) return { bits: choice === 'int8' ? 8 : 4, blockSize, keep: false };
  // A quantised GGUF: each weight keeps its precision; weights stored as floats there (F16 fallbacks) take
  // the bits that most of its linear weights have.
  const linear = [...(weights?.entries() ?? [])].filter(([name, t]) => t.shape.length === 2 && name !== 'model.embed_tokens.weight');
  const quantised = linear.filter(([, t]) => t.ggml && t.ggml.type !== GgmlType.F16 && t.ggml.type !== GgmlType.BF16);
  if (quantised.length === 0) return undefined;
  let four = 0, all = 0;
  for (const [, t] of quantised) {
    const elements = t.shape.reduce((a, b) => a * b, 1);
    all += elements;
    if (targetBits(t, { bits: 8, blockSize, keep: true }) === 4) four += elements;
  }
  return { bits: four * 2 > all ? 4 : 8, blockSize, keep: true };
}

/** config.json's `tally.precision` (fp32, fp16, int8, int4): what /v1/models and /v1/cost report. */
export function withPrecision(config: LlamaConfig, quant: QuantOptions | undefined): LlamaConfig {
  const precision = quant ? `int${quant.bits}` : config.torch_dtype === 'float16' ? 'fp16' : 'fp32';
  const tally = { precision, ...(quant && { quantization: { method: 'MatMulNBits', bits: quant.bits, block_size: quant.blockSize, accuracy_level: QUANT_ACCURACY_LEVEL } }) };
  return { ...config, tally };
}
