/**
 * One API request's engine requests (prompts × n choices): submits them, follows their events, and
 * when the last one ends reports the request to the meter with its timings and device seconds.
 */
import type { EngineHandle } from '../engine/client/engine-handle.ts';
import type { FinishReason, GeneratedToken, GenerationRequest, RequestEvent } from '../engine/protocol.ts';
import type { CostReport, FinishedRequest, RequestMeter } from '../meter/types.ts';
import type { Logger } from 'pino';

export interface Choice {
  index: number;
  promptIndex: number;
  request: GenerationRequest;
  text: string;
  tokens: GeneratedToken[];
  finish?: FinishReason;
  error?: string;
  completionTokens: number;
  /** Prompt tokens the engine took from its prefix cache. */
  cachedTokens: number;
  prefillSeconds: number;
  decodeSeconds: number;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** As OpenAI reports it: prompt tokens whose keys and values were cached (not computed). */
  prompt_tokens_details: { cached_tokens: number };
  cost?: CostReport;
}

export interface Outcome {
  status: FinishedRequest['status'];
  usage: Usage;
  /** The first engine error, if any choice failed. */
  error?: string;
}

export interface GenerationMeta {
  id: string;
  model: string;
  tenant: string;
  arrivalMs: number;
  /** Prompt tokens of the request, each prompt counted once whatever n is. */
  promptTokens: number;
}

export class Generation {
  readonly choices: Choice[];
  readonly done: Promise<Outcome>;
  private cancelled = false;
  private internalError?: string;
  private pending: number;
  private firstTokenMs?: number;
  private lastTokenMs?: number;
  private readonly gaps: number[] = [];
  private resolve!: (o: Outcome) => void;

  constructor(
    private readonly engine: EngineHandle,
    private readonly meter: RequestMeter,
    private readonly logger: Logger,
    private readonly meta: GenerationMeta,
    requests: { promptIndex: number; request: GenerationRequest }[],
    private readonly onEvent: (choice: Choice, event: RequestEvent) => void,
  ) {
    this.choices = requests.map(({ promptIndex, request }, index) => ({
      index, promptIndex, request, text: '', tokens: [], completionTokens: 0, cachedTokens: 0, prefillSeconds: 0, decodeSeconds: 0,
    }));
    this.pending = this.choices.length;
    this.done = new Promise((resolve) => (this.resolve = resolve));
    for (const choice of this.choices) engine.submit(choice.request, (e) => this.handle(choice, e));
  }

  get finished(): boolean {
    return this.pending === 0;
  }

  /** Cancels the choices still running (client gone, timeout, a sibling's error). */
  cancel(): void {
    this.cancelled = true;
    for (const c of this.choices) if (!c.finish) this.engine.cancel(c.request.id);
  }

  private handle(choice: Choice, e: RequestEvent): void {
    if (choice.index === 0 && e.tokens.length > 0) this.timeTokens(e.tokens.length);
    choice.text += e.text;
    choice.tokens.push(...e.tokens);
    if (e.finish) {
      choice.finish = e.finish;
      choice.error = e.error;
      choice.completionTokens = e.completionTokens ?? choice.tokens.length;
      choice.cachedTokens = e.cachedTokens ?? 0;
      choice.prefillSeconds = e.cost?.prefillSeconds ?? 0;
      choice.decodeSeconds = e.cost?.decodeSeconds ?? 0;
    }
    try {
      this.onEvent(choice, e);
    } catch (err) {
      // A bug in the response writer must not escape into the engine client's message loop.
      this.logger.error({ err, requestId: this.meta.id }, 'writing a response event failed');
      this.internalError ??= 'internal error while writing the response';
      this.cancel();
    }
    if (e.finish && --this.pending === 0) this.resolve(this.report());
  }

  private timeTokens(count: number): void {
    const now = Date.now();
    if (this.lastTokenMs === undefined) this.firstTokenMs = now;
    else this.gaps.push((now - this.lastTokenMs) / 1000);
    for (let i = 1; i < count; i++) this.gaps.push(0);
    this.lastTokenMs = now;
  }

  private report(): Outcome {
    const error = this.choices.find((c) => c.finish === 'error')?.error ?? this.internalError;
    const status = error !== undefined ? 'error' : this.cancelled || this.choices.some((c) => c.finish === 'cancelled') ? 'cancelled' : 'completed';
    const completionTokens = this.choices.reduce((a, c) => a + c.completionTokens, 0);
    // A prompt counts once whatever n is: its cached tokens are those of the choice that computed the most of it.
    const cachedByPrompt = new Map<number, number>();
    for (const c of this.choices) cachedByPrompt.set(c.promptIndex, Math.min(cachedByPrompt.get(c.promptIndex) ?? Infinity, c.cachedTokens));
    const cachedTokens = [...cachedByPrompt.values()].reduce((a, b) => a + b, 0);
    const usage: Usage = {
      prompt_tokens: this.meta.promptTokens,
      completion_tokens: completionTokens,
      total_tokens: this.meta.promptTokens + completionTokens,
      prompt_tokens_details: { cached_tokens: cachedTokens },
    };
    const finished: FinishedRequest = {
      id: this.meta.id,
      model: this.meta.model,
      tenant: this.meta.tenant,
      status,
      promptTokens: usage.prompt_tokens,
      cachedTokens,
      completionTokens,
      prefillSeconds: this.choices.reduce((a, c) => a + c.prefillSeconds, 0),
      decodeSeconds: this.choices.reduce((a, c) => a + c.decodeSeconds, 0),
      arrivalMs: this.meta.arrivalMs,
      endMs: Date.now(),
      ttftSeconds: this.firstTokenMs === undefined ? undefined : (this.firstTokenMs - this.meta.arrivalMs) / 1000,
      interTokenSeconds: this.gaps,
    };
    try {
      usage.cost = this.meter.requestFinished(finished);
    } catch (err) {
      this.logger.error({ err, requestId: this.meta.id }, 'the meter failed to record a request');
    }
    return { status, usage, error };
  }
}
