import type { LlamaConfig } from '../../model/types.ts';
import { headDim } from '../../model/types.ts';
import { ropeTables } from '../../model/llama-graph.ts';
import type { KvCacheDtype } from '../protocol.ts';
import type { NativeSession, NativeStepper, OrtBinding } from './native-ort.ts';
import { PageTable } from './page-table.ts';
import type { ForwardResult, ForwardRow, ModelRunner, PrefixCache, TopLogits } from './runner.ts';

/**
 * A pass no larger than the last one, which took less than this, runs on the engine's thread: handing it to a pool
 * thread and back costs two thread wake-ups, as much as such a pass itself on a busy machine.
 */
export const NATIVE_SYNC_BELOW_SECONDS = 0.001;

/**
 * Runner for Tally graphs on the CPU that runs each forward pass whole in native code (native/ort): the graph cut
 * at each layer's attention (buildLlamaParts) runs as ONNX Runtime sessions driven through its C API, with inputs
 * and outputs bound to buffers allocated once, and native/attention's kernels between the parts over a paged KV
 * cache held in native memory. Per step JavaScript hands over token ids and the rows' page lists (kept here in a
 * PageTable, as PagedRunner keeps them) and gets back the top logits, or the full rows when a row samples. The
 * pass runs on a libuv pool thread, off the engine worker's event loop, except passes of under a millisecond
 * (NATIVE_SYNC_BELOW_SECONDS), which run on the engine's own thread.
 */
export class NativeRunner implements ModelRunner {
  readonly kind = 'native' as const;
  readonly packedRows = true;
  readonly vocabSize: number;
  readonly topLogits: number;
  readonly kvElementBytes: number;
  private readonly layers: number;
  private readonly pagePositions: number;
  private readonly pageElements: number;
  private readonly pages: PageTable;
  readonly prefixCache?: PrefixCache;
  private readonly stepper: NativeStepper;
  private ids = new Int32Array(256);
  private rows: Int32Array = new Int32Array(3 * 16);
  private table: Int32Array = new Int32Array(256);
  private logits = new Float32Array(0);
  private topValues: Float32Array;
  private topIds: Int32Array;
  private readonly maxModelLen: number;
  private readonly syncBelowSeconds: number;
  private released = false;
  private inflight: Promise<number> | undefined;
  /** The last pass's wall time and tokens, which decide whether the next runs on this thread. */
  private lastSeconds = Infinity;
  private lastTokens = 0;

  constructor(
    private readonly binding: OrtBinding,
    private readonly parts: NativeSession[],
    config: LlamaConfig,
    options: { maxSlots: number; maxModelLen: number; kvTokens: number; kvDtype: KvCacheDtype; graphDtype: KvCacheDtype; topLogits: number; threads: number; syncBelowSeconds?: number; prefixCache?: boolean },
  ) {
    this.vocabSize = config.vocab_size;
    this.layers = config.num_hidden_layers;
    const kvh = config.num_key_value_heads;
    const hd = headDim(config);
    if (parts.length !== this.layers + 1) throw new Error(`expected ${this.layers + 1} graph parts, got ${parts.length}`);
    this.topLogits = options.topLogits;
    this.kvElementBytes = options.kvDtype === 'float16' ? 2 : 4;
    this.pagePositions = binding.pagePositions;
    this.pageElements = this.layers * 2 * kvh * this.pagePositions * hd;
    // Every sequence may hold one partly used page beyond the tokens the scheduler counts.
    const tokens = Math.min(options.kvTokens, options.maxSlots * options.maxModelLen);
    const totalPages = Math.ceil(tokens / this.pagePositions) + options.maxSlots;
    this.pages = new PageTable(totalPages, this.pagePositions, options.maxSlots, { prefixCache: options.prefixCache, copyPage: (from, to) => binding.stepperCopyPage(this.stepper, from, to) });
    if (options.prefixCache) this.prefixCache = this.pages;
    this.maxModelLen = options.maxModelLen;
    this.syncBelowSeconds = options.syncBelowSeconds ?? NATIVE_SYNC_BELOW_SECONDS;
    const rope = ropeTables(config);
    const dims = Int32Array.of(this.layers, config.hidden_size, config.num_attention_heads, kvh, hd, this.vocabSize, totalPages, this.kvElementBytes === 2 ? 1 : 0, options.graphDtype === 'float16' ? 1 : 0, options.threads);
    this.stepper = binding.createStepper(parts, dims, rope.cos, rope.sin);
    this.topValues = new Float32Array(options.maxSlots * Math.max(1, this.topLogits));
    this.topIds = new Int32Array(options.maxSlots * Math.max(1, this.topLogits));
  }

  kvBytes(): number {
    return this.pages.usedPages * this.pageElements * this.kvElementBytes;
  }

  cachedLength(seq: number): number {
    return this.pages.length(seq);
  }

  open(seq: number): void {
    this.pages.open(seq);
  }

  close(seq: number): void {
    this.pages.close(seq);
  }

  async forward(rows: ForwardRow[]): Promise<ForwardResult> {
    if (rows.length === 0) return { logits: [], runSeconds: 0 };
    const runSeconds = await this.run(rows, true, 1);
    const V = this.vocabSize;
    // Copies: the buffer is the next step's output.
    return { logits: rows.map((_, b) => this.logits.slice(b * V, (b + 1) * V)), runSeconds };
  }

  async forwardTop(rows: ForwardRow[], k = this.topLogits): Promise<{ top: TopLogits[]; runSeconds: number }> {
    if (!Number.isInteger(k) || k < 1 || k > this.topLogits) throw new RangeError(`top logits: k must be an integer in 1 … ${this.topLogits}, got ${k}`);
    if (rows.length === 0) return { top: [], runSeconds: 0 };
    const runSeconds = await this.run(rows, false, k);
    const top = rows.map((_, b) => {
      const t: TopLogits = { ids: new Array<number>(k), values: new Array<number>(k) };
      for (let i = 0, at = b * k; i < k; i++, at++) {
        t.ids[i] = this.topIds[at];
        t.values[i] = this.topValues[at];
      }
      return t;
    });
    return { top, runSeconds };
  }

  private async run(rows: ForwardRow[], full: boolean, k: number): Promise<number> {
    if (this.released) throw new Error('the runner has been released');
    const B = rows.length;
    for (const r of rows) if (r.tokens.length === 0) throw new Error(`sequence ${r.seq}: a row needs at least one new token`);
    // Rows packed one after another.
    const laid = this.pages.layout(rows, this.maxModelLen, { info: this.rows, table: this.table });
    [this.rows, this.table] = [laid.info, laid.table];
    const N = laid.tokens;
    if (this.ids.length < N) this.ids = new Int32Array(Math.max(N, 2 * this.ids.length));
    if (full && this.logits.length < B * this.vocabSize) this.logits = new Float32Array(B * this.vocabSize);
    const { ids, table } = this;
    const info = this.rows;
    let token = 0;
    for (const r of rows) for (let t = 0; t < r.tokens.length; t++) ids[token++] = r.tokens[t];
    if (this.topValues.length < B * k) {
      this.topValues = new Float32Array(B * k);
      this.topIds = new Int32Array(B * k);
    }
    const args = [this.stepper, B, N, k, full, ids, info, table, this.logits, this.topValues, this.topIds] as const;
    let seconds: number;
    if (this.syncBelowSeconds > 0 && this.lastSeconds < this.syncBelowSeconds && N <= this.lastTokens) {
      seconds = this.binding.stepperRunSync(...args);
    } else {
      const step = this.binding.stepperRun(...args);
      this.inflight = step;
      seconds = await step.finally(() => (this.inflight = undefined));
    }
    this.lastSeconds = seconds;
    this.lastTokens = N;
    for (const r of rows) this.pages.advance(r.seq, r.tokens.length, r.tokens);
    return seconds;
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    // The pass in flight (if any) finishes first: its buffers and sessions are what release frees.
    await this.inflight?.catch(() => {});
    this.binding.release(this.stepper);
    for (const p of this.parts) this.binding.release(p);
  }
}
