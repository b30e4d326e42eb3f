/** Chat completions through the real chat templates of three published models (random weights). */
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { randomLike } from './helpers/models.ts';
import { startTestServer, type TestServer } from './helpers/server.ts';

const extra = (fields: Record<string, unknown>): object => fields;

async function tokenizeMessages(server: TestServer, body: object): Promise<number[]> {
  const r = await fetch(`${server.url}/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  expect(r.status).toBe(200);
  const json = (await r.json()) as { tokens: number[]; count: number };
  expect(json.count).toBe(json.tokens.length);
  return json.tokens;
}

const rendered = (server: TestServer, ids: number[]) => server.tokenizer.decode(ids, { skipSpecialTokens: false });
const connect = (server: TestServer) => new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'x', maxRetries: 0 });

const conversation: OpenAI.ChatCompletionMessageParam[] = [
  { role: 'system', content: 'Be brief.' },
  { role: 'user', content: [{ type: 'text', text: 'Hi' }] },
];

describe('SmolLM2 (ChatML)', () => {
  const MAX_MODEL_LEN = 96;
  let server: TestServer;
  let client: OpenAI;
  beforeAll(async () => {
    server = await startTestServer({ modelDir: randomLike('SmolLM2-135M-Instruct'), engine: { maxModelLen: MAX_MODEL_LEN } });
    client = connect(server);
  });
  afterAll(() => server?.close());

  it('renders the template once, with its own BOS', async () => {
    const ids = await tokenizeMessages(server, { messages: conversation });
    expect(rendered(server, ids)).toBe('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n');
    const noSystem = await tokenizeMessages(server, { messages: [{ role: 'user', content: 'Hello' }], add_generation_prompt: false });
    expect(rendered(server, noSystem)).toContain('You are a helpful AI assistant named SmolLM');
    expect(rendered(server, noSystem).endsWith('<|im_start|>user\nHello<|im_end|>\n')).toBe(true);
  });

  it('answers a chat completion with OpenAI shapes and usage', async () => {
    const r = await client.chat.completions.create({ model: server.modelName, messages: conversation, max_tokens: 8, temperature: 0 });
    expect(r.object).toBe('chat.completion');
    expect(r.id).toMatch(/^chatcmpl-/);
    expect(r.choices[0].message.role).toBe('assistant');
    expect(typeof r.choices[0].message.content).toBe('string');
    expect(['stop', 'length']).toContain(r.choices[0].finish_reason);
    const promptTokens = (await tokenizeMessages(server, { messages: conversation })).length;
    expect(r.usage!.prompt_tokens).toBe(promptTokens);
    expect(r.usage!.total_tokens).toBe(promptTokens + r.usage!.completion_tokens);
    expect((r.usage as unknown as { cost: { usd: { usage: number } } }).cost.usd.usage).toBeGreaterThanOrEqual(0);
  });

  it('streams the role first, then content, finish_reason and usage', async () => {
    const params = { model: server.modelName, messages: conversation, max_tokens: 10, temperature: 0, n: 2, ...extra({ ignore_eos: true }) };
    const whole = await client.chat.completions.create(params);
    const stream = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
    const chunks: OpenAI.ChatCompletionChunk[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    expect(chunks[0].object).toBe('chat.completion.chunk');
    for (const i of [0, 1]) {
      const mine = chunks.flatMap((c) => c.choices.filter((ch) => ch.index === i));
      expect(mine[0].delta).toEqual({ role: 'assistant', content: '' });
      expect(mine.map((ch) => ch.delta.content ?? '').join('')).toBe(whole.choices[i].message.content);
      expect(mine.at(-1)!.finish_reason).toBe('length');
      expect(mine.slice(0, -1).every((ch) => ch.finish_reason === null)).toBe(true);
    }
    expect(chunks.at(-1)!.choices).toEqual([]);
    expect(chunks.at(-1)!.usage!.completion_tokens).toBe(20);
  });

  it('returns chat logprobs with sorted top_logprobs', async () => {
    const r = await client.chat.completions.create({ model: server.modelName, messages: conversation, max_tokens: 6, logprobs: true, top_logprobs: 4, seed: 1, ...extra({ ignore_eos: true }) });
    const content = r.choices[0].logprobs!.content!;
    expect(content).toHaveLength(r.usage!.completion_tokens);
    // A token that ends inside a UTF-8 sequence shows as U+FFFD; its bytes are still exact.
    // Special tokens (a random model may draw them) are in logprobs but not in the text.
    const texty = content.filter((t) => !/^<\|[^|]*\|>$/.test(t.token));
    if (texty.every((t) => !t.token.includes('\uFFFD'))) expect(texty.map((t) => t.token).join('')).toBe(r.choices[0].message.content);
    expect(Buffer.concat(texty.map((t) => Buffer.from(t.bytes!))).toString('utf8')).toBe(r.choices[0].message.content);
    for (const t of content) {
      expect(t.logprob).toBeLessThanOrEqual(0);
      if (!t.token.includes('\uFFFD')) expect(Buffer.from(t.bytes!).toString('utf8')).toBe(t.token);
      expect(t.top_logprobs).toHaveLength(4);
      const values = t.top_logprobs.map((x) => x.logprob);
      expect(values).toEqual([...values].sort((a, b) => b - a));
    }
  });

  it('defaults max_tokens to the rest of the context and refuses more', async () => {
    const promptTokens = (await tokenizeMessages(server, { messages: conversation })).length;
    const r = await client.chat.completions.create({ model: server.modelName, messages: conversation, ...extra({ ignore_eos: true }) });
    expect(r.usage!.completion_tokens).toBe(MAX_MODEL_LEN - promptTokens);
    expect(r.choices[0].finish_reason).toBe('length');
    const err = await client.chat.completions.create({ model: server.modelName, messages: conversation, max_completion_tokens: MAX_MODEL_LEN }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect((err as Error).message).toContain(`maximum context length is ${MAX_MODEL_LEN} tokens. However, you requested ${promptTokens + MAX_MODEL_LEN} tokens (${promptTokens} in the messages, ${MAX_MODEL_LEN} in the completion)`);
  });
});

describe('TinyLlama (Zephyr style)', () => {
  let server: TestServer;
  beforeAll(async () => {
    server = await startTestServer({ modelDir: randomLike('TinyLlama-1.1B-Chat-v1.0') });
  });
  afterAll(() => server?.close());

  it('renders the template and adds the BOS the template lacks, once', async () => {
    const ids = await tokenizeMessages(server, { messages: conversation });
    expect(ids[0]).toBe(server.tokenizer.bosId);
    expect(ids.filter((id) => id === server.tokenizer.bosId)).toHaveLength(1);
    expect(ids).toEqual(server.tokenizer.encode('<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n'));
  });

  it('answers chat, whole and streamed', async () => {
    const client = connect(server);
    const r = await client.chat.completions.create({ model: server.modelName, messages: conversation, max_tokens: 5, temperature: 0 });
    expect(r.usage!.prompt_tokens).toBe((await tokenizeMessages(server, { messages: conversation })).length);
    const stream = await client.chat.completions.create({ model: server.modelName, messages: conversation, max_tokens: 5, temperature: 0, stream: true });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? '';
    expect(text).toBe(r.choices[0].message.content);
  });
});

describe('Qwen2.5 (tools in the template)', () => {
  let server: TestServer;
  const tools: OpenAI.ChatCompletionTool[] = [
    { type: 'function', function: { name: 'get_weather', description: 'Weather for a city', parameters: { type: 'object', properties: { city: { type: 'string' } } } } },
  ];
  beforeAll(async () => {
    server = await startTestServer({ modelDir: randomLike('Qwen2.5-0.5B-Instruct') });
  });
  afterAll(() => server?.close());

  it('renders tools into the prompt', async () => {
    const messages = [{ role: 'user', content: 'Weather in Paris?' }];
    const text = rendered(server, await tokenizeMessages(server, { messages, tools }));
    expect(text).toContain('# Tools');
    expect(text).toContain('"name": "get_weather"');
    expect(text.startsWith('<|im_start|>system\nYou are Qwen')).toBe(true);
    expect(text.endsWith('<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n')).toBe(true);
    expect(rendered(server, await tokenizeMessages(server, { messages }))).not.toContain('get_weather');
  });

  it('answers a chat request with tools and a tool-call history', async () => {
    const client = connect(server);
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'user', content: 'Weather in Paris?' },
      { role: 'assistant', content: null, tool_calls: [{ id: 'c1', type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }] },
      { role: 'tool', tool_call_id: 'c1', content: 'sunny' },
    ];
    const r = await client.chat.completions.create({ model: server.modelName, messages, tools, tool_choice: 'auto', max_tokens: 4 });
    expect(r.choices).toHaveLength(1);
    const text = rendered(server, await tokenizeMessages(server, { messages, tools }));
    expect(text).toContain('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>');
    expect(text).toContain('<tool_response>\nsunny\n</tool_response>');
    expect(r.usage!.prompt_tokens).toBe((await tokenizeMessages(server, { messages, tools })).length);
  });
});
