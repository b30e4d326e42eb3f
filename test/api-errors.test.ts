/** Every error the API reports: OpenAI's body, the right status, and a server that keeps answering. */
import OpenAI from 'openai';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { EngineClient } from '../src/engine/client/engine-client.ts';
import type { GenerationRequest, RequestEvent } from '../src/engine/protocol.ts';
import { storiesModel } from './helpers/models.ts';
import { startTestServer, type TestServer } from './helpers/server.ts';

const KEY = 'sk-good-key';
const extra = (fields: Record<string, unknown>): object => fields;

let server: TestServer;
let client: OpenAI;

interface Raw {
  status: number;
  headers: Headers;
  body: { error?: { message: string; type: string; param: string | null; code: string | null } } & Record<string, unknown>;
}

async function raw(path: string, opts: { method?: string; body?: string | Buffer | object; key?: string | null; on?: TestServer } = {}): Promise<Raw> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  const key = opts.key === undefined ? KEY : opts.key;
  if (key !== null) headers.authorization = `Bearer ${key}`;
  const body: string | Uint8Array<ArrayBuffer> | undefined =
    opts.body === undefined || typeof opts.body === 'string' ? opts.body : Buffer.isBuffer(opts.body) ? new Uint8Array(opts.body) : JSON.stringify(opts.body);
  const r = await fetch(`${(opts.on ?? server).url}${path}`, { method: opts.method ?? (body === undefined ? 'GET' : 'POST'), headers, body });
  const text = await r.text();
  return { status: r.status, headers: r.headers, body: text ? JSON.parse(text) : {} };
}

/** Asserts OpenAI's error body: {error: {message, type, param, code}}. */
function expectError(r: Raw, status: number, want: { param?: string | null; code?: string | null; message?: string } = {}): void {
  expect(r.status, JSON.stringify(r.body)).toBe(status);
  expect(Object.keys(r.body)).toEqual(['error']);
  const e = r.body.error!;
  expect(Object.keys(e).sort()).toEqual(['code', 'message', 'param', 'type']);
  expect(typeof e.message).toBe('string');
  expect(e.message.length).toBeGreaterThan(0);
  expect(typeof e.type).toBe('string');
  if (want.param !== undefined) expect(e.param).toBe(want.param);
  if (want.code !== undefined) expect(e.code).toBe(want.code);
  if (want.message !== undefined) expect(e.message).toContain(want.message);
}

/** While set, each engine request fails right after its first token, as an engine error would. */
let sabotage = false;

function faulty(engine: EngineClient): EngineClient {
  const submit = (request: GenerationRequest, listener: (e: RequestEvent) => void): void => {
    if (!sabotage) return engine.submit(request, listener);
    let failed = false;
    engine.submit(request, (e) => {
      if (failed) return;
      listener(e);
      if (e.tokens.length > 0 && !e.finish) {
        failed = true;
        engine.cancel(request.id);
        listener({ id: request.id, tokens: [], text: '', finish: 'error', error: 'engine error: injected failure' });
      }
    });
  };
  return new Proxy(engine, {
    get: (target, prop) => {
      if (prop === 'submit') return submit;
      const value = Reflect.get(target, prop, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

beforeAll(async () => {
  server = await startTestServer({
    modelDir: storiesModel(),
    wrapEngine: faulty,
    apiKeys: new Map([[KEY, 'acme'], ['sk-other-key', 'beta']]),
    limits: { maxQueue: 0, maxBodyBytes: 64 * 1024 },
  });
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: KEY, maxRetries: 0 });
});

afterAll(() => server?.close());

afterEach(async () => {
  // Whatever the last test did, the server still answers a valid request.
  const r = await client.completions.create({ model: server.modelName, prompt: 'Once upon a time', max_tokens: 2 });
  expect(r.choices[0].finish_reason).toBe('length');
});

describe('400 invalid parameters, named', () => {
  const cases: [string, object, string][] = [
    ['temperature out of range', { prompt: 'x', temperature: 3 }, 'temperature'],
    ['top_p 0', { prompt: 'x', top_p: 0 }, 'top_p'],
    ['n over maxN', { prompt: 'x', n: 9 }, 'n'],
    ['too many stop strings', { prompt: 'x', stop: ['a', 'b', 'c', 'd', 'e'] }, 'stop'],
    ['logprobs over the max', { prompt: 'x', logprobs: 21 }, 'logprobs'],
    ['max_tokens 0', { prompt: 'x', max_tokens: 0 }, 'max_tokens'],
    ['penalty out of range', { prompt: 'x', presence_penalty: -2.5 }, 'presence_penalty'],
    ['missing prompt', {}, 'prompt'],
    ['prompt of the wrong type', { prompt: 5 }, 'prompt'],
    ['negative token id', { prompt: [1, -2] }, 'prompt[1]'],
    ['token id outside the vocabulary', { prompt: [1, 600] }, 'prompt'],
    ['n as a string', { prompt: 'x', n: '2' }, 'n'],
    ['stream as a string', { prompt: 'x', stream: 'yes' }, 'stream'],
  ];
  it.each(cases)('%s', async (_name, body, param) => {
    expectError(await raw('/v1/completions', { body }), 400, { param });
  });

  it('names nested chat parameters', async () => {
    expectError(await raw('/v1/chat/completions', { body: { messages: 'hi' } }), 400, { param: 'messages' });
    expectError(await raw('/v1/chat/completions', { body: { messages: [{ role: 'user', content: 7 }] } }), 400, { param: 'messages[0].content' });
    expectError(await raw('/v1/chat/completions', { body: { messages: [{ role: 'user', content: 'x' }], top_logprobs: 2 } }), 400, { param: 'top_logprobs' });
    expectError(await raw('/tokenize', { body: { messages: [{ role: 'robot', content: 'x' }] } }), 400);
    expectError(await raw('/detokenize', { body: { tokens: [1, 1e6] } }), 400, { param: 'tokens' });
  });

  it('reaches the SDK as BadRequestError with the param', async () => {
    const err = await client.completions.create({ model: server.modelName, prompt: 'x', temperature: 2.5 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
    expect((err as InstanceType<typeof OpenAI.BadRequestError>).param).toBe('temperature');
  });

  it('refuses huge numbers, nesting and non-objects with 400, never 500', async () => {
    const bodies = [
      '{"prompt":"x","max_tokens":1e400}',
      '{"prompt":"x","seed":1e30}',
      '{"prompt":"x","temperature":1e308}',
      '{"prompt":"x","n":1e20}',
      `{"prompt":"x","deep":${'['.repeat(5000)}${']'.repeat(5000)}}`,
      '[1, 2]',
      '"just a string"',
      'null',
    ];
    for (const body of bodies) expectError(await raw('/v1/completions', { body }), 400);
    expectError(await raw('/v1/completions', { body: '{"prompt":"x","max_tokens":100000000000}' }), 400, { code: 'context_length_exceeded' });
  });

  it('explains a request past the context like vLLM', async () => {
    const r = await raw('/v1/completions', { body: { prompt: 'Once upon a time', max_tokens: 5000 } });
    expectError(r, 400, { param: 'max_tokens', code: 'context_length_exceeded', message: "This model's maximum context length is 2048 tokens. However, you requested 5005 tokens (5 in the prompt, 5000 in the completion)." });
  });

  it('says when the model has no chat template', async () => {
    const r = await raw('/v1/chat/completions', { body: { messages: [{ role: 'user', content: 'hi' }] } });
    expectError(r, 400, { message: 'no chat template; use /v1/completions or convert it with --chat-template' });
  });

  it('accepts and ignores unknown fields', async () => {
    const r = await raw('/v1/completions', { body: { prompt: 'Once', max_tokens: 2, foo: { bar: [1] }, best_of: 1, logit_bias: { '1': 5 }, suffix: null } });
    expect(r.status).toBe(200);
    expect((r.body.choices as unknown[]).length).toBe(1);
  });

  it('refuses more choices than the server can ever run', async () => {
    expectError(await raw('/v1/completions', { body: { prompt: Array(17).fill('x'), max_tokens: 1 } }), 400, { code: 'too_many_choices' });
  });
});

describe('body errors', () => {
  it('400 on invalid JSON', async () => {
    expectError(await raw('/v1/completions', { body: '{"prompt": ' }), 400, { code: 'invalid_json' });
  });

  it('400 on invalid UTF-8', async () => {
    const body = Buffer.concat([Buffer.from('{"prompt":"Once '), Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from('","max_tokens":1}')]);
    expectError(await raw('/v1/completions', { body }), 400, { code: 'invalid_encoding' });
  });

  it('413 past maxBodyBytes', async () => {
    expectError(await raw('/v1/completions', { body: { prompt: 'a '.repeat(40_000) } }), 413);
  });
});

describe('auth, routes, methods', () => {
  it('401 without or with a wrong key; the tenant, never the key, is recorded', async () => {
    expectError(await raw('/v1/completions', { body: { prompt: 'x' }, key: null }), 401, { code: 'invalid_api_key' });
    expectError(await raw('/v1/models', { key: 'sk-good-kez' }), 401, { code: 'invalid_api_key' });
    expectError(await raw('/tokenize', { body: { prompt: 'x' }, key: null }), 401);
    const sdk = await new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'nope', maxRetries: 0 }).models.list().catch((e: unknown) => e);
    expect(sdk).toBeInstanceOf(OpenAI.AuthenticationError);
    expect((await raw('/health', { key: null })).body).toEqual({ status: 'ok' });

    const other = await raw('/v1/completions', { body: { prompt: 'Once', max_tokens: 1 }, key: 'sk-other-key' });
    expect(other.status).toBe(200);
    expect(server.meter.finished.find((f) => f.id === other.body.id)!.tenant).toBe('beta');
    expect(server.logs.some((l) => l.tenant === 'beta' && l.status === 200)).toBe(true);
    expect(server.meter.rejected.some((r) => r.status === 401 && r.tenant === 'anonymous')).toBe(true);
    expect(JSON.stringify(server.logs)).not.toContain('sk-');
  });

  it('404 for an unknown model and an unknown route', async () => {
    expectError(await raw('/v1/completions', { body: { model: 'gpt-4', prompt: 'x' } }), 404, { param: 'model', code: 'model_not_found' });
    expectError(await raw('/v1/chat/completions', { body: { model: 'gpt-4', messages: [{ role: 'user', content: 'x' }] } }), 404, { code: 'model_not_found' });
    expectError(await raw('/v1/models/gpt-4'), 404, { code: 'model_not_found' });
    expectError(await raw('/v1/nope', { body: {} }), 404);
    expectError(await raw('/nope', { key: null }), 404);
    const sdk = await client.completions.create({ model: 'gpt-4', prompt: 'x' }).catch((e: unknown) => e);
    expect(sdk).toBeInstanceOf(OpenAI.NotFoundError);
  });

  it('405 for a wrong method, with Allow', async () => {
    const r = await raw('/v1/completions');
    expectError(r, 405);
    expect(r.headers.get('allow')).toBe('POST');
    expectError(await raw('/tokenize', { method: 'DELETE' }), 405);
    expectError(await raw('/v1/models', { method: 'POST', body: {} }), 405);
  });
});

describe('load and failures', () => {
  const long = { prompt: 'Once upon a time', max_tokens: 300, temperature: 0, ...extra({ ignore_eos: true }) };

  it('429 with Retry-After past maxNumSeqs + maxQueue', async () => {
    const results = await Promise.all(Array.from({ length: 24 }, () => raw('/v1/completions', { body: long })));
    const refused = results.filter((r) => r.status === 429);
    expect(refused.length).toBeGreaterThanOrEqual(1);
    expect(results.filter((r) => r.status === 200).length).toBeGreaterThanOrEqual(16);
    expect(results.every((r) => r.status === 200 || r.status === 429)).toBe(true);
    for (const r of refused) {
      expectError(r, 429);
      expect(Number(r.headers.get('retry-after'))).toBeGreaterThan(0);
    }
    expect(server.meter.rejected.some((r) => r.status === 429 && r.tenant === 'acme')).toBe(true);
  });

  it('503 while draining', async () => {
    server.setDraining(true);
    expect((await raw('/health', { key: null })).status).toBe(503);
    expectError(await raw('/v1/completions', { body: { prompt: 'x' } }), 503);
    server.setDraining(false);
    expect((await raw('/health', { key: null })).status).toBe(200);
  });

  it('500 (whole) and an SSE error event (streamed) when the engine fails', async () => {
    sabotage = true;
    try {
      expectError(await raw('/v1/completions', { body: { ...long, n: 2 } }), 500, { message: 'injected failure' });
      const stream = await client.completions.create({ model: server.modelName, ...long, stream: true });
      let chunks = 0;
      const err = await (async () => {
        for await (const _ of stream) chunks++;
      })().catch((e: unknown) => e);
      expect(chunks).toBe(1);
      expect(err).toBeInstanceOf(OpenAI.APIError);
      expect((err as Error).message).toContain('injected failure');
    } finally {
      sabotage = false;
    }
    expect(server.meter.finished.slice(-2).map((f) => f.status)).toEqual(['error', 'error']);
    const deadline = Date.now() + 1000;
    while (server.engine.inFlight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(server.engine.inFlight).toBe(0);
  });
});

describe('timeout', () => {
  let slow: TestServer;
  beforeAll(async () => {
    slow = await startTestServer({ modelDir: storiesModel(), limits: { requestTimeoutMs: 300 } });
  });
  afterAll(() => slow?.close());

  it('504 and cancellation past requestTimeoutMs, whole and streamed', async () => {
    const body = { prompt: 'Once upon a time', max_tokens: 2000, ignore_eos: true };
    expectError(await raw('/v1/completions', { body, on: slow, key: null }), 504, { code: 'request_timeout' });
    const sdk = new OpenAI({ baseURL: `${slow.url}/v1`, apiKey: 'x', maxRetries: 0 });
    const stream = await sdk.completions.create({ model: slow.modelName, ...body, stream: true });
    let text = '';
    const err = await (async () => {
      for await (const chunk of stream) text += chunk.choices[0].text;
    })().catch((e: unknown) => e);
    expect(text.length).toBeGreaterThan(0);
    expect((err as Error).message).toContain('timed out');
    const deadline = Date.now() + 1000;
    while (slow.engine.inFlight > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(slow.engine.inFlight).toBe(0);
    expect(slow.meter.finished.map((f) => f.status)).toEqual(['cancelled', 'cancelled']);
  });
});
