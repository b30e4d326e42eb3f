/** vLLM's POST /tokenize and POST /detokenize. */
import type { Request, Response } from 'express';
import { NO_TEMPLATE_MESSAGE } from './chat-template.ts';
import type { ServerState } from './context.ts';
import { badRequest } from './errors.ts';
import { checkModel, checkPromptChars, checkTokenIds, messageChars } from './params.ts';
import { parse } from './schemas.ts';

export function tokenizeHandler(state: ServerState) {
  return (req: Request, res: Response): void => {
    const body = parse(state.schemas.tokenize, req.body);
    checkModel(state, body.model);
    let tokens: number[];
    if (body.prompt != null) {
      checkPromptChars(state, body.prompt.length, 'prompt');
      tokens = state.ctx.tokenizer.encode(body.prompt, { addSpecialTokens: body.add_special_tokens ?? true });
    } else {
      const template = state.chatTemplate;
      if (!template) throw badRequest(NO_TEMPLATE_MESSAGE, 'messages', 'no_chat_template');
      checkPromptChars(state, messageChars(body.messages!) + JSON.stringify(body.tools ?? []).length, 'messages');
      const text = template.render(body.messages!, { addGenerationPrompt: body.add_generation_prompt ?? true, tools: body.tools });
      checkPromptChars(state, text.length, 'messages');
      tokens = template.encode(text, body.add_special_tokens ?? undefined);
    }
    res.json({ tokens, count: tokens.length, max_model_len: state.ctx.engine.info.limits.maxModelLen });
  };
}

export function detokenizeHandler(state: ServerState) {
  return (req: Request, res: Response): void => {
    const body = parse(state.schemas.detokenize, req.body);
    checkModel(state, body.model);
    checkTokenIds(state, body.tokens, 'tokens');
    res.json({ prompt: state.ctx.tokenizer.decode(body.tokens) });
  };
}
