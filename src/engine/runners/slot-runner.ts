import ort from 'onnxruntime-node';
import type { LlamaConfig } from '../../model/types.ts';
import { headDim } from '../../model/types.ts';
import { type KvArray, type KvType, graphTopLogits, kvArray, kvTypeOf, logitsAsFloat32, topKTensor, topLogitsOf } from './graph-io.ts';
import type { ForwardResult, ForwardRow, ModelRunner, TopLogits } from './runner.ts';

const MASKED = -1e9;

/** dst[to …] = src[from …], count elements: a loop for a few (one position: no subarray objects), memcpy for many. */
function copyElements(src: KvArray, from: number, dst: KvArray, to: number, count: number): void {
  if (count > 256) {
    dst.set(src.subarray(from, from + count), to);
    return;
  }
  for (let i = 0; i < count; i++) dst[to + i] = src[from + i];
}

/**
 * Runner for graphs that `tally convert` writes: the KV cache lives in per-layer slot buffers owned
 * here and goes into the graph as zero-copy input views; only new positions come back.
 * Layout per layer, K and V alike: [slot, kvHeads, cap, headDim], so a new position is one contiguous row per head.
 * Rows of one forward must sit in contiguous slots, so the runner moves sequences between slots when
 * the batch changes (copying only their cached positions).
 */
export class SlotRunner implements ModelRunner {
  readonly kind = 'slot' as const;
  readonly vocabSize: number;
  private readonly layers: number;
  private readonly kvh: number;
  private readonly hd: number;
  private readonly group: number;
  private readonly maxLen: number;
  private readonly maxSlots: number;
  private slotCap = 0;
  private cap = 0;
  private readonly kvType: KvType;
  readonly kvElementBytes: number;
  readonly topLogits: number;
  private readonly topKInput: boolean;
  private keys: KvArray[] = [];
  private values: KvArray[] = [];
  private slotSeq: (number | undefined)[] = [];
  private seqSlot = new Map<number, number>();
  private lengths = new Map<number, number>();
  private readonly capStep = 64;

  constructor(
    private readonly session: ort.InferenceSession,
    config: LlamaConfig,
    options: { maxSlots: number; maxModelLen: number },
  ) {
    this.vocabSize = config.vocab_size;
    this.layers = config.num_hidden_layers;
    this.kvh = config.num_key_value_heads;
    this.hd = headDim(config);
    this.group = config.num_attention_heads / config.num_key_value_heads;
    this.maxLen = options.maxModelLen;
    this.maxSlots = options.maxSlots;
    this.kvType = kvTypeOf(session, 'past_key.0');
    this.kvElementBytes = this.kvType === 'float16' ? 2 : 4;
    const top = graphTopLogits(session, this.vocabSize);
    this.topLogits = top.most;
    this.topKInput = top.input;
  }

  private slotStride(cap = this.cap): number {
    return this.kvh * this.hd * cap;
  }

  kvBytes(): number {
    return this.layers * 2 * this.slotCap * this.slotStride() * this.kvElementBytes;
  }

  cachedLength(seq: number): number {
    const len = this.lengths.get(seq);
    if (len === undefined) throw new Error(`sequence ${seq} is not open`);
    return len;
  }

  open(seq: number): void {
    if (this.seqSlot.has(seq)) throw new Error(`sequence ${seq} is already open`);
    let slot = this.slotSeq.findIndex((s) => s === undefined);
    if (slot < 0) {
      if (this.slotSeq.length >= this.maxSlots) throw new Error(`no free KV slot (max ${this.maxSlots})`);
      slot = this.slotSeq.length;
      this.slotSeq.push(undefined);
    }
    this.slotSeq[slot] = seq;
    this.seqSlot.set(seq, slot);
    this.lengths.set(seq, 0);
  }

  close(seq: number): void {
    const slot = this.seqSlot.get(seq);
    if (slot === undefined) return;
    this.slotSeq[slot] = undefined;
    this.seqSlot.delete(seq);
    this.lengths.delete(seq);
    while (this.slotSeq.length > 0 && this.slotSeq[this.slotSeq.length - 1] === undefined) this.slotSeq.pop();
  }

  /** Grows the buffers to hold `slots` slots of `cap` positions, re-laying out what is cached. */
  private ensureCapacity(slots: number, positions: number, allowShrink = false): void {
    const wanted = Math.min(this.maxLen, Math.ceil(positions / this.capStep) * this.capStep);
    // Attention runs over the whole capacity, so after long sequences leave it comes back down.
    const newCap = allowShrink && wanted * 2 <= this.cap ? wanted : Math.max(this.cap, wanted);
    // One slot beyond maxSlots may be needed: swapSlots parks a sequence there while two occupied slots trade places.
    const slotLimit = this.maxSlots + 1;
    if (slots > slotLimit) throw new Error(`${slots} KV slots requested, more than ${slotLimit}`);
    let newSlots = this.slotCap;
    while (newSlots < slots) newSlots = Math.min(slotLimit, Math.max(4, newSlots * 2));
    if (newCap === this.cap && newSlots === this.slotCap) return;
    const oldCap = this.cap;
    const oldStride = this.slotStride(oldCap);
    const newStride = this.slotStride(newCap);
    for (let l = 0; l < this.layers; l++) {
      const k = kvArray(this.kvType, newSlots * newStride);
      const v = kvArray(this.kvType, newSlots * newStride);
      if (oldCap === newCap) {
        k.set(this.keys[l]);
        v.set(this.values[l]);
      } else if (oldCap > 0) {
        for (const [seq, slot] of this.seqSlot) {
          const len = this.lengths.get(seq)!;
          if (len === 0) continue;
          for (let h = 0; h < this.kvh; h++) {
            const src = slot * oldStride + h * oldCap * this.hd;
            const dst = slot * newStride + h * newCap * this.hd;
            k.set(this.keys[l].subarray(src, src + len * this.hd), dst);
            v.set(this.values[l].subarray(src, src + len * this.hd), dst);
          }
        }
      }
      this.keys[l] = k;
      this.values[l] = v;
    }
    this.cap = newCap;
    this.slotCap = newSlots;
  }

  private moveSlot(from: number, to: number): void {
    const stride = this.slotStride();
    const seq = this.slotSeq[from]!;
    const len = this.lengths.get(seq)!;
    for (let l = 0; l < this.layers; l++) {
      const k = this.keys[l];
      const v = this.values[l];
      for (let h = 0; h < this.kvh; h++) {
        const off = h * this.cap * this.hd;
        k.copyWithin(to * stride + off, from * stride + off, from * stride + off + len * this.hd);
        v.copyWithin(to * stride + off, from * stride + off, from * stride + off + len * this.hd);
      }
    }
    this.slotSeq[to] = seq;
    this.slotSeq[from] = undefined;
    this.seqSlot.set(seq, to);
  }

  private swapSlots(a: number, b: number): void {
    if (this.slotSeq[a] === undefined) return this.moveSlot(b, a);
    if (this.slotSeq[b] === undefined) return this.moveSlot(a, b);
    const spare = this.slotSeq.length;
    this.slotSeq.push(undefined);
    this.ensureCapacity(this.slotSeq.length, this.cap);
    this.moveSlot(a, spare);
    this.moveSlot(b, a);
    this.moveSlot(spare, b);
    this.slotSeq.pop();
  }

  /** Places the rows' sequences in contiguous slots [base, base + n), moving as few as it can. */
  private arrange(seqs: number[]): number {
    const n = seqs.length;
    const wanted = new Set(seqs);
    const slots = seqs.map((s) => this.seqSlot.get(s)!);
    let base = Math.min(...slots);
    let best = -1;
    for (const s of slots) {
      for (const b of [s, s - n + 1]) {
        if (b < 0 || b + n > this.maxSlots) continue;
        const inside = slots.filter((x) => x >= b && x < b + n).length;
        if (inside > best) {
          best = inside;
          base = b;
        }
      }
    }
    while (this.slotSeq.length < base + n) this.slotSeq.push(undefined);
    this.ensureCapacity(this.slotSeq.length, this.cap);
    const outside = seqs.filter((s) => {
      const slot = this.seqSlot.get(s)!;
      return slot < base || slot >= base + n;
    });
    for (let t = base; t < base + n && outside.length > 0; t++) {
      const occupant = this.slotSeq[t];
      if (occupant !== undefined && wanted.has(occupant)) continue;
      this.swapSlots(this.seqSlot.get(outside.pop()!)!, t);
    }
    while (this.slotSeq.length > 0 && this.slotSeq[this.slotSeq.length - 1] === undefined) this.slotSeq.pop();
    return base;
  }

  async forward(rows: ForwardRow[]): Promise<ForwardResult> {
    const { logits, runSeconds } = await this.run(rows, true);
    return { logits: logits!, runSeconds };
  }

  async forwardTop(rows: ForwardRow[], k = this.topLogits): Promise<{ top: TopLogits[]; runSeconds: number }> {
    if (this.topLogits === 0) throw new Error('this graph has no top_ids output');
    const { top, runSeconds } = await this.run(rows, false, k);
    return { top: top!, runSeconds };
  }

  private async run(rows: ForwardRow[], full: boolean, k = 1): Promise<{ logits?: Float32Array[]; top?: TopLogits[]; runSeconds: number }> {
    if (rows.length === 0) return { logits: [], top: [], runSeconds: 0 };
    let maxEnd = 0;
    for (const r of rows) {
      const end = this.cachedLength(r.seq) + r.tokens.length;
      if (end > this.maxLen) throw new Error(`sequence ${r.seq} would exceed the model length ${this.maxLen}`);
      maxEnd = Math.max(maxEnd, end);
    }
    let longest = maxEnd;
    for (const len of this.lengths.values()) longest = Math.max(longest, len);
    this.ensureCapacity(Math.max(this.slotSeq.length, 1), longest, true);
    const base = this.arrange(rows.map((r) => r.seq));
    const ordered = [...rows].sort((a, b) => this.seqSlot.get(a.seq)! - this.seqSlot.get(b.seq)!);
    const B = ordered.length;
    const T = Math.max(...ordered.map((r) => r.tokens.length));
    const fresh = ordered.every((r) => this.lengths.get(r.seq) === 0);
    const P = fresh ? 1 : this.cap;

    const ids = new BigInt64Array(B * T);
    const pos = new BigInt64Array(B * T);
    const logitsIndex = new BigInt64Array(B);
    const G = this.group * T;
    const pastMask = new Float32Array(B * P * G).fill(MASKED);
    const newMask = new Float32Array(B * T * T).fill(MASKED);
    ordered.forEach((r, b) => {
      const len = this.lengths.get(r.seq)!;
      const n = r.tokens.length;
      for (let t = 0; t < T; t++) {
        ids[b * T + t] = BigInt(t < n ? r.tokens[t] : 0);
        pos[b * T + t] = BigInt(t < n ? len + t : len);
        for (let j = 0; j < T; j++) {
          if ((j <= t && j < n) || j === t) newMask[(b * T + t) * T + j] = 0;
        }
      }
      if (!fresh) for (let c = 0; c < G; c++) pastMask.fill(0, (b * G + c) * P, (b * G + c) * P + len);
      logitsIndex[b] = BigInt(b * T + n - 1);
    });

    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', ids, [B, T]),
      position_ids: new ort.Tensor('int64', pos, [B, T]),
      past_mask: new ort.Tensor('float32', pastMask, [B, 1, G, P]),
      new_mask: new ort.Tensor('float32', newMask, [B, 1, 1, T, T]),
      logits_index: new ort.Tensor('int64', logitsIndex, [B]),
    };
    if (this.topKInput) feeds.top_k = topKTensor(k, this.topLogits);
    const stride = this.slotStride();
    const kvType = this.kvType;
    const dummy = fresh ? kvArray(kvType, B * this.kvh * this.hd) : undefined;
    for (let l = 0; l < this.layers; l++) {
      if (dummy) {
        feeds[`past_key.${l}`] = new ort.Tensor(kvType, dummy, [B, this.kvh, 1, this.hd]);
        feeds[`past_value.${l}`] = new ort.Tensor(kvType, dummy, [B, this.kvh, 1, this.hd]);
      } else {
        feeds[`past_key.${l}`] = new ort.Tensor(kvType, this.keys[l].subarray(base * stride, (base + B) * stride), [B, this.kvh, this.cap, this.hd]);
        feeds[`past_value.${l}`] = new ort.Tensor(kvType, this.values[l].subarray(base * stride, (base + B) * stride), [B, this.kvh, this.cap, this.hd]);
      }
    }
    const started = performance.now();
    const out = await this.session.run(feeds, full ? ['new_kv', 'logits'] : ['new_kv', 'top_logits', 'top_ids']);
    const runSeconds = (performance.now() - started) / 1000;

    const newKv = out.new_kv.data as KvArray; // [2L, B, kvh, T, hd]
    const hd = this.hd;
    ordered.forEach((r, b) => {
      const slot = this.seqSlot.get(r.seq)!;
      const len = this.lengths.get(r.seq)!;
      const count = r.tokens.length * hd;
      for (let l = 0; l < this.layers; l++) {
        const k = this.keys[l];
        const v = this.values[l];
        for (let h = 0; h < this.kvh; h++) {
          const kSrc = (((2 * l) * B + b) * this.kvh + h) * T * hd;
          const vSrc = (((2 * l + 1) * B + b) * this.kvh + h) * T * hd;
          const dst = slot * stride + h * this.cap * hd + len * hd;
          copyElements(newKv, kSrc, k, dst, count);
          copyElements(newKv, vSrc, v, dst, count);
        }
      }
      this.lengths.set(r.seq, len + count / hd);
    });

    const rowOf = new Map(ordered.map((r, b) => [r.seq, b]));
    if (!full) return { top: rows.map((r) => topLogitsOf(out, rowOf.get(r.seq)!)), runSeconds };
    const logits = logitsAsFloat32(out.logits);
    const V = this.vocabSize;
    return {
      logits: rows.map((r) => logits.subarray(rowOf.get(r.seq)! * V, (rowOf.get(r.seq)! + 1) * V)),
      runSeconds,
    };
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
