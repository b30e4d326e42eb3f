/** POST /v1/chat/completions: the conversation through the model's chat template, n choices, whole or streamed. */
import type { Request, Response } from 'express';
import { NO_TEMPLATE_MESSAGE } from './chat-template.ts';
import type { RequestLocals, ServerState } from './context.ts';
import { badRequest } from './errors.ts';
import { chatLogprobs } from './logprobs.ts';
import { checkModel, checkPromptChars, engineRequest, messageChars, resolveMaxTokens } from './params.ts';
import { parse } from './schemas.ts';
import { finishReason, type ResponseFormat, serveGeneration } from './respond.ts';
import { responseFormatConstraint } from './structured-output.ts';
import { parseToolCalls, resolveToolChoice, ToolCallParser, toolCallConstraint } from './tool-calls.ts';
import type { Choice } from './generation.ts';

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
    const toolChoice = resolveToolChoice(body.tool_choice, body.tools);
    const parser = state.toolCallParser;
    const toolConstraint = toolCallConstraint(parser, body.tools ?? [], toolChoice);
    const formatConstraint = responseFormatConstraint(body.response_format);
    if (toolConstraint && formatConstraint) {
      throw badRequest('response_format and a tool_choice that forces a call cannot both constrain one answer.', 'response_format', 'invalid_request');
    }
    const constraint = toolConstraint ?? formatConstraint;
    const requests = Array.from({ length: n }, (_, i) => {
      const request = engineRequest(`${locals.requestId}-${i}`, ids, body, maxTokens, i, logprobs);
      if (constraint) request.constraint = constraint;
      return { promptIndex: 0, request };
    });
    // Tool calls are read from the output unless tool_choice is "none".
    const readCalls = toolChoice !== 'none';
    const streamParsers = new Map<number, ToolCallParser>();
    const chatFinish = (c: Choice, calls: boolean): string => (calls && c.finish !== 'length' ? 'tool_calls' : finishReason(c));

    const tt = state.tokenText;
    const format: ResponseFormat = {
      object: 'chat.completion',
      chunkObject: 'chat.completion.chunk',
      opening: (c) => ({ index: c.index, delta: { role: 'assistant', content: '' }, logprobs: null, finish_reason: null }),
      delta: (c, e) => {
        const withLogprobs = logprobs !== undefined && e.tokens.length > 0;
        let text = e.text;
        let calls: unknown[] | undefined;
        let sawCalls = false;
        if (readCalls) {
          let p = streamParsers.get(c.index);
          if (!p) streamParsers.set(c.index, (p = new ToolCallParser(parser)));
          const out = p.push(e.text);
          if (e.finish) {
            const rest = p.finish();
            out.content += rest.content;
            out.deltas.push(...rest.deltas);
          }
          text = out.content;
          if (out.deltas.length > 0) calls = out.deltas;
          sawCalls = p.sawCalls;
        }
        if (!e.finish && text === '' && !calls && !withLogprobs) return undefined;
        const delta: Record<string, unknown> = text !== '' || withLogprobs ? { content: text } : {};
        if (calls) delta.tool_calls = calls;
        return {
          index: c.index,
          delta,
          logprobs: withLogprobs ? chatLogprobs(tt, e.tokens) : null,
          finish_reason: e.finish ? chatFinish(c, sawCalls) : null,
        };
      },
      choice: (c) => {
        const parsed = readCalls ? parseToolCalls(parser, c.text) : { content: c.text, calls: [] };
        const message: Record<string, unknown> = { role: 'assistant', content: parsed.content, refusal: null };
        if (parsed.calls.length > 0) message.tool_calls = parsed.calls;
        return {
          index: c.index,
          message,
          logprobs: logprobs !== undefined ? chatLogprobs(tt, c.tokens) : null,
          finish_reason: chatFinish(c, parsed.calls.length > 0),
        };
      },
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
