import ort from 'onnxruntime-node';
import type { LlamaConfig } from '../../model/types.ts';
import { headDim } from '../../model/types.ts';
import { type KvArray, type KvType, kvArray, kvTypeOf, logitsAsFloat32 } from './graph-io.ts';
import type { ForwardResult, ForwardRow, ModelRunner } from './runner.ts';

interface PlainState {
  length: number;
  past: ort.Tensor[];
}

/**
 * Runner for onnx-community / Optimum exports: past_key_values.N.key/value in, present.N.* out.
 * The cache makes the round trip through JavaScript every step, so rows run one at a time.
 */
export class PlainRunner implements ModelRunner {
  readonly kind = 'plain' as const;
  readonly vocabSize: number;
  private readonly states = new Map<number, PlainState>();
  private readonly pastNames: string[];
  private readonly presentNames: string[];
  private readonly kvType: KvType;
  readonly kvElementBytes: number;
  readonly topLogits = 0;
  private readonly hasPositionIds: boolean;
  private readonly kvh: number;
  private readonly hd: number;

  constructor(private readonly session: ort.InferenceSession, config: LlamaConfig) {
    this.vocabSize = config.vocab_size;
    const layers = session.inputNames.filter((n) => /^past_key_values\.\d+\.key$/.test(n)).length;
    this.pastNames = [];
    this.presentNames = [];
    for (let l = 0; l < layers; l++) {
      this.pastNames.push(`past_key_values.${l}.key`, `past_key_values.${l}.value`);
      this.presentNames.push(`present.${l}.key`, `present.${l}.value`);
    }
    const meta = session.inputMetadata.find((m) => m.name === 'past_key_values.0.key');
    this.kvType = kvTypeOf(session, 'past_key_values.0.key');
    this.kvElementBytes = this.kvType === 'float16' ? 2 : 4;
    const dims = meta && meta.isTensor ? meta.shape : [];
    this.kvh = typeof dims[1] === 'number' ? dims[1] : config.num_key_value_heads;
    this.hd = typeof dims[3] === 'number' ? dims[3] : headDim(config);
    this.hasPositionIds = session.inputNames.includes('position_ids');
  }

  open(seq: number): void {
    const empty = () => new ort.Tensor(this.kvType, kvArray(this.kvType, 0), [1, this.kvh, 0, this.hd]);
    this.states.set(seq, { length: 0, past: this.pastNames.map(empty) });
  }

  close(seq: number): void {
    this.states.delete(seq);
  }

  cachedLength(seq: number): number {
    const s = this.states.get(seq);
    if (!s) throw new Error(`sequence ${seq} is not open`);
    return s.length;
  }

  kvBytes(): number {
    let total = 0;
    for (const s of this.states.values()) for (const t of s.past) total += (t.data as KvArray).byteLength;
    return total;
  }

  async forward(rows: ForwardRow[]): Promise<ForwardResult> {
    const logits: Float32Array[] = [];
    let runSeconds = 0;
    for (const r of rows) {
      const state = this.states.get(r.seq);
      if (!state) throw new Error(`sequence ${r.seq} is not open`);
      const n = r.tokens.length;
      const feeds: Record<string, ort.Tensor> = {
        input_ids: new ort.Tensor('int64', BigInt64Array.from(r.tokens.map(BigInt)), [1, n]),
        attention_mask: new ort.Tensor('int64', new BigInt64Array(state.length + n).fill(1n), [1, state.length + n]),
      };
      if (this.hasPositionIds) {
        feeds.position_ids = new ort.Tensor('int64', BigInt64Array.from({ length: n }, (_, i) => BigInt(state.length + i)), [1, n]);
      }
      this.pastNames.forEach((name, i) => (feeds[name] = state.past[i]));
      const started = performance.now();
      const out = await this.session.run(feeds);
      runSeconds += (performance.now() - started) / 1000;
      state.past = this.presentNames.map((name) => out[name]);
      state.length += n;
      const all = logitsAsFloat32(out.logits);
      const V = all.length / n;
      logits.push(all.subarray((n - 1) * V, n * V));
    }
    return { logits, runSeconds };
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
