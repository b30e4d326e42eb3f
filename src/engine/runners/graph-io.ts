import ort from 'onnxruntime-node';
import { float16ToFloat32 } from '../../model/half.ts';
import { TOP_LOGITS } from '../../model/llama-graph.ts';
import type { TopLogits } from './runner.ts';

export type KvType = 'float32' | 'float16';
export type KvArray = Float32Array | Uint16Array;

export function kvTypeOf(session: ort.InferenceSession, input: string): KvType {
  const meta = session.inputMetadata.find((m) => m.name === input);
  return meta && meta.isTensor && meta.type === 'float16' ? 'float16' : 'float32';
}

export function kvArray(type: KvType, length: number): KvArray {
  return type === 'float16' ? new Uint16Array(length) : new Float32Array(length);
}

/**
 * The most top logits per row a Tally graph (whole, or its last part) gives: with a `top_k` input (graph version
 * 8 on), TOP_LOGITS or the vocabulary; before, its outputs' fixed width. 0: no top outputs.
 */
export function graphTopLogits(session: ort.InferenceSession, vocabSize: number): { most: number; input: boolean } {
  if (session.inputNames.includes('top_k')) return { most: Math.min(TOP_LOGITS, vocabSize), input: true };
  const top = session.outputMetadata.find((m) => m.name === 'top_ids');
  return { most: top && top.isTensor && typeof top.shape[1] === 'number' ? top.shape[1] : 0, input: false };
}

/** Row `row`'s largest logits from a graph's top_ids / top_logits outputs ([rows, k]). */
export function topLogitsOf(out: ort.InferenceSession.OnnxValueMapType, row: number): TopLogits {
  const ids = out.top_ids.data as BigInt64Array;
  const values = out.top_logits.data as Float32Array;
  const k = out.top_ids.dims[1];
  const top: TopLogits = { ids: new Array<number>(k), values: new Array<number>(k) };
  for (let i = 0, at = row * k; i < k; i++, at++) {
    top.ids[i] = Number(ids[at]);
    top.values[i] = values[at];
  }
  return top;
}

/** A graph's `top_k` feed: k, within 1 … most. */
export function topKTensor(k: number, most: number): ort.Tensor {
  if (!Number.isInteger(k) || k < 1 || k > most) throw new RangeError(`top logits: k must be an integer in 1 … ${most}, got ${k}`);
  return new ort.Tensor('int64', BigInt64Array.of(BigInt(k)), [1]);
}

export function logitsAsFloat32(t: ort.Tensor): Float32Array {
  if (t.type === 'float32') return t.data as Float32Array;
  if (t.type === 'float16') return float16ToFloat32(t.data as Uint16Array);
  throw new Error(`unsupported logits type ${t.type}`);
}

export function isTallyGraph(session: ort.InferenceSession): boolean {
  return session.inputNames.includes('past_key.0') && session.outputNames.includes('new_kv');
}

export function isPlainGraph(session: ort.InferenceSession): boolean {
  return session.inputNames.includes('input_ids') && session.outputNames.includes('logits') && session.inputNames.some((n) => n.startsWith('past_key_values.'));
}
