/** Completions, streaming, logprobs, seeds, tokenize and cancellation, through the official OpenAI SDK. */
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CostReport } from '../src/meter/types.ts';
import { storiesModel } from './helpers/models.ts';
import { startTestServer, type TestServer } from './helpers/server.ts';

let server: TestServer;
let client: OpenAI;
let model: string;

/** vLLM extensions the SDK does not type. */
const extra = (fields: Record<string, unknown>): object => fields;
const costOf = (usage: unknown): CostReport => (usage as { cost: CostReport }).cost;

async function tokenize(prompt: string): Promise<number[]> {
  const r = await fetch(`${server.url}/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt }) });
  return ((await r.json()) as { tokens: number[] }).tokens;
}

async function until(condition: () => boolean, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!condition() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
  return condition();
}

beforeAll(async () => {
  server = await startTestServer({ modelDir: storiesModel() });
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'x', maxRetries: 0 });
  model = server.modelName;
});

afterAll(async () => {
  await server?.close();
});

describe('completions', () => {
  it('lists the served model', async () => {
    const list = await client.models.list();
    expect(list.data.map((m) => m.id)).toEqual([model]);
    expect((await client.models.retrieve(model)).id).toBe(model);
  });

  it('greedy-completes the little boy with a leading space, usage and cost', async () => {
    const prompt = 'Once upon a time, there was a little boy';
    const { data, response } = await client.completions
      .create({ model, prompt, max_tokens: 8, temperature: 0 })
      .withResponse();
    expect(data.object).toBe('text_completion');
    expect(data.id).toMatch(/^cmpl-/);
    expect(data.choices).toHaveLength(1);
    expect(data.choices[0].text.startsWith(' named Timmy')).toBe(true);
    expect(data.choices[0].finish_reason).toBe('length');
    expect(data.usage).toMatchObject({ prompt_tokens: (await tokenize(prompt)).length, completion_tokens: 8, total_tokens: (await tokenize(prompt)).length + 8 });
    const cost = costOf(data.usage);
    expect(cost.device_seconds.decode).toBeGreaterThan(0);
    expect(Number(response.headers.get('x-tally-cost-usd-usage'))).toBe(cost.usd.usage);
    expect(Number(response.headers.get('x-tally-device-seconds-prefill'))).toBe(cost.device_seconds.prefill);
    expect(response.headers.get('x-tally-cost-usd-allocation')).not.toBeNull();
    expect(response.headers.get('x-tally-device-seconds-decode')).not.toBeNull();

    const finished = server.meter.finished.find((f) => f.id === data.id)!;
    expect(finished).toMatchObject({ status: 'completed', tenant: 'anonymous', completionTokens: 8, model });
    expect(finished.ttftSeconds).toBeGreaterThan(0);
    expect(finished.interTokenSeconds).toHaveLength(7);
    expect(server.logs.some((l) => l.requestId === data.id.slice(5) && l.path === '/v1/completions' && l.status === 200 && l.completionTokens === 8)).toBe(true);
  });

  it('accepts token-id prompts and echoes the prompt', async () => {
    const prompt = 'Once upon a time';
    const ids = await tokenize(prompt);
    const byText = await client.completions.create({ model, prompt, max_tokens: 6, temperature: 0 });
    const byIds = await client.completions.create({ model, prompt: ids, max_tokens: 6, temperature: 0, echo: true });
    expect(byIds.choices[0].text).toBe(prompt + byText.choices[0].text);
    expect(byIds.usage!.prompt_tokens).toBe(ids.length);
  });

  it('gives prompts × n choices, index = prompt * n + i, seeds seed + i', async () => {
    const prompts = ['Once upon a time', 'The cat'];
    const many = await client.completions.create({ model, prompt: prompts, n: 2, max_tokens: 6, temperature: 0 });
    expect(many.choices.map((c) => c.index)).toEqual([0, 1, 2, 3]);
    for (const [p, prompt] of prompts.entries()) {
      const one = await client.completions.create({ model, prompt, max_tokens: 6, temperature: 0 });
      expect(many.choices[p * 2].text).toBe(one.choices[0].text);
      expect(many.choices[p * 2 + 1].text).toBe(one.choices[0].text);
    }
    const promptTokens = (await tokenize(prompts[0])).length + (await tokenize(prompts[1])).length;
    expect(many.usage).toMatchObject({ prompt_tokens: promptTokens, completion_tokens: 24 });

    const seeded = await client.completions.create({ model, prompt: prompts[0], n: 3, seed: 7, temperature: 1, max_tokens: 12 });
    for (let i = 0; i < 3; i++) {
      const alone = await client.completions.create({ model, prompt: prompts[0], seed: 7 + i, temperature: 1, max_tokens: 12 });
      expect(seeded.choices[i].text).toBe(alone.choices[0].text);
    }
  });

  it('reproduces with a seed and varies across seeds', async () => {
    const ask = (seed: number) => client.completions.create({ model, prompt: 'Once upon a time', seed, temperature: 1, max_tokens: 30 });
    const [a, b, c] = await Promise.all([ask(42), ask(42), ask(43)]);
    expect(a.choices[0].text).toBe(b.choices[0].text);
    expect(c.choices[0].text).not.toBe(a.choices[0].text);
  });

  it('stops before a stop string that spans tokens, whole and streamed', async () => {
    const prompt = 'Once upon a time';
    const full = (await client.completions.create({ model, prompt, max_tokens: 40, temperature: 0 })).choices[0].text;
    const stop = 'ily. Sh';
    expect(full).toContain(stop);
    const expected = full.slice(0, full.indexOf(stop));

    const whole = await client.completions.create({ model, prompt, max_tokens: 40, temperature: 0, stop: [stop, 'never appears'] });
    expect(whole.choices[0].text).toBe(expected);
    expect(whole.choices[0].finish_reason).toBe('stop');

    const stream = await client.completions.create({ model, prompt, max_tokens: 40, temperature: 0, stop, stream: true });
    let text = '';
    const finishes: (string | null)[] = [];
    for await (const chunk of stream) {
      text += chunk.choices[0].text;
      expect(text).not.toContain(stop);
      finishes.push(chunk.choices[0].finish_reason);
    }
    expect(text).toBe(expected);
    expect(finishes.at(-1)).toBe('stop');
    expect(finishes.slice(0, -1).every((f) => f === null)).toBe(true);
  });

  it('returns logprobs: ≤ 0, top sorted, counts right', async () => {
    const r = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 10, temperature: 0, logprobs: 3 });
    const lp = r.choices[0].logprobs!;
    expect(lp.tokens).toHaveLength(10);
    expect(lp.tokens!.join('')).toBe(r.choices[0].text);
    expect(lp.text_offset).toHaveLength(10);
    expect(lp.text_offset![0]).toBe(0);
    for (const [i, top] of lp.top_logprobs!.entries()) {
      const values = Object.values(top);
      expect(values).toHaveLength(3);
      expect(values).toEqual([...values].sort((a, b) => b - a));
      expect(lp.token_logprobs![i]).toBeLessThanOrEqual(0);
      expect(Math.max(...values)).toBeCloseTo(lp.token_logprobs![i], 5); // greedy picks the top token
      for (const v of values) expect(v).toBeLessThanOrEqual(0);
    }
    const none = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 3, temperature: 0, logprobs: 0 });
    expect(none.choices[0].logprobs!.token_logprobs).toHaveLength(3);
    expect(none.choices[0].logprobs!.top_logprobs).toBeNull();
  });

  it('streams token by token with usage last, matching the whole response', async () => {
    const prompt = 'Once upon a time';
    const whole = await client.completions.create({ model, prompt, max_tokens: 12, temperature: 0, n: 2 });
    const stream = await client.completions.create({ model, prompt, max_tokens: 12, temperature: 0, n: 2, stream: true, stream_options: { include_usage: true } });
    const texts = ['', ''];
    const chunks: OpenAI.Completion[] = [];
    for await (const chunk of stream) chunks.push(chunk);
    for (const c of chunks) for (const ch of c.choices) texts[ch.index] += ch.text;
    expect(texts).toEqual(whole.choices.map((c) => c.text));
    expect(chunks.length).toBeGreaterThanOrEqual(2 * 10);
    const last = chunks.at(-1)!;
    expect(last.choices).toEqual([]);
    expect(last.usage).toMatchObject({ prompt_tokens: (await tokenize(prompt)).length, completion_tokens: 24 });
    expect(costOf(last.usage).usd.usage).toBeGreaterThan(0);
    expect(chunks.slice(0, -1).every((c) => c.usage === null)).toBe(true);
    const { id, created } = chunks[0];
    expect(id).toMatch(/^cmpl-/);
    for (const c of chunks) expect(c).toMatchObject({ id, created, object: 'text_completion', model });
  });

  it('counts finish_reason stop vs length and honours min_tokens / ignore_eos', async () => {
    const stopped = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 30, temperature: 0, stop: ' there' });
    expect(stopped.choices[0]).toMatchObject({ text: ',', finish_reason: 'stop' });
    const long = await client.completions.create({ model, prompt: 'Once upon a time', max_tokens: 30, temperature: 0, stop: ' there', ...extra({ min_tokens: 5, ignore_eos: true }) });
    expect(long.choices[0].text.length).toBeGreaterThan(1);
  });
});

describe('tokenize', () => {
  it('round-trips through /tokenize and /detokenize', async () => {
    const post = async (path: string, body: object) =>
      (await fetch(`${server.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) })).json();
    const t = (await post('/tokenize', { model, prompt: 'Once upon a time' })) as { tokens: number[]; count: number; max_model_len: number };
    expect(t.tokens).toEqual(server.tokenizer.encode('Once upon a time'));
    expect(t.count).toBe(t.tokens.length);
    expect(t.max_model_len).toBe(server.engine.info.limits.maxModelLen);
    expect(await post('/detokenize', { tokens: t.tokens })).toEqual({ prompt: 'Once upon a time' });
  });
});

describe('cancellation', () => {
  const long = { model, prompt: 'Once upon a time', max_tokens: 2000, temperature: 0, ...extra({ ignore_eos: true }) };

  it('cancels the generation when a streaming client disconnects', async () => {
    const stream = await client.completions.create({ ...long, model, stream: true });
    let chunks = 0;
    for await (const _ of stream) if (++chunks === 3) break; // breaking aborts the request
    expect(await until(() => server.engine.inFlight === 0, 1500)).toBe(true);
    expect(await until(() => server.meter.finished.at(-1)?.status === 'cancelled', 500)).toBe(true);
    expect(server.meter.finished.at(-1)!.completionTokens).toBeLessThan(1000);
  });

  it('cancels the generation when a non-streaming client goes away', async () => {
    const controller = new AbortController();
    const done = fetch(`${server.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(long), signal: controller.signal }).catch((e: Error) => e);
    expect(await until(() => server.engine.inFlight === 1, 1000)).toBe(true);
    await new Promise((r) => setTimeout(r, 50));
    controller.abort();
    expect(await done).toBeInstanceOf(Error);
    expect(await until(() => server.engine.inFlight === 0, 1500)).toBe(true);
    expect(await until(() => server.meter.finished.at(-1)?.status === 'cancelled', 500)).toBe(true);
    expect(server.meter.finished.at(-1)!.completionTokens).toBeLessThan(1000);
  });
});
