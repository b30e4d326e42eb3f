import ort from 'onnxruntime-node';
import type { LlamaConfig } from '../../model/types.ts';
import { headDim } from '../../model/types.ts';
import { ropeTables } from '../../model/llama-graph.ts';
import type { KvCacheDtype } from '../protocol.ts';
import type { AttentionBinding } from './native-attention.ts';
import { PageTable } from './page-table.ts';
import { graphTopLogits, topKTensor, topLogitsOf } from './graph-io.ts';
import type { ForwardResult, ForwardRow, ModelRunner, PrefixCache, TopLogits } from './runner.ts';

/**
 * Runner for Tally graphs on the CPU with attention in native code: the graph is cut at each layer's
 * attention (buildLlamaParts), and between the parts native/attention stores the new keys and values in a
 * paged cache and attends over it in place. Each layer's cache is an arena of pages of `pagePositions`
 * positions (laid out per head, see attention.c); a sequence holds the pages its length needs, so nothing is ever moved or re-laid out, rows
 * of a batch need not be neighbours, and each row reads only its own positions.
 */
export class PagedRunner implements ModelRunner {
  readonly kind = 'paged' as const;
  readonly vocabSize: number;
  readonly topLogits: number;
  readonly kvElementBytes: number;
  private readonly layers: number;
  private readonly nh: number;
  private readonly kvh: number;
  private readonly hd: number;
  private readonly pagePositions: number;
  private readonly pageElements: number;
  /** One arena per layer (a typed array holds at most 2^32 elements; per layer they stay well below). */
  private readonly arenas: (Float32Array | Uint16Array)[] = [];
  private readonly pages: PageTable;
  readonly prefixCache?: PrefixCache;
  private readonly dims: Int32Array;
  private readonly rope: { cos: Float32Array; sin: Float32Array };
  private attnBuffer = new Float32Array(0);

  constructor(
    private readonly parts: ort.InferenceSession[],
    config: LlamaConfig,
    private readonly attention: AttentionBinding,
    private readonly options: { maxSlots: number; maxModelLen: number; kvTokens: number; kvDtype: KvCacheDtype; prefixCache?: boolean },
  ) {
    this.vocabSize = config.vocab_size;
    this.layers = config.num_hidden_layers;
    this.nh = config.num_attention_heads;
    this.kvh = config.num_key_value_heads;
    this.hd = headDim(config);
    if (parts.length !== this.layers + 1) throw new Error(`expected ${this.layers + 1} graph parts, got ${parts.length}`);
    this.topLogits = graphTopLogits(parts[this.layers], this.vocabSize).most;
    this.kvElementBytes = options.kvDtype === 'float16' ? 2 : 4;
    this.pagePositions = attention.pagePositions;
    this.pageElements = this.layers * 2 * this.kvh * this.pagePositions * this.hd;
    // Every sequence may hold one partly used page beyond the tokens the scheduler counts.
    const tokens = Math.min(options.kvTokens, options.maxSlots * options.maxModelLen);
    const totalPages = Math.ceil(tokens / this.pagePositions) + options.maxSlots;
    // Pages are touched (and so take memory) only once used.
    const elements = totalPages * (this.pageElements / this.layers);
    if (elements > 2 ** 32 - 1) throw new Error(`a KV cache of ${tokens} tokens is more than one layer's arena can hold (2^32 elements); lower --kv-cache-gb or --kv-cache-tokens`);
    for (let l = 0; l < this.layers; l++) this.arenas.push(options.kvDtype === 'float16' ? new Uint16Array(elements) : new Float32Array(elements));
    this.pages = new PageTable(totalPages, this.pagePositions, options.maxSlots, { prefixCache: options.prefixCache, copyPage: (from, to) => this.copyPage(from, to, totalPages) });
    if (options.prefixCache) this.prefixCache = this.pages;
    this.dims = Int32Array.of(1, this.nh, this.kvh, this.hd, totalPages);
    // The tables the whole graph's RotaryEmbedding takes (rope.cos / rope.sin), computed as the converter does.
    this.rope = ropeTables(config);
  }

  /** Copies a page's keys and values, every layer (layout: attention.c's, one block per kind and KV head). */
  private copyPage(from: number, to: number, totalPages: number): void {
    const span = this.pagePositions * this.hd;
    for (const arena of this.arenas) {
      for (let block = 0; block < 2 * this.kvh; block++) {
        const base = block * totalPages * span;
        arena.copyWithin(base + to * span, base + from * span, base + (from + 1) * span);
      }
    }
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
    const { logits, runSeconds } = await this.run(rows, true);
    return { logits: logits!, runSeconds };
  }

  async forwardTop(rows: ForwardRow[], k = this.topLogits): Promise<{ top: TopLogits[]; runSeconds: number }> {
    const { top, runSeconds } = await this.run(rows, false, k);
    return { top: top!, runSeconds };
  }

  private async run(rows: ForwardRow[], full: boolean, k = 1): Promise<{ logits?: Float32Array[]; top?: TopLogits[]; runSeconds: number }> {
    if (rows.length === 0) return { logits: [], top: [], runSeconds: 0 };
    const topK = topKTensor(k, this.topLogits);
    const B = rows.length;
    // Rows padded to the widest: attend() takes them at b × T.
    const { info, table, widest: T } = this.pages.layout(rows, this.options.maxModelLen, { info: new Int32Array(3 * B), table: new Int32Array(0) });
    const ids = new BigInt64Array(B * T);
    const logitsIndex = new BigInt64Array(B);
    rows.forEach((r, b) => {
      for (let t = 0; t < r.tokens.length; t++) ids[b * T + t] = BigInt(r.tokens[t]);
      logitsIndex[b] = BigInt(b * T + r.tokens.length - 1);
    });
    this.dims[0] = T;
    const attnSize = B * T * this.nh * this.hd;
    if (this.attnBuffer.length < attnSize) this.attnBuffer = new Float32Array(attnSize);
    const attn = new ort.Tensor('float32', this.attnBuffer.subarray(0, attnSize), [B * T, this.nh * this.hd]);

    const started = performance.now();
    let out = await this.parts[0].run({ input_ids: new ort.Tensor('int64', ids, [B, T]) });
    for (let l = 0; l < this.layers; l++) {
      this.attention.attend(this.arenas[l], out.qkv.data as Float32Array, attn.data as Float32Array, info, table, this.dims, this.rope.cos, this.rope.sin);
      const feeds: Record<string, ort.Tensor> = { hidden_in: out.hidden, attn };
      if (l + 1 < this.layers) {
        out = await this.parts[l + 1].run(feeds);
      } else {
        feeds.logits_index = new ort.Tensor('int64', logitsIndex, [B]);
        feeds.top_k = topK;
        out = await this.parts[l + 1].run(feeds, full ? ['logits'] : ['top_logits', 'top_ids']);
      }
    }
    const runSeconds = (performance.now() - started) / 1000;
    for (const r of rows) this.pages.advance(r.seq, r.tokens.length, r.tokens);

    if (!full) return { top: rows.map((_, b) => topLogitsOf(out, b)), runSeconds };
    const logits = out.logits.data as Float32Array;
    const V = this.vocabSize;
    return { logits: rows.map((_, b) => logits.subarray(b * V, (b + 1) * V)), runSeconds };
  }

  async release(): Promise<void> {
    for (const p of this.parts) await p.release();
  }
}
