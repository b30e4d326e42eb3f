/**
 * Request validation for every endpoint, in one place: OpenAI's parameters and ranges plus vLLM's
 * sampling extensions. Unknown fields are stripped (accepted and ignored); null means "not given".
 */
import { z } from 'zod';
import { badRequest, fromZod } from './errors.ts';

export interface SchemaLimits {
  maxN: number;
  maxStop: number;
  maxLogprobs: number;
}

/**
 * Prompts and token lists are validated by hand: zod's union would try every alternative on every element,
 * building an issue per element, and a few MB of numbers would hold the main thread for seconds.
 */
const isTokenIds = (v: unknown): v is number[] => {
  if (!Array.isArray(v) || v.length === 0) return false;
  for (const x of v) if (!Number.isSafeInteger(x) || (x as number) < 0) return false;
  return true;
};
const PROMPT_ERROR = 'prompt must be a string, an array of strings, an array of token ids, or an array of token-id arrays';

/** Where a prompt goes wrong: the path inside it and what is wrong, or undefined when it is valid. */
function promptIssue(v: unknown): { path: number[]; message: string } | undefined {
  const badId = (a: unknown[]) => a.findIndex((x) => !Number.isSafeInteger(x) || (x as number) < 0);
  const idMessage = (x: unknown) => `token ids must be non-negative integers (got ${JSON.stringify(x)?.slice(0, 40)})`;
  if (v === undefined) return { path: [], message: 'prompt is required' };
  if (typeof v === 'string') return undefined;
  if (!Array.isArray(v) || v.length === 0) return { path: [], message: PROMPT_ERROR };
  if (typeof v[0] === 'number') {
    const i = badId(v);
    return i < 0 ? undefined : { path: [i], message: idMessage(v[i]) };
  }
  if (typeof v[0] === 'string') {
    const i = v.findIndex((x) => typeof x !== 'string');
    return i < 0 ? undefined : { path: [i], message: PROMPT_ERROR };
  }
  for (let j = 0; j < v.length; j++) {
    const ids = v[j];
    if (!Array.isArray(ids) || ids.length === 0) return { path: [j], message: PROMPT_ERROR };
    const i = badId(ids);
    if (i >= 0) return { path: [j, i], message: idMessage(ids[i]) };
  }
  return undefined;
}
const prompt = z.custom<string | string[] | number[] | number[][]>().superRefine((v, ctx) => {
  const issue = promptIssue(v);
  if (issue) ctx.addIssue({ code: 'custom', message: issue.message, path: issue.path });
});
const tokenList = z.custom<number[]>((v) => Array.isArray(v) && (v.length === 0 || isTokenIds(v)), { error: 'tokens must be an array of non-negative integers' });
/** The engine scans held-back text against every stop string at each token; long ones cost quadratically. */
const MAX_STOP_LENGTH = 1024;
const stopString = z.string().max(MAX_STOP_LENGTH);

const textPart = z.object({ type: z.literal('text', { error: "only content parts of type 'text' are supported" }), text: z.string() });
const content = z.union([z.string(), z.array(textPart)], { error: "content must be a string or an array of {type: 'text', text} parts" });

const toolCall = z.object({
  id: z.string(),
  type: z.literal('function'),
  function: z.object({ name: z.string(), arguments: z.string() }),
});

const message = z.discriminatedUnion(
  'role',
  [
    z.object({ role: z.enum(['system', 'developer']), content, name: z.string().nullish() }),
    z.object({ role: z.literal('user'), content, name: z.string().nullish() }),
    z.object({ role: z.literal('assistant'), content: content.nullish(), name: z.string().nullish(), tool_calls: z.array(toolCall).nullish() }),
    z.object({ role: z.literal('tool'), content, tool_call_id: z.string() }),
  ],
  { error: "role must be one of 'system', 'developer', 'user', 'assistant', 'tool'" },
);

const tool = z.object({
  type: z.literal('function'),
  function: z.object({
    name: z.string().min(1),
    description: z.string().nullish(),
    parameters: z.record(z.string(), z.unknown()).nullish(),
    strict: z.boolean().nullish(),
  }),
});

const messages = z.array(message).min(1);
const tools = z.array(tool).nullish();

export function makeSchemas(limits: SchemaLimits) {
  const common = {
    model: z.string().nullish(),
    max_tokens: z.int().min(1).nullish(),
    temperature: z.number().min(0).max(2).nullish(),
    top_p: z.number().gt(0).max(1).nullish(),
    n: z.int().min(1).max(limits.maxN).nullish(),
    stop: z.union([stopString, z.array(stopString).max(limits.maxStop)], { error: `stop must be a string or an array of at most ${limits.maxStop} strings of at most ${MAX_STOP_LENGTH} characters` }).nullish(),
    seed: z.int().nullish(),
    presence_penalty: z.number().min(-2).max(2).nullish(),
    frequency_penalty: z.number().min(-2).max(2).nullish(),
    stream: z.boolean().nullish(),
    stream_options: z.object({ include_usage: z.boolean().nullish() }).nullish(),
    user: z.string().nullish(),
    // vLLM extensions
    top_k: z.int().min(-1).nullish(),
    min_p: z.number().min(0).max(1).nullish(),
    repetition_penalty: z.number().gt(0).max(100).nullish(),
    ignore_eos: z.boolean().nullish(),
    min_tokens: z.int().min(0).nullish(),
  };

  const completion = z.object({
    ...common,
    prompt,
    logprobs: z.int().min(0).max(limits.maxLogprobs).nullish(),
    echo: z.boolean().nullish(),
  });

  const chat = z
    .object({
      ...common,
      messages,
      max_completion_tokens: z.int().min(1).nullish(),
      logprobs: z.boolean().nullish(),
      top_logprobs: z.int().min(0).max(limits.maxLogprobs).nullish(),
      tools,
      tool_choice: z.unknown().optional(),
      response_format: z
        .discriminatedUnion('type', [
          z.object({ type: z.literal('text') }),
          z.object({ type: z.literal('json_object') }),
          z.object({
            type: z.literal('json_schema'),
            json_schema: z.object({
              name: z.string().nullish(),
              description: z.string().nullish(),
              schema: z.record(z.string(), z.unknown()).nullish(),
              strict: z.boolean().nullish(),
            }),
          }),
        ], { error: "response_format type must be 'text', 'json_object' or 'json_schema' (with json_schema: {name, schema, strict})" })
        .nullish(),
      add_special_tokens: z.boolean().nullish(),
    })
    .refine((b) => b.top_logprobs == null || b.logprobs === true, { message: 'top_logprobs requires logprobs to be true', path: ['top_logprobs'] });

  const tokenize = z
    .object({
      model: z.string().nullish(),
      prompt: z.string().nullish(),
      messages: messages.nullish(),
      tools,
      add_generation_prompt: z.boolean().nullish(),
      add_special_tokens: z.boolean().nullish(),
    })
    .refine((b) => (b.prompt == null) !== (b.messages == null), { message: 'give exactly one of prompt or messages', path: ['prompt'] });

  const detokenize = z.object({ model: z.string().nullish(), tokens: tokenList });

  return { completion, chat, tokenize, detokenize };
}

export type Schemas = ReturnType<typeof makeSchemas>;
export type CompletionBody = z.infer<Schemas['completion']>;
export type ChatBody = z.infer<Schemas['chat']>;
export type TokenizeBody = z.infer<Schemas['tokenize']>;
export type DetokenizeBody = z.infer<Schemas['detokenize']>;
export type ChatMessage = z.infer<typeof message>;
export type Tool = z.infer<typeof tool>;
/** The sampling fields both generation endpoints share. */
export type SamplingBody = Pick<
  CompletionBody,
  'temperature' | 'top_p' | 'top_k' | 'min_p' | 'repetition_penalty' | 'presence_penalty' | 'frequency_penalty' | 'seed' | 'stop' | 'min_tokens' | 'ignore_eos'
>;

/** Parses `body` or throws a 400 that names the offending parameter. */
export function parse<T extends z.ZodType>(schema: T, body: unknown): z.infer<T> {
  if (typeof body !== 'object' || body === null || Array.isArray(body)) {
    throw badRequest('The request body must be a JSON object.', null, 'invalid_body');
  }
  const result = schema.safeParse(body);
  if (!result.success) throw fromZod(result.error);
  return result.data;
}
