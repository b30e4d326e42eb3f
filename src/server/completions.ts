/** POST /v1/completions: prompts (text or token ids) × n choices, whole or streamed. */
import type { Request, Response } from 'express';
import type { RequestLocals, ServerState } from './context.ts';
import type { Choice } from './generation.ts';
import { type CompletionLogprobs, completionLogprobs, concatLogprobs, echoLogprobs } from './logprobs.ts';
import { checkModel, checkPromptChars, checkTokenIds, engineRequest, resolveMaxTokens } from './params.ts';
import { type CompletionBody, parse } from './schemas.ts';
import { checkCapacity, finishReason, type ResponseFormat, serveGeneration } from './respond.ts';

/** OpenAI's default max_tokens for completions. */
const COMPLETIONS_MAX_TOKENS = 16;

interface Prompt {
  ids: number[];
  /** What echo prepends: the prompt as given, or its decoded ids. */
  text: string;
}

function prompts(state: ServerState, prompt: CompletionBody['prompt'], n: number): Prompt[] {
  const { tokenizer } = state.ctx;
  const list: (string | number[])[] = typeof prompt === 'string' ? [prompt] : typeof prompt[0] === 'number' ? [prompt as number[]] : (prompt as (string | number[])[]);
  // Counted before anything is tokenized.
  checkCapacity(state, list.length * n);
  for (const p of list) if (typeof p === 'string') checkPromptChars(state, p.length, 'prompt');
  return list.map((p) => {
    if (typeof p === 'string') return { ids: tokenizer.encode(p), text: p };
    checkTokenIds(state, p, 'prompt');
    return { ids: p, text: tokenizer.decode(p) };
  });
}

export function completionsHandler(state: ServerState) {
  return async (req: Request, res: Response): Promise<void> => {
    const body = parse(state.schemas.completion, req.body);
    checkModel(state, body.model);
    const locals = res.locals as RequestLocals;
    const n = body.n ?? 1;
    const list = prompts(state, body.prompt, n);
    const logprobs = body.logprobs ?? undefined;
    const withTop = (logprobs ?? 0) > 0;
    const echo = body.echo ?? false;
    const defaultMax = state.ctx.limits.maxTokensDefault ?? COMPLETIONS_MAX_TOKENS;
    const requests = list.flatMap((p, promptIndex) => {
      const maxTokens = resolveMaxTokens(state, p.ids.length, body.max_tokens, defaultMax, 'prompt');
      return Array.from({ length: n }, (_, i) => ({
        promptIndex,
        request: engineRequest(`${locals.requestId}-${promptIndex * n + i}`, p.ids, body, maxTokens, i, logprobs),
      }));
    });

    const tt = state.tokenText;
    const echoText = (c: Choice) => (echo ? list[c.promptIndex].text : '');
    const echoed = (c: Choice): CompletionLogprobs | undefined => (echo && logprobs !== undefined ? echoLogprobs(tt, list[c.promptIndex].ids, withTop) : undefined);
    const offsets = requests.map((r) => (echo ? list[r.promptIndex].text.length : 0));

    const format: ResponseFormat = {
      object: 'text_completion',
      chunkObject: 'text_completion',
      opening: (c) => (echo ? { index: c.index, text: echoText(c), logprobs: echoed(c) ?? null, finish_reason: null } : undefined),
      delta: (c, e) => {
        if (!e.finish && e.text === '' && (logprobs === undefined || e.tokens.length === 0)) return undefined;
        let lp: CompletionLogprobs | null = null;
        if (logprobs !== undefined) {
          lp = completionLogprobs(tt, e.tokens, offsets[c.index], withTop);
          offsets[c.index] += lp.tokens.join('').length;
        }
        return { index: c.index, text: e.text, logprobs: lp, finish_reason: e.finish ? finishReason(c) : null };
      },
      choice: (c) => {
        let lp: CompletionLogprobs | null = null;
        if (logprobs !== undefined) {
          const generated = completionLogprobs(tt, c.tokens, echoText(c).length, withTop);
          const prompt = echoed(c);
          lp = prompt ? concatLogprobs(prompt, generated) : generated;
        }
        return { index: c.index, text: echoText(c) + c.text, logprobs: lp, finish_reason: finishReason(c) };
      },
    };

    await serveGeneration(state, res, {
      id: `cmpl-${locals.requestId}`,
      requests,
      promptTokens: list.reduce((a, p) => a + p.ids.length, 0),
      stream: body.stream ?? false,
      includeUsage: (body.stream ?? false) && (body.stream_options?.include_usage ?? false),
    }, format);
  };
}
