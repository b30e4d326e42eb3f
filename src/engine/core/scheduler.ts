import type { TextTokenizer, IncrementalDecoder } from '../../model/tokenizer.ts';
import { type ModelShape, chunkFlops, splitSeconds } from '../../meter/attribution.ts';
import type { FinishReason, GeneratedToken, GenerationRequest, RequestCost, RequestEvent, SchedulerLimits, StepRecord } from '../protocol.ts';
import type { ForwardRow, ModelRunner, TopLogits } from '../runners/runner.ts';
import { CompiledGrammar, GrammarMatcher, NoTokenAllowed, TokenTable } from './grammar.ts';
import { SequenceSampler } from './sampler.ts';

const NO_TOKENS: readonly number[] = [];

/** What a forward pass gives one row: its full logits, or only its top logits when it samples greedily. */
type RowOutput = { logits: Float32Array; top?: undefined } | { logits?: undefined; top: TopLogits };

interface Sequence {
  req: GenerationRequest;
  seq: number;
  sampler: SequenceSampler;
  decoder: IncrementalDecoder;
  prefilled: number;
  /** Prompt positions taken from the prefix cache at admission. */
  cachedTokens: number;
  output: number[];
  pending: string;
  reserved: number;
  cost: RequestCost;
  admittedMs: number;
  firstTokenSent: boolean;
  cancelled: boolean;
  /** The request's place in its output grammar (constrained requests only). */
  grammar?: GrammarMatcher;
  /** EOS and stop_token_ids, banned until min_tokens (made once, at the first sample that needs it). */
  earlyBanned?: readonly number[];
}

/**
 * Iteration-level scheduling: each step runs every decoding sequence's next token and a budget of prompt chunks
 * (chunked prefill) — as one forward pass where the runner packs rows of different lengths, else as a decode pass
 * and a prefill pass — admits waiting requests FCFS at step boundaries, and finishes sequences as they stop. KV policy: a request is admitted only when its
 * worst case (prompt + max_tokens) fits in the KV capacity left, so an admitted request never has
 * to be preempted; otherwise it waits. With a prefix cache (the paged runner) a request reuses the cached pages
 * of its prompt's prefix, prefills only the rest and reserves only its own pages: a page shared by several
 * sequences counts once, a cached page that no sequence holds counts as free.
 */
export class Scheduler {
  private waiting: GenerationRequest[] = [];
  private running: Sequence[] = [];
  private byId = new Map<string, Sequence>();
  private cancelledWaiting = new Set<string>();
  private nextSeq = 1;
  private reservedTokens = 0;
  private wake?: () => void;
  private stopped = false;
  /** Constrained requests' grammars, compiled at submit, until admission. */
  private compiled = new Map<string, CompiledGrammar>();

  constructor(
    private readonly runner: ModelRunner,
    private readonly tokenizer: TextTokenizer,
    private readonly shape: ModelShape,
    private readonly eosIds: number[],
    readonly limits: SchedulerLimits,
    private readonly emit: (events: RequestEvent[]) => void,
    private readonly onStep: (record: StepRecord) => void,
  ) {}

  submit(req: GenerationRequest): void {
    const need = Math.min(req.promptIds.length + req.maxTokens, this.limits.maxModelLen);
    if (req.promptIds.length === 0) return this.fail(req, 'the prompt is empty');
    if (req.promptIds.length >= this.limits.maxModelLen) return this.fail(req, `the prompt has ${req.promptIds.length} tokens; the model's limit is ${this.limits.maxModelLen}`);
    if (need > this.limits.kvCapacityTokens) return this.fail(req, `the request needs ${need} KV tokens; the cache holds ${this.limits.kvCapacityTokens}`);
    try {
      new SequenceSampler(req.sampling, [], this.runner.vocabSize);
    } catch (err) {
      return this.fail(req, `invalid sampling parameters: ${(err as Error).message}`);
    }
    if (req.constraint) {
      try {
        this.compiled.set(req.id, new CompiledGrammar(req.constraint, TokenTable.of(this.tokenizer, this.runner.vocabSize)));
      } catch (err) {
        return this.fail(req, `invalid output grammar: ${(err as Error).message}`);
      }
    }
    this.waiting.push(req);
    this.wake?.();
  }

  cancel(id: string): void {
    const s = this.byId.get(id);
    if (s) s.cancelled = true;
    else if (this.waiting.some((r) => r.id === id)) this.cancelledWaiting.add(id);
    this.wake?.();
  }

  stop(): void {
    this.stopped = true;
    this.wake?.();
  }

  counts(): { running: number; waiting: number } {
    return { running: this.running.length, waiting: this.waiting.length };
  }

  private fail(req: GenerationRequest, message: string): void {
    this.emit([{ id: req.id, tokens: [], text: '', finish: 'error', error: message, promptTokens: req.promptIds.length, completionTokens: 0, cost: { prefillSeconds: 0, decodeSeconds: 0 } }]);
  }

  async run(): Promise<void> {
    while (!this.stopped) {
      if (this.running.length === 0 && this.waiting.length === 0) {
        await new Promise<void>((resolve) => (this.wake = resolve));
        this.wake = undefined;
        continue;
      }
      await this.step();
      // Let the worker's message port deliver new requests and cancellations between steps.
      await new Promise((resolve) => setImmediate(resolve));
    }
  }

  private admit(record: StepRecord): void {
    if (this.cancelledWaiting.size > 0) {
      const dropped = this.waiting.filter((r) => this.cancelledWaiting.has(r.id));
      for (const r of dropped) this.compiled.delete(r.id);
      this.waiting = this.waiting.filter((r) => !this.cancelledWaiting.has(r.id));
      this.cancelledWaiting.clear();
      this.emit(dropped.map((r) => ({ id: r.id, tokens: [], text: '', finish: 'cancelled' as const, promptTokens: r.promptIds.length, completionTokens: 0, cost: { prefillSeconds: 0, decodeSeconds: 0 } })));
    }
    const cache = this.runner.prefixCache;
    while (this.waiting.length > 0 && this.running.length < this.limits.maxNumSeqs) {
      const req = this.waiting[0];
      const need = Math.min(req.promptIds.length + req.maxTokens, this.limits.maxModelLen);
      // Its own worst case, less the pages it would share; shared pages count once (see PrefixCache).
      const plan = cache?.plan(req.promptIds);
      const own = need - (plan?.sharedTokens ?? 0);
      const inherited = cache ? cache.inheritedTokens() + plan!.revivedTokens : 0;
      if (this.reservedTokens + inherited + own > this.limits.kvCapacityTokens) break;
      this.waiting.shift();
      const seq = this.nextSeq++;
      this.runner.open(seq);
      const cached = cache ? cache.attach(seq, req.promptIds) : 0;
      record.admittedPromptTokens! += req.promptIds.length;
      record.admittedCachedTokens! += cached;
      const s: Sequence = {
        req,
        seq,
        sampler: new SequenceSampler(req.sampling, req.promptIds, this.runner.vocabSize),
        decoder: this.tokenizer.decodeStream({ context: req.promptIds }),
        prefilled: cached,
        cachedTokens: cached,
        output: [],
        pending: '',
        reserved: own,
        cost: { prefillSeconds: 0, decodeSeconds: 0 },
        admittedMs: performance.now(),
        firstTokenSent: false,
        cancelled: false,
      };
      const grammar = this.compiled.get(req.id);
      if (grammar) {
        this.compiled.delete(req.id);
        s.grammar = new GrammarMatcher(grammar, this.eosIds);
      }
      this.reservedTokens += own;
      this.running.push(s);
      this.byId.set(req.id, s);
    }
  }

  private release(s: Sequence): void {
    this.runner.close(s.seq);
    this.reservedTokens -= s.reserved;
    this.byId.delete(s.req.id);
    this.running = this.running.filter((x) => x !== s);
  }

  private finishEvent(s: Sequence, finish: FinishReason, text = '', extra: Partial<RequestEvent> = {}): RequestEvent {
    return {
      id: s.req.id,
      tokens: [],
      text,
      finish,
      promptTokens: s.req.promptIds.length,
      completionTokens: s.output.length,
      cachedTokens: s.cachedTokens,
      cost: { ...s.cost },
      ...extra,
    };
  }

  /** One iteration: admit, decode every running sequence, prefill a chunk. run() calls it in a loop; a benchmark may drive it itself. */
  async step(): Promise<void> {
    const startMs = performance.now();
    const events: RequestEvent[] = [];
    for (const s of [...this.running]) {
      if (s.cancelled) {
        events.push(this.finishEvent(s, 'cancelled'));
        this.release(s);
      }
    }
    const record: StepRecord = {
      startMs, endMs: 0, busySeconds: 0, prefillSeconds: 0, decodeSeconds: 0, prefillTokens: 0, decodeTokens: 0,
      admittedPromptTokens: 0, admittedCachedTokens: 0, running: 0, waiting: 0, kvUsedTokens: 0, kvCapacityTokens: this.limits.kvCapacityTokens, kvBytes: 0,
    };
    this.admit(record);

    const decoding = this.running.filter((s) => s.prefilled === s.req.promptIds.length);
    const chunks = this.promptChunks(decoding.length);
    if (this.runner.packedRows) {
      // One pass for both: the decode rows cost their own tokens only, and the weights are read once.
      if (decoding.length > 0 || chunks.length > 0) await this.pass(decoding, chunks, record, events);
    } else {
      if (decoding.length > 0) {
        await this.pass(decoding, [], record, events);
        // Decode tokens go out before the prefill pass runs, so inter-token latency stays low.
        this.flush(events);
      }
      if (chunks.length > 0) await this.pass([], chunks, record, events);
    }
    this.flush(events);

    record.busySeconds = record.prefillSeconds + record.decodeSeconds;
    record.endMs = performance.now();
    record.running = this.running.length;
    record.waiting = this.waiting.length;
    record.kvUsedTokens = this.runner.prefixCache?.heldTokens() ?? this.running.reduce((a, s) => a + this.runner.cachedLength(s.seq), 0);
    record.kvBytes = this.runner.kvBytes();
    if (record.busySeconds > 0 || record.running > 0) this.onStep(record);
  }

  /**
   * This step's prompt chunks, FCFS, within the token budget the decode rows leave. Where the runner pads rows to
   * the longest (not packedRows), the budget bounds rows × the widest chunk.
   */
  private promptChunks(decodeRows: number): { s: Sequence; n: number }[] {
    const budget = Math.max(0, this.limits.maxNumBatchedTokens - decodeRows);
    const packed = this.runner.packedRows === true;
    const chunks: { s: Sequence; n: number }[] = [];
    let used = 0;
    let widest = 0;
    for (const s of this.running) {
      if (s.prefilled === s.req.promptIds.length) continue;
      const n = Math.min(s.req.promptIds.length - s.prefilled, packed ? budget - used : budget);
      if (n <= 0) break;
      const cost = packed ? used + n : Math.max(widest, n) * (chunks.length + 1);
      if (chunks.length > 0 && cost > budget) break;
      widest = Math.max(widest, n);
      used = cost;
      chunks.push({ s, n });
    }
    return chunks;
  }

  /**
   * One forward pass over the decode rows (a token each) and the prompt chunks; its time is split among the rows
   * by their FLOPs, into decode and prefill seconds. Sequences whose prompt it completes, and the decode rows,
   * take their next token.
   */
  private async pass(decoding: Sequence[], chunks: { s: Sequence; n: number }[], record: StepRecord, events: RequestEvent[]): Promise<void> {
    const rows: ForwardRow[] = decoding.map((s) => ({ seq: s.seq, tokens: [s.output[s.output.length - 1]] }));
    const weights = decoding.map((s) => chunkFlops(this.shape, this.runner.cachedLength(s.seq), 1));
    for (const { s, n } of chunks) {
      rows.push({ seq: s.seq, tokens: s.req.promptIds.slice(s.prefilled, s.prefilled + n) });
      weights.push(chunkFlops(this.shape, s.prefilled, n));
    }
    const prompted = chunks.map((c) => c.s);
    const completing = chunks.filter(({ s, n }) => s.prefilled + n === s.req.promptIds.length).map((c) => c.s);
    const result = await this.forward(rows, [...decoding, ...prompted], [...decoding, ...completing], events);
    if (!result) return;
    const parts = splitSeconds(result.runSeconds, weights);
    const D = decoding.length;
    decoding.forEach((s, i) => {
      s.cost.decodeSeconds += parts[i];
      record.decodeSeconds += parts[i];
    });
    record.decodeTokens += D;
    decoding.forEach((s, i) => this.accept(s, result.outputs[i], events));
    chunks.forEach(({ s, n }, i) => {
      s.cost.prefillSeconds += parts[D + i];
      record.prefillSeconds += parts[D + i];
      s.prefilled += n;
      record.prefillTokens += n;
      if (s.prefilled === s.req.promptIds.length) this.accept(s, result.outputs[D + i], events);
    });
  }

  private flush(events: RequestEvent[]): void {
    if (events.length > 0) this.emit(events.splice(0));
  }

  /**
   * Runs the rows of `seqs`; when every one of them that samples from this pass (`sampling`) is plain greedy,
   * only each row's top logits come back (no copy of the full vocabulary rows).
   */
  private async forward(rows: ForwardRow[], seqs: Sequence[], sampling: Sequence[], events: RequestEvent[]): Promise<{ outputs: RowOutput[]; runSeconds: number } | undefined> {
    try {
      // A greedy row's token is the largest logit it may take: among its k largest when fewer than k are banned.
      let k = 1;
      let greedy = this.runner.forwardTop !== undefined && this.runner.topLogits > 0;
      for (const s of sampling) {
        if (!greedy) break;
        k = Math.max(k, this.bannedFor(s).length + 1);
        greedy = s.sampler.greedy && s.grammar === undefined && k <= this.runner.topLogits;
      }
      if (greedy) {
        const { top, runSeconds } = await this.runner.forwardTop!(rows, k);
        return { outputs: top.map((t) => ({ top: t })), runSeconds };
      }
      const { logits, runSeconds } = await this.runner.forward(rows);
      return { outputs: logits.map((l) => ({ logits: l })), runSeconds };
    } catch (err) {
      const message = `engine error: ${(err as Error).message}`;
      for (const s of seqs) {
        events.push(this.finishEvent(s, 'error', '', { error: message }));
        this.release(s);
      }
      return undefined;
    }
  }

  /** Tokens the next sample of `s` may not be: EOS under ignore_eos, EOS and stop_token_ids before min_tokens. */
  private bannedFor(s: Sequence): readonly number[] {
    const req = s.req;
    if (s.output.length < req.minTokens) return (s.earlyBanned ??= [...this.eosIds, ...req.stopTokenIds]);
    return req.ignoreEos ? this.eosIds : NO_TOKENS;
  }

  /** Samples the next token of `s` from its pass's output and decides whether it has finished. */
  private accept(s: Sequence, output: RowOutput, events: RequestEvent[]): void {
    const req = s.req;
    const early = s.output.length < req.minTokens;
    const banned = this.bannedFor(s);
    let sample;
    if (s.grammar) s.grammar.budget = req.maxTokens - s.output.length - 1;
    try {
      sample = output.logits ? s.sampler.sample(output.logits, banned, s.grammar) : s.sampler.sampleTop(output.top!, banned);
      if (!sample) throw new Error('every logit is -Infinity or NaN');
      if (s.grammar && !this.eosIds.includes(sample.token)) s.grammar.accept(sample.token);
    } catch (err) {
      if (err instanceof NoTokenAllowed) {
        // max_tokens too small for the grammar's shortest value: end here, cut.
        s.pending += s.decoder.flush();
        events.push(this.finishEvent(s, 'length', s.pending));
        s.pending = '';
        this.release(s);
        return;
      }
      events.push(this.finishEvent(s, 'error', '', { error: `sampling failed: ${(err as Error).message}` }));
      this.release(s);
      return;
    }
    const token = sample.token;
    s.output.push(token);
    const generated: GeneratedToken = { id: token, logprob: sample.logprob, topLogprobs: sample.topLogprobs };
    const event: RequestEvent = { id: req.id, tokens: [generated], text: '' };
    if (!s.firstTokenSent) {
      s.firstTokenSent = true;
      event.queueSeconds = (performance.now() - s.admittedMs) / 1000;
    }

    let finish: FinishReason | undefined;
    let stoppedBy: string | number | undefined;
    if (!req.ignoreEos && this.eosIds.includes(token)) {
      finish = 'stop';
      stoppedBy = token;
    } else if (req.stopTokenIds.includes(token)) {
      finish = 'stop';
      stoppedBy = token;
    } else {
      s.pending += s.decoder.push(token);
    }
    if (!finish && req.stop.length > 0 && !early) {
      let cut = -1;
      for (const stop of req.stop) {
        const at = s.pending.indexOf(stop);
        if (at >= 0 && (cut < 0 || at < cut)) {
          cut = at;
          stoppedBy = stop;
        }
      }
      if (cut >= 0) {
        s.pending = s.pending.slice(0, cut);
        finish = 'stop';
      }
    }
    if (!finish && s.grammar?.closed) finish = 'stop';
    if (!finish && (s.output.length >= req.maxTokens || this.runner.cachedLength(s.seq) + 1 >= this.limits.maxModelLen)) {
      finish = s.grammar?.complete ? 'stop' : 'length';
    }
    if (finish) {
      if (finish !== 'stop' || stoppedBy === undefined || typeof stoppedBy === 'number') s.pending += s.decoder.flush();
      event.text = s.pending;
      s.pending = '';
      Object.assign(event, this.finishEvent(s, finish, event.text, { tokens: event.tokens, stoppedBy, queueSeconds: event.queueSeconds }));
      this.release(s);
    } else {
      const hold = holdBack(s.pending, req.stop);
      event.text = s.pending.slice(0, s.pending.length - hold);
      s.pending = s.pending.slice(s.pending.length - hold);
    }
    events.push(event);
  }
}

/** Length of the longest suffix of `text` that is a proper prefix of some stop string. */
export function holdBack(text: string, stops: string[]): number {
  let hold = 0;
  for (const stop of stops) {
    for (let k = Math.min(stop.length - 1, text.length); k > hold; k--) {
      if (text.endsWith(stop.slice(0, k))) {
        hold = k;
        break;
      }
    }
  }
  return hold;
}
