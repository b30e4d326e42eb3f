/**
 * Thousands of generated malformed and hostile requests (bad JSON, wrong types, boundary numbers, huge strings,
 * invalid UTF-8, deep nesting, path traversal, bad encodings, methods and keys): every answer must be a 4xx in
 * OpenAI's error shape, none a 5xx, and the server must serve a valid request afterwards.
 */
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type RunningServer } from '../src/server/start.ts';
import { randomLike } from './helpers/models.ts';
import { startServerWith } from './helpers/server.ts';

const KEY = 'sk-fuzz-key-0123456789';
const CASES = 3000;

/** mulberry32: a small seeded PRNG, so that a failure reproduces. */
function rng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)];
  return { next, int, pick };
}
type Rng = ReturnType<typeof rng>;

interface Case {
  what: string;
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: Buffer;
}

const BIG = 'x'.repeat(1 << 20);
const huge = (n: number) => BIG.repeat(Math.ceil(n / BIG.length)).slice(0, n);
const deep = (depth: number, open = '[', close = ']', inner = '1') => open.repeat(depth) + inner + close.repeat(depth);

/** Values that are invalid for each field (type, range or meaning), whatever the other fields hold. */
const COMMON: Record<string, unknown[]> = {
  max_tokens: [0, -1, 1.5, '5', true, [], {}, 1e308, 2 ** 53 + 1, 513, 1e6, -0.0001],
  temperature: [-0.1, 2.01, '1', [], 1e300],
  top_p: [0, -1, 1.01, 'x', null === null ? {} : 0],
  n: [0, -1, 17, 1.5, '2', 1e9, [1]],
  stop: [5, [1], ['a'.repeat(1025)], Array(17).fill('a'), {}, [null], [['x']]],
  seed: [1.5, 'x', 2 ** 64, -(2 ** 64), {}],
  presence_penalty: [-2.1, 2.1, 'x'],
  frequency_penalty: [-2.1, 2.1, []],
  stream: ['yes', 1, {}],
  stream_options: ['x', { include_usage: 'yes' }, 5],
  user: [123, {}, ['u']],
  top_k: [-2, 1.5, 'x'],
  min_p: [-0.1, 1.1, 'x'],
  repetition_penalty: [0, -1, 101, 'x'],
  ignore_eos: ['true', 1],
  min_tokens: [-1, 1.5, 'x'],
  model: ['gpt-4', '../../etc/passwd', '/etc/passwd', 'SmolLM2/../../x', '%2e%2e%2f', '', 'a'.repeat(10_000), 123, {}, [], '\u0000', 'models/.cache'],
};
const COMPLETION: Record<string, unknown[]> = {
  ...COMMON,
  prompt: [null, 123, true, {}, [], [[]], [1.5], [-1], [10_000_000], ['a', 1], [[1], 'a'], [[1], [-2]], Array(300).fill('hi'), huge(300_000)],
  logprobs: [21, -1, 1.5, true, 'x'],
  echo: ['x', 1],
};
const CHAT: Record<string, unknown[]> = {
  ...COMMON,
  messages: [
    [], 'hi', null, [{}], [{ role: 'x', content: 'a' }], [{ role: 'user' }], [{ role: 'user', content: 5 }],
    [{ role: 'user', content: [{ type: 'image_url', image_url: 'x' }] }], [{ role: 'tool', content: 'x' }],
    [{ role: 'assistant', tool_calls: [{ id: 1 }] }], [{ role: 'user', content: huge(300_000) }],
    [{ role: 'user', content: [{ type: 'text' }] }], Array(3).fill({ role: 'user', content: { text: 'x' } }),
  ],
  max_completion_tokens: [0, -5, 'x', 1e9],
  logprobs: ['x', 1],
  top_logprobs: [21, -1, 'x'],
  tools: ['x', [{ type: 'x' }], [{ type: 'function', function: { name: '' } }], [{ type: 'function' }]],
  response_format: [{ type: 'yaml' }, { type: 'json_schema' }, { type: 'json_schema', json_schema: { schema: { type: 'string', pattern: 'x' } } }, { type: 'json_schema', json_schema: { schema: { $ref: '#/nowhere' } } }, 'text', 5],
  tool_choice: ['x', 'required', { type: 'function', function: { name: 'nope' } }, { type: 'function' }, 5],
  add_special_tokens: ['x', 0],
};

const VALID_COMPLETION = { model: 'SmolLM2', prompt: 'Once upon a time', max_tokens: 1 };
const VALID_CHAT = { model: 'SmolLM2', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 1 };

const json = (v: unknown) => Buffer.from(JSON.stringify(v));

function generate(r: Rng, modelName: string): Case {
  const headers: Record<string, string> = { 'content-type': 'application/json', authorization: `Bearer ${KEY}` };
  const endpoint = r.pick(['/v1/completions', '/v1/chat/completions', '/v1/completions', '/v1/chat/completions', '/tokenize', '/detokenize']);
  const valid = endpoint === '/v1/chat/completions' ? VALID_CHAT : endpoint === '/v1/completions' ? VALID_COMPLETION : endpoint === '/tokenize' ? { prompt: 'hi' } : { tokens: [1, 2] };
  const base = { ...valid, model: modelName };
  const c = (what: string, body: Buffer | undefined, extra: Partial<Case> = {}): Case => ({ what, method: 'POST', path: endpoint, headers, body, ...extra });
  const kind = r.int(100);

  if (kind < 45) {
    // One to three fields set to invalid values.
    const table = endpoint === '/v1/chat/completions' ? CHAT : endpoint === '/v1/completions' ? COMPLETION : endpoint === '/tokenize' ? { prompt: [5, [], {}, huge(300_000)], messages: [[], 'x'], add_generation_prompt: ['x'] } : { tokens: [[-1], [1.5], ['a'], 'x', [10_000_000], null] };
    const body: Record<string, unknown> = { ...base };
    const fields = Object.keys(table);
    const names: string[] = [];
    for (let i = 0, n = 1 + r.int(3); i < n; i++) {
      const f = r.pick(fields);
      body[f] = r.pick(table[f]);
      names.push(f);
    }
    if (endpoint === '/tokenize' && names.includes('messages') && !names.includes('prompt')) delete body.prompt;
    return c(`invalid ${names.join(',')}`, json(body));
  }
  if (kind < 60) {
    // Broken JSON: truncated, garbage, JSON-ish but not JSON.
    const text = JSON.stringify(base);
    const broken = r.pick([
      () => text.slice(0, r.int(text.length)),
      () => text.replace(/"/g, "'"),
      () => text.replace('}', ',}'),
      () => `${text}}`,
      () => text.replace(/:/, ':NaN,"x":'),
      () => `// comment\n${text}`,
      () => Array.from({ length: 1 + r.int(200) }, () => String.fromCharCode(32 + r.int(95))).join(''),
      () => 'null',
      () => '"string"',
      () => '12345',
      () => `[${text}]`,
      () => text.replace(/"model"/, '"model":1,"model"').replace(/"model":1,"model"/, '"model"'.repeat(2)),
    ])();
    return c('bad JSON', Buffer.from(broken));
  }
  if (kind < 70) {
    // Invalid UTF-8 inside a string of an otherwise valid body.
    const bad = r.pick([[0xff], [0xc3, 0x28], [0xc0, 0xaf], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xe2, 0x82], [0x80]]);
    const text = Buffer.from(JSON.stringify(base));
    const at = text.indexOf('"', text.indexOf(':') + 1) + 1;
    return c('invalid UTF-8', Buffer.concat([text.subarray(0, at), Buffer.from(bad), text.subarray(at)]));
  }
  if (kind < 78) {
    // Deep nesting, in arrays or objects, inside a field or as the body.
    const depth = r.pick([65, 66, 100, 1000, 1000, 10_000, 100_000]);
    const nest = r.next() < 0.5 ? deep(depth) : deep(depth, '{"a":', '}');
    const field = r.pick(['prompt', 'messages', 'stop', 'x', 'tools', 'tokens']);
    return c(`nested ${depth}`, r.next() < 0.3 ? Buffer.from(nest) : Buffer.from(`{"model":"${modelName}","${field}":${nest}}`));
  }
  if (kind < 80) {
    // Huge: past the body limit, or huge keys and strings.
    const n = r.pick([5 * 2 ** 20, 4 * 2 ** 20 + 1, 3 * 2 ** 20]);
    const body = r.pick([
      () => Buffer.from(`{"prompt":"${huge(n)}"}`),
      () => Buffer.from(`{"${huge(n)}":1}`),
      () => Buffer.from(`{"model":"${modelName}","prompt":[${Array(Math.floor(n / 2)).fill('1').join(',')}]}`),
    ])();
    return c(`huge ${body.length}`, body);
  }
  if (kind < 87) {
    // Authentication.
    const auth = r.pick([undefined, '', 'Bearer', 'Bearer ', `Bearer ${KEY}x`, `Basic ${Buffer.from(`u:${KEY}`).toString('base64')}`, `Bearer ${huge(8000)}`, `bearer  ${KEY.slice(0, -1)}`, `Bearer ${KEY} extra`]);
    const h = { ...headers };
    if (auth === undefined) delete h.authorization;
    else h.authorization = auth;
    return c(`auth ${String(auth).slice(0, 20)}`, json(base), { headers: h });
  }
  if (kind < 92) {
    // Encodings and charsets the server does not take.
    const h = { ...headers };
    const pick = r.int(4);
    if (pick === 0) h['content-type'] = 'application/json; charset=utf-16';
    else if (pick === 1) h['content-encoding'] = 'br-x';
    else if (pick === 2) h['content-encoding'] = 'gzip';
    else h['content-type'] = 'application/json; charset=latin-9000';
    return c(`encoding ${JSON.stringify(h)}`, json(base), { headers: h });
  }
  if (kind < 97) {
    // Wrong methods and unknown or traversing paths.
    const method = r.pick(['GET', 'PUT', 'DELETE', 'PATCH', 'POST']);
    const p = r.pick([
      endpoint, '/v1/models/../../etc/passwd', '/v1/models/%2e%2e%2f%2e%2e%2fetc', '/v1/nope', '/../../etc/passwd', '/v1/completions/x',
      '/v1/models/..%2f..%2fpackage.json', '/v1/models/x%00y', '/%ff%fe',
    ]);
    if (method === 'POST' && (p === endpoint)) return c('empty object', json({}));
    if (method === 'GET' && p === endpoint) return c('GET', undefined, { method: 'PUT' });
    return c(`${method} ${p}`, method === 'GET' ? undefined : json(base), { method, path: p });
  }
  // Prototype pollution and oddly typed bodies, plus something else invalid.
  const body = r.pick([
    `{"__proto__":{"n":100,"admin":true},"model":"${modelName}","n":0}`,
    `{"constructor":{"prototype":{"x":1}},"model":"${modelName}","max_tokens":-1}`,
    `{"model":"${modelName}","prompt":{"__proto__":[]}}`,
    `{"model":"${modelName}","messages":{"length":1,"0":{"role":"user","content":"x"}}}`,
    `{"model":"${modelName}","tokens":{"length":2}}`,
  ]);
  return c('prototype', Buffer.from(body));
}

function send(agent: http.Agent, url: URL, c: Case): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const headers = { ...c.headers, ...(c.body ? { 'content-length': String(c.body.length) } : {}) };
    const req = http.request({ host: url.hostname, port: url.port, method: c.method, path: c.path, headers, agent }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (d: Buffer) => chunks.push(d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    // The server may answer (413, 401) and close before it has read a huge body.
    req.on('error', (err) => resolve({ status: -1, body: String(err) }));
    req.end(c.body);
  });
}

describe('fuzz', () => {
  let server: RunningServer;
  let modelName: string;
  const logs: Record<string, unknown>[] = [];

  beforeAll(async () => {
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-fuzz-'));
    const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line)) });
    server = await startServerWith(
      { model: randomLike('SmolLM2-135M-Instruct'), servedModelName: 'SmolLM2', host: '127.0.0.1', port: 0, device: 'cpu', dataDir, logLevel: 'info', maxNumSeqs: 4, maxModelLen: 512, kvCacheGb: 0.1, threads: 1, apiKeys: [`fuzzer:${KEY}`] },
      logger,
    );
    modelName = 'SmolLM2';
  });
  afterAll(() => server?.shutdown(1));

  it(`answers ${CASES} malformed and hostile requests with 4xx OpenAI errors, never a 5xx, and still serves`, async () => {
    const url = new URL(server.url);
    const agent = new http.Agent({ keepAlive: true, maxSockets: 8 });
    const r = rng(20_260_509);
    const cases = Array.from({ length: CASES }, () => generate(r, modelName));
    const failures: string[] = [];
    const statuses = new Map<number, number>();
    let next = 0;
    const t0 = performance.now();
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (next < cases.length) {
          const c = cases[next++];
          const res = await send(agent, url, c);
          statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
          if (res.status === -1) {
            // Only a body the server refused before reading may end in a reset.
            if (!(c.body && c.body.length > 4 * 2 ** 20) && !c.what.startsWith('auth')) failures.push(`${c.what}: connection error ${res.body}`);
            continue;
          }
          let ok = res.status >= 400 && res.status < 500;
          try {
            const body = JSON.parse(res.body);
            const e = body.error;
            ok &&= Object.keys(body).length === 1 && typeof e?.message === 'string' && e.message.length > 0 && typeof e.type === 'string' && 'param' in e && 'code' in e;
          } catch {
            ok = false;
          }
          if (!ok) failures.push(`${c.method} ${c.path} [${c.what}] → ${res.status} ${res.body.slice(0, 200)}`);
        }
      }),
    );
    const seconds = (performance.now() - t0) / 1000;
    agent.destroy();
    console.log(`fuzz: ${CASES} requests in ${seconds.toFixed(1)} s; statuses ${JSON.stringify(Object.fromEntries([...statuses].sort()))}`);
    expect(failures.slice(0, 20)).toEqual([]);
    expect([...statuses.keys()].some((s) => s >= 500)).toBe(false);
    expect(logs.filter((l) => l.msg === 'unhandled error')).toEqual([]);

    // A valid request of each kind still works.
    const headers = { 'content-type': 'application/json', authorization: `Bearer ${KEY}` };
    const completion = await fetch(`${server.url}/v1/completions`, { method: 'POST', headers, body: JSON.stringify({ ...VALID_COMPLETION, max_tokens: 3 }) });
    expect(completion.status).toBe(200);
    const chat = await fetch(`${server.url}/v1/chat/completions`, { method: 'POST', headers, body: JSON.stringify({ ...VALID_CHAT, max_tokens: 3 }) });
    expect(chat.status).toBe(200);
    expect(((await chat.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens).toBe(3);
    expect(server.engine.inFlight).toBe(0);
  });

  it('input limits: long prompts refused before tokenizing; max_tokens, n, stop, logprobs, body size, model names', async () => {
    const headers = { 'content-type': 'application/json', authorization: `Bearer ${KEY}` };
    const call = async (p: string, body: unknown) => {
      const r = await fetch(`${server.url}${p}`, { method: 'POST', headers, body: typeof body === 'string' ? body : JSON.stringify(body) });
      return { status: r.status, error: ((await r.json()) as { error: { code: string; param: string | null } }).error };
    };
    const t0 = performance.now();
    const long = await call('/v1/completions', { prompt: 'Once upon a time '.repeat(20_000), max_tokens: 1 });
    expect(performance.now() - t0).toBeLessThan(1000);
    expect(long).toMatchObject({ status: 400, error: { code: 'context_length_exceeded', param: 'prompt' } });
    expect((await call('/v1/chat/completions', { messages: [{ role: 'user', content: 'x'.repeat(400_000) }] })).error.code).toBe('context_length_exceeded');
    expect((await call('/tokenize', { prompt: 'x'.repeat(400_000) })).error.code).toBe('context_length_exceeded');
    // Counted before tokenizing: more prompts × n than the server can ever hold.
    expect((await call('/v1/completions', { prompt: Array(1000).fill('x'.repeat(1000)), n: 16 })).error.code).toBe('too_many_choices');
    expect((await call('/v1/completions', { prompt: Array(512).fill(1), max_tokens: 1 })).error.code).toBe('context_length_exceeded');
    expect((await call('/v1/completions', { prompt: 'x', max_tokens: 512 })).error).toMatchObject({ code: 'context_length_exceeded', param: 'max_tokens' });
    expect((await call('/v1/completions', { prompt: 'x', n: 17 })).error.param).toBe('n');
    expect((await call('/v1/completions', { prompt: 'x', stop: Array(17).fill('a') })).error.param).toBe('stop');
    expect((await call('/v1/completions', { prompt: 'x', stop: ['a'.repeat(1025)] })).error.param).toMatch(/^stop/);
    expect((await call('/v1/completions', { prompt: 'x', logprobs: 21 })).error.param).toBe('logprobs');
    expect((await call('/v1/completions', `{"prompt":"${'x'.repeat(4 * 2 ** 20)}"}`)).status).toBe(413);
    for (const model of ['../SmolLM2', '../../shared/models/stories260K', '/etc/passwd', 'stories260K']) {
      expect(await call('/v1/completions', { model, prompt: 'x' })).toMatchObject({ status: 404, error: { code: 'model_not_found' } });
    }
    expect((await fetch(`${server.url}/v1/models/..%2F..%2Fpackage.json`, { headers })).status).toBe(404);
    expect(new URL(server.url).hostname).toBe('127.0.0.1');
  });
});
