/** POST /v1/chat/completions: the conversation through the model's chat template, n choices, whole or streamed. */
import type { Request, Response } from 'express';
import { NO_TEMPLATE_MESSAGE } from './chat-template.ts';
import type { RequestLocals, ServerState } from './context.ts';
import { badRequest } from './errors.ts';
import { chatLogprobs } from './logprobs.ts';
import { checkModel, checkPromptChars, engineRequest, messageChars, resolveMaxTokens } from './params.ts';
import { parse } from './schemas.ts';
import { finishReason, type ResponseFormat, serveGeneration } from './respond.ts';

export function chatHandler(state: ServerState) {
  return async (req: Request, res: Response): Promise<void> => {
    const body = parse(state.schemas.chat, req.body);
    checkModel(state, body.model);
    const template = state.chatTemplate;
    if (!template) throw badRequest(NO_TEMPLATE_MESSAGE, 'messages', 'no_chat_template');
    const locals = res.locals as RequestLocals;
    checkPromptChars(state, messageChars(body.messages) + JSON.stringify(body.tools ?? []).length, 'messages');
    const rendered = template.render(body.messages, { tools: body.tools });
    checkPromptChars(state, rendered.length, 'messages');
    const ids = template.encode(rendered, body.add_special_tokens ?? undefined);
    const maxTokens = resolveMaxTokens(state, ids.length, body.max_completion_tokens ?? body.max_tokens, state.ctx.limits.maxTokensDefault, 'messages');
    const logprobs = body.logprobs ? (body.top_logprobs ?? 0) : undefined;
    const n = body.n ?? 1;
    const requests = Array.from({ length: n }, (_, i) => ({
      promptIndex: 0,
      request: engineRequest(`${locals.requestId}-${i}`, ids, body, maxTokens, i, logprobs),
    }));

    const tt = state.tokenText;
    const format: ResponseFormat = {
      object: 'chat.completion',
      chunkObject: 'chat.completion.chunk',
      opening: (c) => ({ index: c.index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }),
      delta: (c, e) => {
        const withLogprobs = logprobs !== undefined && e.tokens.length > 0;
        if (!e.finish && e.text === '' && !withLogprobs) return undefined;
        return {
          index: c.index,
          delta: e.text !== '' || withLogprobs ? { content: e.text } : {},
          logprobs: withLogprobs ? chatLogprobs(tt, e.tokens) : null,
          finish_reason: e.finish ? finishReason(c) : null,
        };
      },
      choice: (c) => ({
        index: c.index,
        message: { role: 'assistant', content: c.text, refusal: null },
        logprobs: logprobs !== undefined ? chatLogprobs(tt, c.tokens) : null,
        finish_reason: finishReason(c),
      }),
    };

    await serveGeneration(state, res, {
      id: `chatcmpl-${locals.requestId}`,
      requests,
      promptTokens: ids.length,
      stream: body.stream ?? false,
      includeUsage: (body.stream ?? false) && (body.stream_options?.include_usage ?? false),
    }, format);
  };
}
