/** From validated request bodies to the engine's GenerationRequest, with the checks that need the model. */
import type { GenerationRequest } from '../engine/protocol.ts';
import type { SamplingParams } from '../engine/protocol.ts';
import { ApiError, badRequest } from './errors.ts';
import type { ChatMessage, SamplingBody } from './schemas.ts';
import type { ServerState } from './context.ts';

export function checkModel(state: ServerState, model: string | null | undefined): void {
  if (model != null && model !== state.ctx.modelName) {
    throw new ApiError(404, `The model \`${model}\` does not exist.`, 'invalid_request_error', 'model', 'model_not_found');
  }
}

/** Token ids given by the client must exist in the vocabulary. */
export function checkTokenIds(state: ServerState, ids: number[], param: string): void {
  const vocab = state.ctx.engine.info.vocabSize;
  const bad = ids.find((id) => id >= vocab);
  if (bad !== undefined) throw badRequest(`Token id ${bad} is out of range: the vocabulary has ${vocab} tokens.`, param, 'invalid_value');
}

/**
 * The number of new tokens to generate for a prompt, or a 400 when prompt + completion does not fit
 * the context (worded as vLLM words it). `defaultMax` undefined means "the rest of the context".
 */
export function resolveMaxTokens(state: ServerState, promptTokens: number, requested: number | null | undefined, defaultMax: number | undefined, what: 'prompt' | 'messages'): number {
  const { maxModelLen, kvCapacityTokens } = state.ctx.engine.info.limits;
  if (promptTokens === 0) throw badRequest(`The ${what === 'prompt' ? 'prompt' : 'rendered messages'} must contain at least one token.`, what, 'empty_prompt');
  const rest = maxModelLen - promptTokens;
  const maxTokens = requested ?? (defaultMax === undefined ? rest : Math.min(defaultMax, rest));
  if (maxTokens < 1 || promptTokens + maxTokens > maxModelLen) {
    const completion = Math.max(maxTokens, 1);
    throw badRequest(
      `This model's maximum context length is ${maxModelLen} tokens. However, you requested ${promptTokens + completion} tokens ` +
        `(${promptTokens} in the ${what}, ${completion} in the completion). Please reduce the length of the ${what} or completion.`,
      requested == null ? what : 'max_tokens',
      'context_length_exceeded',
    );
  }
  if (promptTokens + maxTokens > kvCapacityTokens) {
    throw badRequest(`The request needs ${promptTokens + maxTokens} KV-cache tokens; this server's cache holds ${kvCapacityTokens}.`, 'max_tokens', 'context_length_exceeded');
  }
  return maxTokens;
}

/**
 * Refuses text too long for the context before it is tokenized (tokenizing runs on the main thread, and a
 * body of megabytes would hold it for seconds).
 */
export function checkPromptChars(state: ServerState, chars: number, param: string): void {
  if (chars > state.ctx.limits.maxPromptChars) {
    throw badRequest(
      `The ${param} has ${chars} characters, more than this model's context of ${state.ctx.engine.info.limits.maxModelLen} tokens can hold ` +
        `(this server tokenizes at most ${state.ctx.limits.maxPromptChars} characters). Please reduce the length of the ${param}.`,
      param,
      'context_length_exceeded',
    );
  }
}

/** Characters of a conversation's contents and names, before the template adds its own. */
export function messageChars(messages: ChatMessage[]): number {
  let n = 0;
  for (const m of messages) {
    const c = m.content;
    if (typeof c === 'string') n += c.length;
    else if (Array.isArray(c)) for (const part of c) n += part.text.length;
    if ('name' in m && typeof m.name === 'string') n += m.name.length;
    if ('tool_calls' in m && m.tool_calls) n += JSON.stringify(m.tool_calls).length;
  }
  return n;
}

export function stopStrings(stop: string | string[] | null | undefined): string[] {
  const list = stop == null ? [] : typeof stop === 'string' ? [stop] : stop;
  return list.filter((s) => s.length > 0);
}

/** The engine request for choice `i` of one prompt; with a seed, choice i samples with seed + i. */
export function engineRequest(id: string, promptIds: number[], body: SamplingBody, maxTokens: number, i: number, logprobs: number | undefined): GenerationRequest {
  const sampling: SamplingParams = {
    temperature: body.temperature ?? 1,
    topP: body.top_p ?? 1,
    topK: body.top_k ?? 0,
    minP: body.min_p ?? 0,
    repetitionPenalty: body.repetition_penalty ?? 1,
    presencePenalty: body.presence_penalty ?? 0,
    frequencyPenalty: body.frequency_penalty ?? 0,
    seed: body.seed == null ? undefined : body.seed + i,
    logprobs,
  };
  return {
    id,
    promptIds,
    maxTokens,
    minTokens: Math.min(body.min_tokens ?? 0, maxTokens),
    ignoreEos: body.ignore_eos ?? false,
    stop: stopStrings(body.stop),
    stopTokenIds: [],
    sampling,
  };
}
