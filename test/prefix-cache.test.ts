/**
 * Automatic prefix caching end to end (stories260K, native attention's paged cache, over HTTP): a request that
 * repeats a prompt prefix reuses its pages and reports them as usage.prompt_tokens_details.cached_tokens, and
 * every answer is the one a server without the cache gives — a partial hit, a prompt cached whole (its last page
 * copied), n choices, and prompts cycling through a cache too small to keep them all (eviction).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import type { GenerationRequest, StepRecord } from '../src/engine/protocol.ts';
import { storiesModel } from './helpers/models.ts';
import { startTestServer, type TestServer } from './helpers/server.ts';

const GREEDY = { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };

interface Completion {
  choices: { text: string; index: number }[];
  usage: { prompt_tokens: number; completion_tokens: number; prompt_tokens_details: { cached_tokens: number } };
}

let cached: TestServer;
let plain: TestServer;
let story: number[];

async function complete(server: TestServer, prompt: number[], extra: Record<string, unknown> = {}): Promise<Completion> {
  const r = await fetch(`${server.url}/v1/completions`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: server.modelName, prompt, max_tokens: 24, temperature: 0, ...extra }),
  });
  expect(r.status).toBe(200);
  return (await r.json()) as Completion;
}

beforeAll(async () => {
  const engine = { maxNumSeqs: 8, maxNumBatchedTokens: 128 };
  cached = await startTestServer({ modelDir: storiesModel(), engine });
  plain = await startTestServer({ modelDir: storiesModel(), engine: { ...engine, prefixCache: false } });
  expect(cached.engine.info.prefixCache).toBe(true);
  expect(plain.engine.info.prefixCache).toBe(false);
  // A natural text of 400 tokens: BOS and a greedy story.
  const r = await complete(plain, [1], { max_tokens: 399, ignore_eos: true });
  story = [1, ...plain.tokenizer.encode(r.choices[0].text, { addSpecialTokens: false })].slice(0, 400);
  expect(story.length).toBe(400);
});

afterAll(async () => {
  await cached?.close();
  await plain?.close();
});

describe('prefix caching over HTTP', () => {
  it('a repeated prefix is reused in whole pages, reported as cached_tokens, and the answer does not change', async () => {
    const first = story.slice(0, 200);
    const miss = await complete(cached, first);
    expect(miss.usage.prompt_tokens).toBe(200);
    expect(miss.usage.prompt_tokens_details.cached_tokens).toBe(0);
    const want = await complete(plain, first);
    expect(want.usage.prompt_tokens_details.cached_tokens).toBe(0);
    expect(miss.choices[0].text).toBe(want.choices[0].text);

    // The same prompt: three full pages of 64 cached, 8 tokens computed.
    const hit = await complete(cached, first);
    expect(hit.usage.prompt_tokens_details.cached_tokens).toBe(192);
    expect(hit.choices[0].text).toBe(want.choices[0].text);
    const meter = cached.meter.finished.at(-1)!;
    expect(meter.cachedTokens).toBe(192);
    expect(meter.prefillSeconds).toBeGreaterThan(0);

    // A longer prompt with the same beginning, and one that parts from it inside the second page.
    const longer = story.slice(0, 300);
    const l = await complete(cached, longer);
    expect(l.usage.prompt_tokens_details.cached_tokens).toBe(192);
    expect(l.choices[0].text).toBe((await complete(plain, longer)).choices[0].text);
    const parted = [...story.slice(0, 100), ...story.slice(250, 350)];
    const p = await complete(cached, parted);
    expect(p.usage.prompt_tokens_details.cached_tokens).toBe(64);
    expect(p.choices[0].text).toBe((await complete(plain, parted)).choices[0].text);
  });

  it('a prompt cached whole recomputes only its last token, in a copy of its last page, and answers the same', async () => {
    const whole = story.slice(0, 256); // four full pages
    await complete(cached, story.slice(0, 260));
    const r = await complete(cached, whole, { max_tokens: 40 });
    expect(r.usage.prompt_tokens_details.cached_tokens).toBe(255);
    expect(r.choices[0].text).toBe((await complete(plain, whole, { max_tokens: 40 })).choices[0].text);
    // The shared page the copy came from is intact: the longer prompt still answers the same.
    const again = await complete(cached, story.slice(0, 260));
    expect(again.usage.prompt_tokens_details.cached_tokens).toBe(256);
    expect(again.choices[0].text).toBe((await complete(plain, story.slice(0, 260))).choices[0].text);
  });

  it('the JavaScript paged runner (--runner js) shares and copies pages the same way as the native runner', async () => {
    expect(cached.engine.info.runner).toBe('native');
    const js = await startTestServer({ modelDir: storiesModel(), engine: { maxNumSeqs: 8, maxNumBatchedTokens: 128, runner: 'js' } });
    try {
      expect([js.engine.info.runner, js.engine.info.prefixCache]).toEqual(['paged', true]);
      const whole = story.slice(0, 256);
      await complete(js, story.slice(0, 260));
      const r = await complete(js, whole, { max_tokens: 40 });
      expect(r.usage.prompt_tokens_details.cached_tokens).toBe(255);
      expect(r.choices[0].text).toBe((await complete(plain, whole, { max_tokens: 40 })).choices[0].text);
      const again = await complete(js, story.slice(0, 260));
      expect(again.usage.prompt_tokens_details.cached_tokens).toBe(256);
      expect(again.choices[0].text).toBe((await complete(plain, story.slice(0, 260))).choices[0].text);
    } finally {
      await js.close();
    }
  });

  it('counts a prompt once with n choices, streams cached_tokens in the final usage chunk', async () => {
    const prompt = story.slice(0, 150);
    await complete(cached, prompt);
    const r = await complete(cached, prompt, { n: 3, temperature: 0.8, seed: 5 });
    expect(r.usage.prompt_tokens).toBe(150);
    expect(r.usage.prompt_tokens_details.cached_tokens).toBe(128);

    const res = await fetch(`${cached.url}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: cached.modelName, prompt, max_tokens: 8, temperature: 0, stream: true, stream_options: { include_usage: true } }),
    });
    const chunks = (await res.text()).split('\n\n').filter((l) => l.startsWith('data: {')).map((l) => JSON.parse(l.slice(6)));
    expect(chunks.at(-1).usage.prompt_tokens_details).toEqual({ cached_tokens: 128 });
  });

  it('with prompts cycling through a cache too small for them all, pages are evicted and every answer stays right', async () => {
    // 7 + 4 pages (capacity and one per sequence): two requests run at once, the eight prompts' 16 full pages do not fit.
    const small = await startTestServer({ modelDir: storiesModel(), engine: { maxNumSeqs: 4, maxNumBatchedTokens: 128, kvCacheTokens: 400 } });
    try {
      const prompts = [0, 1, 2, 3, 4, 5, 6, 7].map((i) => story.slice(i * 30, i * 30 + 150));
      const want = await Promise.all(prompts.map((p) => complete(plain, p)));
      let hits = 0;
      for (let round = 0; round < 3; round++) {
        const got = await Promise.all(prompts.map((p) => complete(small, p)));
        got.forEach((g, i) => expect(g.choices[0].text, `round ${round}, prompt ${i}`).toBe(want[i].choices[0].text));
        hits += got.reduce((a, g) => a + g.usage.prompt_tokens_details.cached_tokens, 0);
        // The most recently released pages are the last to go.
        const again = await complete(small, prompts[7]);
        expect(again.usage.prompt_tokens_details.cached_tokens).toBe(128);
        expect(again.choices[0].text).toBe(want[7].choices[0].text);
      }
      expect(hits).toBeLessThan(2 * 8 * 128);
    } finally {
      await small.close();
    }
  });
});

describe('KV admission with prefix caching', () => {
  /** Runs `count` requests on one prompt together in an engine of `kvCacheTokens`; the most that ran at once, and their outputs. */
  async function together(prefixCache: boolean, prompt: number[], count: number) {
    const steps: StepRecord[] = [];
    const outputs = new Map<string, number[]>();
    let done!: () => void;
    const finished = new Promise<void>((r) => (done = r));
    let left = count + 1;
    const engine = await createEngineCore(
      { modelDir: storiesModel(), device: { kind: 'cpu' }, threads: 1, maxNumSeqs: 8, maxNumBatchedTokens: 512, kvCacheTokens: 600, kvCacheBytes: 2 ** 26, prefixCache },
      (events) => {
        for (const e of events) {
          outputs.set(e.id, [...(outputs.get(e.id) ?? []), ...e.tokens.map((t) => t.id)]);
          if (e.finish) {
            expect(e.finish, e.error).toBe('length');
            if (--left === 0) done();
          }
        }
      },
      (r) => steps.push(r),
    );
    const loop = engine.scheduler.run();
    const request = (id: string): GenerationRequest => ({ id, promptIds: prompt, maxTokens: 20, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], sampling: GREEDY });
    // One request first (it fills the cache), then the rest at once.
    engine.scheduler.submit(request('first'));
    while (!outputs.has('first')) await new Promise((r) => setTimeout(r, 1));
    for (let i = 0; i < count; i++) engine.scheduler.submit(request(`r${i}`));
    await finished;
    engine.scheduler.stop();
    await loop;
    await engine.release();
    for (const s of steps) expect(s.kvUsedTokens).toBeLessThanOrEqual(600);
    return { running: Math.max(...steps.map((s) => s.running)), outputs };
  }

  it('counts pages shared by several sequences once: more requests on one long prompt run at once, with the same tokens', async () => {
    // 260 + 20 tokens each: two fit in 600 alone; sharing four pages (256 tokens), each needs only 24 more.
    const prompt = story.slice(0, 260);
    const plainRun = await together(false, prompt, 6);
    const cachedRun = await together(true, prompt, 6);
    expect(plainRun.running).toBe(2);
    expect(cachedRun.running).toBeGreaterThanOrEqual(5);
    const want = plainRun.outputs.get('first')!;
    expect(want.length).toBe(20);
    for (const [id, tokens] of [...plainRun.outputs, ...cachedRun.outputs]) expect(tokens, id).toEqual(want);
  });
});

describe('pages written while generating', () => {
  async function engineWith(prefixCache: boolean) {
    const waiting = new Map<string, { tokens: number[]; resolve: (r: { tokens: number[]; cached: number }) => void }>();
    const engine = await createEngineCore(
      { modelDir: storiesModel(), device: { kind: 'cpu' }, threads: 1, maxNumSeqs: 4, maxNumBatchedTokens: 256, kvCacheBytes: 2 ** 26, prefixCache },
      (events) => {
        for (const e of events) {
          const w = waiting.get(e.id)!;
          w.tokens.push(...e.tokens.map((t) => t.id));
          if (e.finish) w.resolve({ tokens: w.tokens, cached: e.cachedTokens ?? 0 });
        }
      },
      () => {},
    );
    const loop = engine.scheduler.run();
    let n = 0;
    return {
      run: (promptIds: number[], maxTokens: number) =>
        new Promise<{ tokens: number[]; cached: number }>((resolve) => {
          const id = `q${n++}`;
          waiting.set(id, { tokens: [], resolve });
          engine.scheduler.submit({ id, promptIds, maxTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], sampling: GREEDY });
        }),
      close: async () => {
        engine.scheduler.stop();
        await loop;
        await engine.release();
      },
    };
  }

  it('the next turn, which resends the answer, reuses the pages the answer was written into', async () => {
    const cachedEngine = await engineWith(true);
    const plainEngine = await engineWith(false);
    try {
      const prompt = story.slice(0, 70);
      const answer = (await cachedEngine.run(prompt, 100)).tokens;
      // Positions 0-168 were written (the last answer token is never fed back): pages 0 and 1 are full, and
      // page 1 holds answer tokens.
      const next = [...prompt, ...answer, ...story.slice(300, 310)];
      const turn = await cachedEngine.run(next, 12);
      expect(turn.cached).toBe(128);
      expect(turn.tokens).toEqual((await plainEngine.run(next, 12)).tokens);
    } finally {
      await cachedEngine.close();
      await plainEngine.close();
    }
  });
});
