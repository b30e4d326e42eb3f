/** Tool calls: the parsers, and forced calls through the openai SDK on random-weight SmolLM2 and Qwen2.5 shapes. */
import { Ajv } from 'ajv';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseToolCalls, parserForTemplate, ToolCallParser, type ToolCallParserName } from '../src/server/tool-calls.ts';
import { randomLike } from './helpers/models.ts';
import { startTestServer, type TestServer } from './helpers/server.ts';

const ajv = new Ajv({ strict: false });

const WEATHER = {
  type: 'object',
  properties: { city: { type: 'string', maxLength: 20 }, unit: { enum: ['celsius', 'fahrenheit'] }, days: { type: 'integer' } },
  required: ['city', 'unit'],
  additionalProperties: false,
};
const SEARCH = { type: 'object', properties: { query: { type: 'string' }, limit: { type: 'integer' }, filters: { type: 'array', items: { type: 'string' }, maxItems: 3 } }, required: ['query'] };
const TOOLS: OpenAI.ChatCompletionTool[] = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather for a city', parameters: WEATHER } },
  { type: 'function', function: { name: 'search', description: 'Search the web', parameters: SEARCH } },
];
const SCHEMA_OF: Record<string, object> = { get_weather: WEATHER, search: SEARCH };

/** Streams text through a parser in pieces of `size` characters; the pieces joined. */
function streamed(parser: ToolCallParserName, text: string, size: number) {
  const p = new ToolCallParser(parser);
  let content = '';
  const calls: { id?: string; name?: string; arguments: string }[] = [];
  const take = (r: ReturnType<ToolCallParser['push']>) => {
    content += r.content;
    for (const d of r.deltas) {
      if (d.id) {
        expect(d.index).toBe(calls.length);
        calls.push({ id: d.id, name: d.function.name, arguments: d.function.arguments });
      } else {
        calls[d.index].arguments += d.function.arguments;
      }
    }
  };
  for (let i = 0; i < text.length; i += size) take(p.push(text.slice(i, i + size)));
  take(p.finish());
  return { content, calls };
}

describe('tool-call parsers', () => {
  const cases: [ToolCallParserName, string, string | null, [string, object][]][] = [
    ['hermes', 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"query": "a {b} \\"c\\""}}\n</tool_call>', 'Let me check.', [['get_weather', { city: 'Paris', unit: 'celsius' }], ['search', { query: 'a {b} "c"' }]]],
    ['llama3_json', '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "fahrenheit", "days": 3}}', null, [['get_weather', { city: 'Oslo', unit: 'fahrenheit', days: 3 }]]],
    ['llama3_json', '<|python_tag|>{"name": "search", "parameters": {"query": "x"}}; {"name": "search", "parameters": {"query": "y"}}', null, [['search', { query: 'x' }], ['search', { query: 'y' }]]],
    ['mistral', ' [{"name": "search", "arguments": {"query": "bare"}}]', null, [['search', { query: 'bare' }]]],
    ['mistral', 'Sure [TOOL_CALLS][{"name": "search", "arguments": {"query": "ü"}}, {"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}]', 'Sure', [['search', { query: 'ü' }], ['get_weather', { city: 'Rome', unit: 'celsius' }]]],
  ];
  for (const [parser, text, content, calls] of cases) {
    it(`${parser}: whole and streamed in pieces alike`, () => {
      const whole = parseToolCalls(parser, text);
      expect(whole.content).toBe(content);
      expect(whole.calls.map((c) => [c.function.name, JSON.parse(c.function.arguments)])).toEqual(calls);
      for (const size of [1, 3, 7, 1000]) {
        const s = streamed(parser, text, size);
        expect(s.content.trim() || null).toBe(content);
        expect(s.calls.map((c) => [c.name, JSON.parse(c.arguments)])).toEqual(calls);
      }
    });
  }

  it('leaves text that is not a call as content', () => {
    for (const [parser, text] of [
      ['hermes', 'I use <tool in a sentence and <tool_call> nothing like a call'],
      ['llama3_json', '{"answer": 42}'],
      ['hermes', 'plain text'],
      ['mistral', '[1, 2] is a list'],
      ['mistral', '[{"a": 1}] is not a call'],
      ['hermes', '<tool_call>\n{"name": "cut", "arguments": {"a": "unfinished'],
    ] as [ToolCallParserName, string][]) {
      expect(parseToolCalls(parser, text)).toEqual({ content: text, calls: [] });
      const s = streamed(parser, text, 2);
      if (!text.includes('unfinished')) expect(s.content).toBe(text);
    }
  });

  it('picks the parser from the chat template', () => {
    expect(parserForTemplate('... <tool_call>\\n{"name": ...')).toBe('hermes');
    expect(parserForTemplate('{{ "[TOOL_CALLS]" }}')).toBe('mistral');
    expect(parserForTemplate('<|python_tag|> ipython')).toBe('llama3_json');
    expect(parserForTemplate(undefined)).toBe('hermes');
  });
});

function checkCall(call: OpenAI.ChatCompletionMessageToolCall, name?: string): void {
  expect(call.type).toBe('function');
  expect(call.id).toMatch(/^call_/);
  if (call.type !== 'function') return;
  if (name) expect(call.function.name).toBe(name);
  const schema = SCHEMA_OF[call.function.name];
  expect(schema, call.function.name).toBeDefined();
  const validate = ajv.compile(schema);
  expect(validate(JSON.parse(call.function.arguments)), `${call.function.arguments} ${JSON.stringify(validate.errors)}`).toBe(true);
}

for (const model of ['SmolLM2-135M-Instruct', 'Qwen2.5-0.5B-Instruct'] as const) {
  describe(`forced tool calls through the SDK (random-weight ${model})`, () => {
    let server: TestServer;
    let client: OpenAI;
    beforeAll(async () => {
      server = await startTestServer({ modelDir: randomLike(model), engine: { maxModelLen: 1024 } });
      client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'x', maxRetries: 0 });
    });
    afterAll(() => server?.close());

    const base = () => ({ model: server.modelName, messages: [{ role: 'user' as const, content: 'Weather in Paris?' }], tools: TOOLS, max_tokens: 80 });

    it('named tool_choice: every answer is a call to that function with valid arguments', async () => {
      for (const temperature of [1, 0]) {
        const r = await client.chat.completions.create({ ...base(), n: 4, temperature, tool_choice: { type: 'function', function: { name: 'get_weather' } } });
        for (const c of r.choices) {
          expect(c.finish_reason).toBe('tool_calls');
          expect(c.message.tool_calls).toHaveLength(1);
          checkCall(c.message.tool_calls![0], 'get_weather');
        }
      }
    });

    it('required: a valid call to one of the tools; streamed with the SDK helper', async () => {
      const r = await client.chat.completions.create({ ...base(), n: 4, tool_choice: 'required' });
      for (const c of r.choices) checkCall(c.message.tool_calls![0]);

      const stream = client.chat.completions.stream({ ...base(), tool_choice: { type: 'function', function: { name: 'search' } } });
      const done: string[] = [];
      stream.on('tool_calls.function.arguments.done', (e) => done.push(e.name));
      const final = await stream.finalChatCompletion();
      expect(final.choices[0].finish_reason).toBe('tool_calls');
      checkCall(final.choices[0].message.tool_calls![0], 'search');
      expect(done).toEqual(['search']);
    });

    it('streams id and name first, then argument pieces', async () => {
      const stream = await client.chat.completions.create({ ...base(), stream: true, tool_choice: { type: 'function', function: { name: 'get_weather' } } });
      const deltas: OpenAI.ChatCompletionChunk.Choice.Delta.ToolCall[] = [];
      let finish: string | null = null;
      for await (const chunk of stream) {
        deltas.push(...(chunk.choices[0]?.delta.tool_calls ?? []));
        finish = chunk.choices[0]?.finish_reason ?? finish;
      }
      expect(finish).toBe('tool_calls');
      expect(deltas[0]).toMatchObject({ index: 0, type: 'function', function: { name: 'get_weather', arguments: '' } });
      expect(deltas.slice(1).every((d) => d.id === undefined && d.function?.name === undefined)).toBe(true);
      expect(deltas.length).toBeGreaterThan(2);
      const args = deltas.map((d) => d.function?.arguments ?? '').join('');
      expect(ajv.compile(WEATHER)(JSON.parse(args))).toBe(true);
    });

    it('tool results and assistant calls go back through the template; a 5-turn loop stays valid', async () => {
      const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'user', content: 'Plan a trip.' }];
      for (let turn = 0; turn < 5; turn++) {
        const r = await client.chat.completions.create({ model: server.modelName, messages, tools: TOOLS, max_tokens: 60, tool_choice: 'required' });
        const msg = r.choices[0].message;
        checkCall(msg.tool_calls![0]);
        messages.push(msg as OpenAI.ChatCompletionAssistantMessageParam);
        messages.push({ role: 'tool', tool_call_id: msg.tool_calls![0].id, content: `{"result": ${turn}}` });
      }
      const t = await fetch(`${server.url}/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ messages, tools: TOOLS }) });
      const ids = ((await t.json()) as { tokens: number[] }).tokens;
      const text = server.tokenizer.decode(ids, { skipSpecialTokens: false });
      if (model === 'Qwen2.5-0.5B-Instruct') {
        expect(text).toContain('<tool_response>\n{"result": 4}\n</tool_response>');
        expect(text.match(/<tool_call>/g)!.length).toBeGreaterThanOrEqual(5);
      } else {
        expect(text).toContain('{"result": 4}');
      }
    });

    it('refuses a tool_choice that names no tool, or forces a call without tools', async () => {
      const post = (body: object) => fetch(`${server.url}/v1/chat/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
      const named = await post({ messages: [{ role: 'user', content: 'x' }], tools: TOOLS, tool_choice: { type: 'function', function: { name: 'nope' } } });
      expect(named.status).toBe(400);
      expect(((await named.json()) as { error: { param: string } }).error.param).toBe('tool_choice');
      expect((await post({ messages: [{ role: 'user', content: 'x' }], tool_choice: 'required' })).status).toBe(400);
      const bad = await post({ messages: [{ role: 'user', content: 'x' }], tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { d: { type: 'string', format: 'email' } } } } }], tool_choice: 'required' });
      expect(bad.status).toBe(400);
      expect(((await bad.json()) as { error: { message: string; param: string } }).error).toMatchObject({ param: 'tools[0].function.parameters' });
    });
  });
}

describe('forced calls in the other formats (--tool-call-parser, random-weight SmolLM2)', () => {
  for (const parser of ['llama3_json', 'mistral'] as const) {
    it(`${parser}: the forced text is that format, and it is read back as the call`, async () => {
      const server = await startTestServer({ modelDir: randomLike('SmolLM2-135M-Instruct'), engine: { maxModelLen: 512 }, toolCallParser: parser });
      try {
        const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'x', maxRetries: 0 });
        const r = await client.chat.completions.create({ model: server.modelName, messages: [{ role: 'user', content: 'x' }], tools: TOOLS, max_tokens: 80, n: 2, tool_choice: 'required' });
        for (const c of r.choices) {
          expect(c.finish_reason).toBe('tool_calls');
          checkCall(c.message.tool_calls![0]);
        }
        const raw = await fetch(`${server.url}/v1/chat/completions`, {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ messages: [{ role: 'user', content: 'x' }], tools: TOOLS, max_tokens: 80, tool_choice: { type: 'function', function: { name: 'search' } }, stream: true }),
        });
        const text = await raw.text();
        const args = [...text.matchAll(/^data: (\{.*\})$/gm)].flatMap((m) => (JSON.parse(m[1]).choices[0]?.delta.tool_calls ?? []) as { function: { name?: string; arguments: string } }[]);
        expect(args[0].function.name).toBe('search');
        expect(ajv.compile(SEARCH)(JSON.parse(args.map((d) => d.function.arguments).join('')))).toBe(true);
      } finally {
        await server.close();
      }
    });
  }
});
