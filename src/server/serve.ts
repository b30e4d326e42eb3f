/**
 * The HTTP side of a generation, shared by completions and chat: admission (429/503), streamed or
 * whole responses, engine errors, the request timeout, and cancellation when the client goes away.
 */
import type { Response } from 'express';
import type { GenerationRequest, RequestEvent } from '../engine/scheduler.ts';
import type { RequestLocals, ServerState } from './context.ts';
import { ApiError, badRequest, serverError } from './errors.ts';
import { type Choice, Generation, type Usage } from './generation.ts';
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

/** Refuses work the server cannot take now: 503 while draining, 429 past maxNumSeqs + maxQueue. */
function admit(state: ServerState, choices: number): void {
  const { ctx } = state;
  if (state.draining) throw new ApiError(503, 'The server is shutting down.', 'server_error', null, 'server_unavailable');
  const capacity = ctx.engine.info.limits.maxNumSeqs + ctx.limits.maxQueue;
  if (choices > capacity) {
    throw badRequest(`This request asks for ${choices} choices (prompts × n); this server runs at most ${capacity} at once.`, null, 'too_many_choices');
  }
  if (ctx.engine.inFlight + choices > capacity) {
    throw new ApiError(429, 'The server is overloaded; please retry shortly.', 'rate_limit_exceeded', null, 'server_overloaded', { 'Retry-After': '1' });
  }
}

export function costHeaders(usage: Usage): Record<string, string> {
  const cost = usage.cost;
  if (!cost) return {};
  return {
    'x-tally-cost-usd-usage': String(cost.usd.usage),
    'x-tally-cost-usd-allocation': String(cost.usd.allocation),
    'x-tally-device-seconds-prefill': String(cost.device_seconds.prefill),
    'x-tally-device-seconds-decode': String(cost.device_seconds.decode),
  };
}

export async function serveGeneration(state: ServerState, res: Response, plan: GenerationPlan, format: ResponseFormat): Promise<void> {
  const { ctx } = state;
  const locals = res.locals as RequestLocals;
  admit(state, plan.requests.length);
  locals.submitted = true;
  locals.promptTokens = plan.promptTokens;

  const created = Math.floor(Date.now() / 1000);
  const envelope = (object: string, choices: Part[], extra: Part = {}) => ({ id: plan.id, object, created, model: ctx.modelName, choices, ...extra });
  const usageNull = plan.includeUsage ? { usage: null } : {};
  const sse = plan.stream ? new SseStream(res) : undefined;

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

  sse?.open();
  const gen: Generation = new Generation(
    ctx.engine,
    ctx.meter,
    ctx.logger,
    { id: plan.id, model: ctx.modelName, tenant: locals.tenant, arrivalMs: locals.arrivalMs, promptTokens: plan.promptTokens },
    plan.requests,
    (choice, event) => {
      if (event.finish === 'error') return fail(serverError(event.error ?? 'the engine failed'));
      if (!sse || failed) return;
      const part = format.delta(choice, event);
      if (part) sse.send(envelope(format.chunkObject, [part], usageNull));
    },
  );
  if (sse) {
    for (const choice of gen.choices) {
      const part = format.opening(choice);
      if (part) sse.send(envelope(format.chunkObject, [part], usageNull));
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

  const outcome = await gen.done;
  clearTimeout(timer);
  locals.completionTokens = outcome.usage.completion_tokens;
  if (failed || res.writableEnded || res.destroyed) return;
  if (outcome.error !== undefined) return fail(serverError(outcome.error));

  if (sse) {
    if (plan.includeUsage) sse.send(envelope(format.chunkObject, [], { usage: outcome.usage }));
    sse.end();
  } else {
    res.set(costHeaders(outcome.usage)).json(envelope(format.object, gen.choices.map((c) => format.choice(c)), { usage: outcome.usage }));
  }
}
