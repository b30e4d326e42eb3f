import type { LlamaConfig } from '../../model/types.ts';
import { headDim } from '../../model/types.ts';
import type { NativeBuffer, NativeSession, OrtBinding, RunEntry } from './native-ort.ts';
import type { ForwardResult, ForwardRow, ModelRunner, TopLogits } from './runner.ts';

/**
 * Runner for a Tally model as one graph attended by ONNX Runtime's GroupQueryAttention (buildLlamaGqaGraph),
 * driven through native/ort: the path for CUDA, where the KV cache must stay in device memory. The cache is two
 * buffers per layer from the session's own allocator (device memory on CUDA), [slots, kv_heads, maxModelLen,
 * head_dim], bound as both the past and the present of every pass: only token ids go in and logits come out.
 * Each sequence holds a slot. A pass of single new tokens runs over slots 0 … the highest one in it, a slot not in
 * the pass taking a placeholder token at its own next position (which its next real token overwrites); first
 * prompts on neighbouring slots run together, right-padded (on the CPU; on CUDA each alone until that is checked
 * on a GPU); a chunk continuing a prompt runs alone over its slot
 * (ONNX Runtime's kernel takes a batch of those only one row at a time). Passes run off the event loop and are
 * timed until the device has finished them.
 */
export class GqaRunner implements ModelRunner {
  readonly kind = 'gqa' as const;
  readonly vocabSize: number;
  readonly topLogits: number;
  readonly kvElementBytes: number;
  private readonly layers: number;
  private readonly kvh: number;
  private readonly hd: number;
  private readonly maxLen: number;
  private readonly slotBytes: number;
  private readonly element: 'float32' | 'float16';
  /** Slot and cached length of each open sequence. */
  private readonly open_ = new Map<number, { slot: number; length: number }>();
  private readonly freeSlots: number[];
  private readonly lengthOfSlot: Int32Array;
  private released = false;
  private inflight: Promise<number> | undefined;
  /** Right-padded batches of first prompts: checked against the CPU kernel only, so off on CUDA until run there. */
  private readonly batchFirstPrompts: boolean;

  constructor(
    private readonly binding: OrtBinding,
    private readonly session: NativeSession,
    private readonly buffers: NativeBuffer[],
    config: LlamaConfig,
    options: { maxSlots: number; maxModelLen: number; graphDtype: 'float32' | 'float16'; topLogits: number; batchFirstPrompts: boolean },
  ) {
    this.batchFirstPrompts = options.batchFirstPrompts;
    this.vocabSize = config.vocab_size;
    this.layers = config.num_hidden_layers;
    this.kvh = config.num_key_value_heads;
    this.hd = headDim(config);
    this.maxLen = options.maxModelLen;
    this.element = options.graphDtype;
    this.kvElementBytes = options.graphDtype === 'float16' ? 2 : 4;
    this.slotBytes = this.kvh * this.maxLen * this.hd * this.kvElementBytes;
    if (buffers.length !== 2 * this.layers) throw new Error(`expected ${2 * this.layers} cache buffers, got ${buffers.length}`);
    this.topLogits = options.topLogits;
    this.freeSlots = Array.from({ length: options.maxSlots }, (_, i) => options.maxSlots - 1 - i);
    this.lengthOfSlot = new Int32Array(options.maxSlots);
  }

  /** Bytes of the cache: allocated whole when the runner starts. */
  kvBytes(): number {
    return 2 * this.layers * this.lengthOfSlot.length * this.slotBytes;
  }

  cachedLength(seq: number): number {
    const s = this.open_.get(seq);
    if (!s) throw new Error(`sequence ${seq} is not open`);
    return s.length;
  }

  open(seq: number): void {
    if (this.open_.has(seq)) throw new Error(`sequence ${seq} is already open`);
    // The lowest free slot, so that passes of single tokens span as few slots as they can.
    const slot = this.freeSlots.pop();
    if (slot === undefined) throw new Error(`all ${this.lengthOfSlot.length} slots are taken`);
    this.open_.set(seq, { slot, length: 0 });
    this.lengthOfSlot[slot] = 0;
  }

  close(seq: number): void {
    const s = this.open_.get(seq);
    if (!s) return;
    this.open_.delete(seq);
    this.lengthOfSlot[s.slot] = 0;
    this.freeSlots.push(s.slot);
    this.freeSlots.sort((a, b) => b - a);
  }

  async forward(rows: ForwardRow[]): Promise<ForwardResult> {
    const logits: Float32Array[] = new Array(rows.length);
    // Each pass's logits are a fresh array: the rows can be views of it.
    const runSeconds = await this.run(rows, (i, out) => (logits[i] = out.logits!.subarray(out.row * this.vocabSize, (out.row + 1) * this.vocabSize)), 0);
    return { logits, runSeconds };
  }

  async forwardTop(rows: ForwardRow[], k = this.topLogits): Promise<{ top: TopLogits[]; runSeconds: number }> {
    if (!Number.isInteger(k) || k < 1 || k > this.topLogits) throw new RangeError(`top logits: k must be an integer in 1 … ${this.topLogits}, got ${k}`);
    const top: TopLogits[] = new Array(rows.length);
    const runSeconds = await this.run(rows, (i, out) => {
      const t: TopLogits = { ids: new Array<number>(k), values: new Array<number>(k) };
      for (let j = 0, at = out.row * k; j < k; j++, at++) {
        t.ids[j] = Number(out.topIds![at]);
        t.values[j] = out.topValues![at];
      }
      top[i] = t;
    }, k);
    return { top, runSeconds };
  }

  /**
   * Runs the rows: single tokens together, first prompts on neighbouring slots together, other chunks alone. `take`
   * receives each row's output; k = 0: full logits.
   */
  private async run(rows: ForwardRow[], take: (i: number, out: PassOutput) => void, k: number): Promise<number> {
    if (this.released) throw new Error('the runner has been released');
    const seen = new Set<number>();
    for (const r of rows) {
      const s = this.open_.get(r.seq);
      if (!s) throw new Error(`sequence ${r.seq} is not open`);
      if (seen.has(r.seq)) throw new Error(`sequence ${r.seq} appears twice in one pass`);
      seen.add(r.seq);
      if (r.tokens.length === 0) throw new Error(`sequence ${r.seq}: a row needs at least one new token`);
      if (s.length + r.tokens.length > this.maxLen) throw new Error(`sequence ${r.seq} would exceed the model length ${this.maxLen}`);
    }
    let seconds = 0;
    const single = rows.map((r, i) => ({ r, i })).filter(({ r }) => r.tokens.length === 1 && this.open_.get(r.seq)!.length > 0);
    if (single.length > 0) {
      const slots = single.map(({ r }) => this.open_.get(r.seq)!.slot);
      const B = Math.max(...slots) + 1;
      const ids = new BigInt64Array(B);
      single.forEach(({ r }, j) => (ids[slots[j]] = BigInt(r.tokens[0])));
      // A full slot not in the pass (it can take no token) writes its placeholder over its own last position.
      const lengths = Array.from(this.lengthOfSlot.subarray(0, B), (len) => Math.min(len, this.maxLen - 1));
      for (let j = 0; j < single.length; j++) lengths[slots[j]] = this.open_.get(single[j].r.seq)!.length;
      const out = await this.pass(ids, 1, 0, lengths, new Array<number>(B).fill(1), k);
      seconds += out.seconds;
      single.forEach(({ r, i }, j) => {
        take(i, { ...out, row: slots[j] });
        this.advance(r.seq, 1);
      });
    }
    const batched = new Set(single.map((x) => x.i));
    // First prompts on neighbouring slots go together, right-padded to the longest.
    const firsts = rows
      .map((r, i) => ({ r, i, slot: this.open_.get(r.seq)!.slot }))
      .filter(({ r, i }) => this.batchFirstPrompts && !batched.has(i) && this.open_.get(r.seq)!.length === 0)
      .sort((a, b) => a.slot - b.slot);
    for (let from = 0; from < firsts.length; ) {
      let to = from + 1;
      while (to < firsts.length && firsts[to].slot === firsts[to - 1].slot + 1) to++;
      const run = firsts.slice(from, to);
      from = to;
      if (run.length === 1) continue;
      const S = Math.max(...run.map(({ r }) => r.tokens.length));
      const ids = new BigInt64Array(run.length * S);
      run.forEach(({ r }, b) => r.tokens.forEach((t, j) => (ids[b * S + j] = BigInt(t))));
      const out = await this.pass(ids, S, run[0].slot, new Array<number>(run.length).fill(0), run.map(({ r }) => r.tokens.length), k);
      seconds += out.seconds;
      run.forEach(({ r, i }, b) => {
        batched.add(i);
        take(i, { ...out, row: b });
        this.advance(r.seq, r.tokens.length);
      });
    }
    // The rest alone: chunks continuing a prompt (the CPU kernel takes those one row at a time), lone first prompts.
    for (let i = 0; i < rows.length; i++) {
      if (batched.has(i)) continue;
      const r = rows[i];
      const s = this.open_.get(r.seq)!;
      const out = await this.pass(BigInt64Array.from(r.tokens.map(BigInt)), r.tokens.length, s.slot, [s.length], [r.tokens.length], k);
      seconds += out.seconds;
      take(i, { ...out, row: 0 });
      this.advance(r.seq, r.tokens.length);
    }
    return seconds;
  }

  private advance(seq: number, n: number): void {
    const s = this.open_.get(seq)!;
    s.length += n;
    this.lengthOfSlot[s.slot] = s.length;
  }

  /**
   * One pass over slots first … first + B - 1 (B = lengths.length): row b has lengths[b] positions cached and news[b]
   * new tokens, right-padded to S in ids [B × S].
   */
  private async pass(ids: BigInt64Array, S: number, first: number, lengths: number[], news: number[], k: number): Promise<PassOutput & { seconds: number }> {
    const B = lengths.length;
    const seqlens = Int32Array.from(lengths, (len, b) => len + news[b] - 1);
    const total = Math.max(...lengths.map((len, b) => len + news[b]));
    const logitsIndex = BigInt64Array.from({ length: B }, (_, b) => BigInt(b * S + news[b] - 1));
    const inputs: RunEntry[] = [
      ['input_ids', ids, [B, S]],
      ['seqlens_k', seqlens, [B]],
      ['total_sequence_length', Int32Array.of(total), []],
      ['logits_index', logitsIndex, [B]],
      ['top_k', BigInt64Array.of(BigInt(Math.max(1, k))), [1]],
    ];
    const outputs: RunEntry[] = [];
    const dims = [B, this.kvh, this.maxLen, this.hd];
    for (let l = 0; l < this.layers; l++) {
      for (const [j, kind] of (['key', 'value'] as const).entries()) {
        const view: RunEntry = [`past_${kind}.${l}`, this.buffers[2 * l + j], dims, first * this.slotBytes, this.element];
        inputs.push(view);
        outputs.push([`present_${kind}.${l}`, this.buffers[2 * l + j], dims, first * this.slotBytes, this.element]);
      }
    }
    const result: PassOutput = { row: 0 };
    if (k === 0) {
      result.logits = new Float32Array(B * this.vocabSize);
      outputs.push(['logits', result.logits, [B, this.vocabSize]]);
    } else {
      result.topValues = new Float32Array(B * k);
      result.topIds = new BigInt64Array(B * k);
      outputs.push(['top_logits', result.topValues, [B, k]], ['top_ids', result.topIds, [B, k]]);
    }
    const step = this.binding.sessionRunAsync(this.session, inputs, outputs);
    this.inflight = step;
    const seconds = await step.finally(() => (this.inflight = undefined));
    return { ...result, seconds };
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    await this.inflight?.catch(() => {});
    for (const b of this.buffers) this.binding.release(b);
    this.binding.release(this.session);
  }
}

interface PassOutput {
  /** This row's place among the pass's rows. */
  row: number;
  logits?: Float32Array;
  topValues?: Float32Array;
  topIds?: BigInt64Array;
}
