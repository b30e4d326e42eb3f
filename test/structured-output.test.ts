/** Structured output: the grammar automaton over three tokenizers, and response_format through the server. */
import path from 'node:path';
import { Ajv } from 'ajv';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CompiledGrammar, GrammarMatcher, TokenTable } from '../src/engine/core/grammar.ts';
import { SequenceSampler, type TokenMask } from '../src/engine/core/sampler.ts';
import { TextTokenizer } from '../src/model/tokenizer.ts';
import { responseFormatConstraint } from '../src/server/structured-output.ts';
import { randomLike, SHARED_MODELS } from './helpers/models.ts';
import { startTestServer, type TestServer } from './helpers/server.ts';

const SCHEMAS: Record<string, object> = {
  nested: {
    type: 'object',
    properties: {
      name: { type: 'string', minLength: 1, maxLength: 12 },
      age: { type: 'integer' },
      score: { type: 'number' },
      address: { type: 'object', properties: { city: { type: 'string' }, zip: { type: ['string', 'null'] } }, required: ['city'], additionalProperties: false },
    },
    required: ['name', 'address'],
    additionalProperties: false,
  },
  arrays: {
    type: 'object',
    properties: { tags: { type: 'array', items: { type: 'string', maxLength: 6 }, minItems: 1, maxItems: 3 }, matrix: { type: 'array', items: { type: 'array', items: { type: 'integer' }, maxItems: 2 }, maxItems: 2 } },
    required: ['tags', 'matrix'],
  },
  enums: {
    type: 'object',
    properties: {
      color: { enum: ['red', 'green', 'dark "blue"', 'rosé', '日本'] },
      size: { enum: [1, 12, 123, null, true] },
      kind: { const: 'fixed\\path\n' },
      ok: { type: 'boolean' },
    },
    required: ['color', 'size', 'kind', 'ok'],
  },
  refs: {
    $defs: { node: { type: 'object', properties: { v: { type: 'integer' }, next: { anyOf: [{ $ref: '#/$defs/node' }, { type: 'null' }] } }, required: ['v', 'next'] } },
    $ref: '#/$defs/node',
  },
  free: { type: 'object', properties: { anything: {}, map: { type: 'object', additionalProperties: { type: 'number' } } }, required: ['anything', 'map'] },
};

const ajv = new Ajv({ strict: false });

/**
 * Random walks through the grammar: each token drawn uniformly from the vocabulary, kept when the matcher
 * allows it, else drawn from the full mask; the text must parse and validate whenever the walk ends.
 */
function walk(tokenizer: TextTokenizer, table: TokenTable, schema: object, maxTokens: number, seed: number): { text: string; closed: boolean } {
  const g = new CompiledGrammar(responseFormatConstraint({ type: 'json_schema', json_schema: { schema } })!, table);
  const m = new GrammarMatcher(g, tokenizer.eosIds);
  let x = seed;
  const rand = (n: number): number => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return x % n;
  };
  const ids: number[] = [];
  for (let i = 0; i < maxTokens && !m.closed; i++) {
    m.budget = maxTokens - i - 1;
    let token = -1;
    for (let tries = 0; tries < 4 && token < 0; tries++) {
      const t = rand(table.bytes.length);
      if (m.allows(t)) token = t;
    }
    if (token < 0) {
      const mask = m.mask();
      const allowed = [...mask.keys()].filter((t) => mask[t]);
      expect(allowed.length).toBeGreaterThan(0);
      token = allowed[rand(allowed.length)];
    }
    if (tokenizer.eosIds.includes(token)) break;
    m.accept(token);
    ids.push(token);
  }
  return { text: tokenizer.decode(ids), closed: m.complete };
}

describe('the grammar automaton', () => {
  for (const model of ['SmolLM2-135M-Instruct', 'Qwen2.5-0.5B-Instruct', 'TinyLlama-1.1B-Chat-v1.0']) {
    it(`${model}: every random walk through every schema ends in a value that parses and validates`, () => {
      const tokenizer = TextTokenizer.load(path.join(SHARED_MODELS, model));
      const table = TokenTable.of(tokenizer, tokenizer.vocabSize);
      for (const [name, schema] of Object.entries(SCHEMAS)) {
        const validate = ajv.compile(schema);
        for (let seed = 1; seed <= 3; seed++) {
          const { text, closed } = walk(tokenizer, table, schema, 48 + seed * 8, seed);
          expect(closed, `${name}: ${text}`).toBe(true);
          const value = JSON.parse(text);
          expect(validate(value), `${name}: ${text} ${JSON.stringify(validate.errors)}`).toBe(true);
        }
      }
    });
  }

  it('inside strings, the shortcut mask is the trie walk\'s, budget tight or not', () => {
    for (const model of ['SmolLM2-135M-Instruct', 'TinyLlama-1.1B-Chat-v1.0']) {
      const tokenizer = TextTokenizer.load(path.join(SHARED_MODELS, model));
      const table = TokenTable.of(tokenizer, tokenizer.vocabSize);
      const schema = { type: 'object', properties: { s: { type: 'string', minLength: 2 }, t: { type: 'string' }, u: { type: 'string', minLength: 1, maxLength: 5 } }, required: ['s', 't', 'u'] };
      const g = new CompiledGrammar(responseFormatConstraint({ type: 'json_schema', json_schema: { schema } })!, table);
      for (const prefix of ['{"s": "', '{"s": "é', '{"s":"ab", "t": "x y', '{"s":"ab", "t": "", "u": "', '{"s":"ab", "t": "", "u": "ab', '{"s":"ab", "t": "", "u": "abcd']) {
        for (const budget of [3, 9, 10, 11, 12, 14, 1000]) {
          const m = new GrammarMatcher(g, tokenizer.eosIds);
          expect(m.acceptText(prefix)).toBe(true);
          m.budget = budget;
          const walked = m.walkMask();
          expect(Buffer.from(m.mask()).equals(Buffer.from(walked)), `${model} ${prefix} ${budget}`).toBe(true);
        }
      }
    }
  });

  it('takes exactly the valid prefixes', () => {
    const tokenizer = TextTokenizer.load(path.join(SHARED_MODELS, 'SmolLM2-135M-Instruct'));
    const table = TokenTable.of(tokenizer, tokenizer.vocabSize);
    const g = new CompiledGrammar(responseFormatConstraint({ type: 'json_schema', json_schema: { schema: SCHEMAS.enums } })!, table);
    const ok = new GrammarMatcher(g, tokenizer.eosIds);
    expect(ok.acceptText('{"color": "dark \\"blue\\"", "size": 12, "kind": "fixed\\\\path\\n", "ok": false}')).toBe(true);
    expect(ok.closed).toBe(true);
    for (const bad of ['{"colour"', '{"color": "pink"', '{"color":"red","size":2', '{"color":"red","ok"', '{"color":"red", "size":1, "kind":"fixed\\\\path\\n", "ok":true,']) {
      expect(new GrammarMatcher(g, tokenizer.eosIds).acceptText(bad), bad).toBe(false);
    }
    const str = new CompiledGrammar(responseFormatConstraint({ type: 'json_schema', json_schema: { schema: { type: 'string' } } })!, table);
    for (const bad of ['"\\ud800"', '"\\x"', '"a\nb"']) expect(new GrammarMatcher(str, []).acceptText(bad), bad).toBe(false);
    expect(new GrammarMatcher(str, []).acceptText('"日本 \\u00e9"')).toBe(true);
  });
});

describe('the sampler with a token mask', () => {
  const params = { temperature: 1, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };
  const allowedSet = new Set([3, 7, 9]);
  const counted = (maskFirst = false) => {
    const calls = { allows: 0, apply: 0 };
    const mask: TokenMask = {
      maskFirst,
      allows: (t) => (calls.allows++, allowedSet.has(t)),
      apply: (row) => {
        calls.apply++;
        for (let i = 0; i < row.length; i++) if (!allowedSet.has(i)) row[i] = -Infinity;
      },
    };
    return { mask, calls };
  };
  const logits = () => Float32Array.from({ length: 16 }, (_, i) => (i === 0 ? 9 : i === 9 ? 2 : i === 7 ? 1 : 0));

  it('greedy: the largest allowed logit, masking only when the argmax is refused', () => {
    const s = new SequenceSampler({ ...params, temperature: 0 }, [], 16);
    const { mask, calls } = counted();
    expect(s.sample(logits(), undefined, mask).token).toBe(9);
    expect(calls).toEqual({ allows: 1, apply: 1 });
    const row = logits();
    row[7] = 20;
    expect(s.sample(row, undefined, mask).token).toBe(7);
    expect(calls).toEqual({ allows: 2, apply: 1 });
  });

  it('maskFirst: masks before the draw and asks nothing', () => {
    const s = new SequenceSampler({ ...params, temperature: 0 }, [], 16);
    const { mask, calls } = counted(true);
    expect(s.sample(logits(), undefined, mask).token).toBe(9);
    expect(calls).toEqual({ allows: 0, apply: 1 });
  });

  for (const maskFirst of [false, true]) {
    it(`sampled${maskFirst ? ', masked first' : ''}: only allowed tokens, in proportion to their probabilities`, () => {
      const s = new SequenceSampler({ ...params, seed: 5, logprobs: 0 }, [], 16);
      const { mask } = counted(maskFirst);
      const seen = new Map<number, number>();
      const N = 4000;
      for (let i = 0; i < N; i++) {
        const r = s.sample(logits(), undefined, mask);
        seen.set(r.token, (seen.get(r.token) ?? 0) + 1);
        // Logprobs stay those of the model's own distribution.
        expect(r.logprob).toBeCloseTo(logits()[r.token] - Math.log(logits().reduce((a, x) => a + Math.exp(x), 0)), 5);
      }
      expect([...seen.keys()].every((t) => allowedSet.has(t))).toBe(true);
      const z = Math.exp(2) + Math.exp(1) + 1;
      expect(seen.get(9)! / N).toBeCloseTo(Math.exp(2) / z, 1);
      expect(seen.get(7)! / N).toBeCloseTo(Math.exp(1) / z, 1);
    });
  }
});

describe('response_format through the server (random-weight SmolLM2)', () => {
  let server: TestServer;
  let client: OpenAI;
  beforeAll(async () => {
    server = await startTestServer({ modelDir: randomLike('SmolLM2-135M-Instruct'), engine: { maxModelLen: 512 } });
    client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'x', maxRetries: 0 });
  });
  afterAll(() => server?.close());

  const ask = (schema: object, extra: Partial<OpenAI.ChatCompletionCreateParamsNonStreaming> = {}) =>
    client.chat.completions.create({
      model: server.modelName,
      messages: [{ role: 'user', content: 'Answer in JSON.' }],
      max_tokens: 120,
      n: 4,
      response_format: { type: 'json_schema', json_schema: { name: 'answer', schema: schema as Record<string, unknown>, strict: true } },
      ...extra,
    });

  it('json_schema: every choice of every schema parses and validates (sampled and greedy)', async () => {
    for (const [name, schema] of Object.entries(SCHEMAS)) {
      const validate = ajv.compile(schema);
      for (const temperature of [1, 0]) {
        const r = await ask(schema, { temperature, seed: 7 });
        for (const c of r.choices) {
          expect(c.finish_reason, name).toBe('stop');
          const value = JSON.parse(c.message.content!);
          expect(validate(value), `${name}: ${c.message.content}`).toBe(true);
        }
      }
    }
  });

  it('closes the value within a small max_tokens, and says length when even that cannot be done', async () => {
    const validate = ajv.compile(SCHEMAS.nested);
    const r = await ask(SCHEMAS.nested, { max_tokens: 40 });
    for (const c of r.choices) {
      expect(c.finish_reason).toBe('stop');
      expect(validate(JSON.parse(c.message.content!))).toBe(true);
      expect(r.usage!.completion_tokens).toBeLessThanOrEqual(4 * 40);
    }
    const tiny = await ask(SCHEMAS.nested, { max_tokens: 3, n: 1 });
    expect(tiny.choices[0].finish_reason).toBe('length');
  });

  it('json_object: an object, also streamed', async () => {
    const r = await client.chat.completions.create({ model: server.modelName, messages: [{ role: 'user', content: 'JSON' }], max_tokens: 60, n: 3, response_format: { type: 'json_object' } });
    for (const c of r.choices) {
      const v = JSON.parse(c.message.content!);
      expect(typeof v === 'object' && v !== null && !Array.isArray(v)).toBe(true);
    }
    const stream = await client.chat.completions.create({ model: server.modelName, messages: [{ role: 'user', content: 'JSON' }], max_tokens: 60, stream: true, response_format: { type: 'json_schema', json_schema: { name: 'a', schema: SCHEMAS.enums as Record<string, unknown> } } });
    let text = '';
    for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? '';
    expect(ajv.compile(SCHEMAS.enums)(JSON.parse(text))).toBe(true);
  });

  it('refuses keywords it cannot enforce with a 400 that names them', async () => {
    for (const [schema, named] of [
      [{ type: 'string', pattern: '^a+$' }, 'pattern'],
      [{ type: 'object', properties: { d: { type: 'string', format: 'date' } } }, 'format'],
      [{ type: 'integer', minimum: 3, multipleOf: 2 }, 'minimum, multipleOf'],
      [{ allOf: [{ type: 'string' }] }, 'allOf'],
    ] as const) {
      const r = await fetch(`${server.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ messages: [{ role: 'user', content: 'x' }], response_format: { type: 'json_schema', json_schema: { name: 'a', schema } } }),
      });
      expect(r.status).toBe(400);
      const body = (await r.json()) as { error: { message: string; param: string } };
      expect(body.error.message).toContain(named);
      expect(body.error.param).toBe('response_format.json_schema.schema');
    }
    const r = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ messages: [{ role: 'user', content: 'x' }], response_format: { type: 'yaml' } }),
    });
    expect(r.status).toBe(400);
  });
});

describe('response_format on a SentencePiece byte-fallback vocabulary (random-weight TinyLlama)', () => {
  it('every choice parses and validates, streamed or not', async () => {
    const server = await startTestServer({ modelDir: randomLike('TinyLlama-1.1B-Chat-v1.0'), engine: { maxModelLen: 512 } });
    try {
      const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'x', maxRetries: 0 });
      for (const name of ['nested', 'enums']) {
        const validate = ajv.compile(SCHEMAS[name]);
        const response_format = { type: 'json_schema' as const, json_schema: { name, schema: SCHEMAS[name] as Record<string, unknown> } };
        const r = await client.chat.completions.create({ model: server.modelName, messages: [{ role: 'user', content: 'JSON please' }], max_tokens: 100, n: 4, response_format });
        for (const c of r.choices) expect(validate(JSON.parse(c.message.content!)), c.message.content!).toBe(true);
        const stream = await client.chat.completions.create({ model: server.modelName, messages: [{ role: 'user', content: 'JSON please' }], max_tokens: 100, stream: true, response_format });
        let text = '';
        for await (const chunk of stream) text += chunk.choices[0]?.delta.content ?? '';
        expect(validate(JSON.parse(text)), text).toBe(true);
      }
    } finally {
      await server.close();
    }
  });
});
