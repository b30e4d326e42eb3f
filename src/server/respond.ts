/**
 * The HTTP side of a generation, shared by completions and chat: admission (429/503), streamed or
 * whole responses, engine errors, the request timeout, and cancellation when the client goes away.
 */
import type { Response } from 'express';
import type { GenerationRequest, RequestEvent } from '../engine/protocol.ts';
import { costHeaders } from '../meter/meter.ts';
import type { RequestLocals, ServerState } from './context.ts';
import { ApiError, badRequest, serverError } from './errors.ts';
import { type Choice, Generation, type Outcome, type Usage } from './generation.ts';
import { SseStream } from './sse.ts';

type Part = Record<string, unknown>;

/** How one endpoint shapes its choices. */
export interface ResponseFormat {
  object: 'text_completion' | 'chat.completion';
  chunkObject: 'text_completion' | 'chat.completion.chunk';
  /** A streamed choice's first chunk, before any token (chat: the role; completions: the echo). */
  opening(choice: Choice): Part | undefined;
  /** The streamed chunk for an event, or undefined when it carries nothing to send. */
  delta(choice: Choice, event: RequestEvent): Part | undefined;
  /** A choice of the whole (non-streamed) response. */
  choice(choice: Choice): Part;
}

export interface GenerationPlan {
  id: string;
  requests: { promptIndex: number; request: GenerationRequest }[];
  promptTokens: number;
  stream: boolean;
  includeUsage: boolean;
}

export const finishReason = (c: Choice): 'stop' | 'length' => (c.finish === 'length' ? 'length' : 'stop');

/** Choices (prompts × n) the server holds at most: running plus waiting. */
export function choiceCapacity(state: ServerState): number {
  return state.ctx.engine.info.limits.maxNumSeqs + state.ctx.limits.maxQueue;
}

/** Refuses work the server cannot take now: 503 while draining, 400 past what it can ever run, 429 past maxNumSeqs + maxQueue. */
export function checkCapacity(state: ServerState, choices: number): void {
  const { ctx } = state;
  if (state.lifecycle.draining) throw new ApiError(503, 'The server is shutting down.', 'server_error', null, 'server_unavailable');
  if (ctx.engine.available === false) {
    throw new ApiError(503, 'The engine is down and restarting; please retry shortly.', 'server_error', null, 'engine_unavailable', { 'Retry-After': '5' });
  }
  const capacity = choiceCapacity(state);
  if (choices > capacity) {
    throw badRequest(`This request asks for ${choices} choices (prompts × n); this server runs at most ${capacity} at once.`, null, 'too_many_choices');
  }
  if (ctx.engine.inFlight + choices > capacity) {
    throw new ApiError(429, 'The server is overloaded; please retry shortly.', 'rate_limit_exceeded', null, 'server_overloaded', { 'Retry-After': '1' });
  }
}

export async function serveGeneration(state: ServerState, res: Response, plan: GenerationPlan, format: ResponseFormat): Promise<void> {
  const { ctx } = state;
  const locals = res.locals as RequestLocals;
  checkCapacity(state, plan.requests.length);
  // Tokens a tenant's per-minute limit reserves: prompt + every choice's max_tokens, corrected at the end.
  const reservation = state.limiter.admit(locals.tenant, plan.promptTokens + plan.requests.reduce((a, r) => a + r.request.maxTokens, 0));
  locals.submitted = true;
  locals.promptTokens = plan.promptTokens;

  const created = Math.floor(Date.now() / 1000);
  const envelope = (object: string, choices: Part[], extra: Part = {}) => ({ id: plan.id, object, created, model: ctx.modelName, choices, ...extra });
  // A streamed chunk is envelope(chunkObject, [part], usage null when asked for); only the part changes per token.
  const chunkHead = JSON.stringify(envelope(format.chunkObject, [])).slice(0, -2);
  const chunkTail = plan.includeUsage ? '],"usage":null}' : ']}';
  const sendPart = (part: Part) => sse!.sendJson(chunkHead + JSON.stringify(part) + chunkTail);

  let failed: ApiError | undefined;
  const fail = (error: ApiError): void => {
    if (failed) return;
    failed = error;
    gen.cancel();
    if (sse) {
      sse.send(error.body());
      sse.end();
    } else if (!res.headersSent) {
      res.status(error.status).set(error.headers).json(error.body());
    }
  };
  // A streaming client that stopped reading: nothing more can reach it, so cancel and close.
  const stalled = (why: string, bufferedBytes: number): void => {
    if (failed) return;
    failed = new ApiError(408, why, 'timeout', null, 'client_not_reading');
    ctx.logger.warn({ requestId: locals.requestId, bufferedBytes, reason: why }, 'stream stalled: cancelling');
    gen.cancel();
    res.destroy();
  };
  const sse = plan.stream
    ? new SseStream(res, {
        maxBufferedBytes: ctx.limits.streamBufferBytes,
        stallTimeoutMs: ctx.limits.streamStallTimeoutMs,
        onStall: stalled,
      })
    : undefined;

  sse?.open();
  const gen: Generation = new Generation(
    ctx.engine,
    ctx.meter,
    ctx.logger,
    { id: plan.id, model: ctx.modelName, tenant: locals.tenant, arrivalMs: locals.arrivalMs, promptTokens: plan.promptTokens },
    plan.requests,
    (choice, event) => {
      if (event.finish === 'error') return fail(serverError(event.error ?? 'the engine failed'));
      // A cancelled choice did not finish: no finish_reason chunk for it.
      if (!sse || failed || event.finish === 'cancelled') return;
      const part = format.delta(choice, event);
      if (part) sendPart(part);
    },
  );
  if (sse) {
    for (const choice of gen.choices) {
      const part = format.opening(choice);
      if (part) sendPart(part);
    }
  }

  const timeoutMs = ctx.limits.requestTimeoutMs;
  const timer = timeoutMs > 0
    ? setTimeout(() => fail(new ApiError(504, `The request timed out after ${timeoutMs} ms.`, 'timeout', null, 'request_timeout')), timeoutMs)
    : undefined;
  // 'close' before the response ended: the client went away, so its choices stop at the engine's next step.
  const clientGone = () => {
    if (!res.writableEnded && !gen.finished) gen.cancel();
  };
  res.on('close', clientGone);
  if (res.destroyed || !res.socket || res.socket.destroyed) clientGone();

  let outcome: Outcome;
  try {
    outcome = await gen.done;
  } finally {
    clearTimeout(timer);
  }
  state.limiter.settle(reservation, outcome.usage.total_tokens, outcome.usage.cost?.usd.usage ?? 0);
  locals.completionTokens = outcome.usage.completion_tokens;
  if (failed || res.writableEnded || res.destroyed) return;
  if (outcome.error !== undefined) return fail(serverError(outcome.error));
  if (outcome.status === 'cancelled') {
    // Neither the client nor a timeout: the server cancelled it (shutdown past its grace period).
    return fail(new ApiError(503, 'The server cancelled this request before it finished (it is shutting down); please retry.', 'server_error', null, 'server_unavailable'));
  }

  if (sse) {
    if (plan.includeUsage) sse.send(envelope(format.chunkObject, [], { usage: outcome.usage }));
    sse.end();
  } else {
    res.set(outcome.usage.cost ? costHeaders(outcome.usage.cost) : {}).json(envelope(format.object, gen.choices.map((c) => format.choice(c)), { usage: outcome.usage }));
  }
}
