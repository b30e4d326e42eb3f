/**
 * Continuous batching in one Scheduler on the real engine (stories260K): concurrent requests with mixed
 * prompt lengths, sampling parameters and arrival times must each produce exactly what they produce alone;
 * admission is FCFS under maxNumSeqs and KV capacity; cancellation frees slots; per-request cost parts
 * add up to the steps' busy time.
 */
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { loadRunner } from '../src/engine/runners/load.ts';
import { loadModelFolder } from '../src/model/folder.ts';
import type { EngineOptions } from '../src/engine/protocol.ts';
import type { SamplingParams } from '../src/engine/protocol.ts';
import { Scheduler } from '../src/engine/core/scheduler.ts';
import type { GenerationRequest, RequestEvent, StepRecord } from '../src/engine/protocol.ts';
import type { ForwardRow, ModelRunner } from '../src/engine/runners/runner.ts';
import { modelShape } from '../src/meter/attribution.ts';
import type { TextTokenizer } from '../src/model/tokenizer.ts';
import { storiesModel } from './helpers/models.ts';

const GREEDY: SamplingParams = { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };

function request(id: string, promptIds: number[], maxTokens: number, sampling: Partial<SamplingParams> = {}, extra: Partial<GenerationRequest> = {}): GenerationRequest {
  return { id, promptIds, maxTokens, minTokens: 0, ignoreEos: false, stop: [], stopTokenIds: [], sampling: { ...GREEDY, ...sampling }, ...extra };
}

interface Outcome {
  tokens: number[];
  text: string;
  final?: RequestEvent;
  /** Global order numbers of this request's events (across all requests of the engine). */
  order: number[];
}

/** An in-process engine with its scheduler loop running; events are gathered per request. */
async function startEngine(options: Partial<EngineOptions> = {}) {
  const outcomes = new Map<string, Outcome>();
  const finished = new Map<string, () => void>();
  const steps: StepRecord[] = [];
  const listeners: ((e: RequestEvent) => void)[] = [];
  let counter = 0;
  const engine = await createEngineCore(
    { modelDir: storiesModel(), device: { kind: 'cpu' }, threads: 1, maxNumSeqs: 8, maxNumBatchedTokens: 64, kvCacheBytes: 2 ** 26, ...options },
    (events) => {
      for (const e of events) {
        let o = outcomes.get(e.id);
        if (!o) outcomes.set(e.id, (o = { tokens: [], text: '', order: [] }));
        o.tokens.push(...e.tokens.map((t) => t.id));
        o.text += e.text;
        o.order.push(counter++);
        if (e.finish) {
          o.final = e;
          finished.get(e.id)?.();
        }
        for (const l of listeners) l(e);
      }
    },
    (r) => steps.push(r),
  );
  const loop = engine.scheduler.run();
  const result = (id: string): Promise<Outcome> =>
    new Promise((resolve) => {
      const o = outcomes.get(id);
      if (o?.final) return resolve(o);
      finished.set(id, () => resolve(outcomes.get(id)!));
    });
  return {
    scheduler: engine.scheduler,
    tokenizer: engine.tokenizer as TextTokenizer,
    info: engine.info,
    steps,
    outcomes,
    /** Called for every event, in order, inside the scheduler's emit. */
    onEvent: (l: (e: RequestEvent) => void) => listeners.push(l),
    submit: (req: GenerationRequest) => {
      engine.scheduler.submit(req);
      return result(req.id);
    },
    result,
    close: async () => {
      engine.scheduler.stop();
      await loop;
      await engine.release();
    },
  };
}

type Engine = Awaited<ReturnType<typeof startEngine>>;
const open: Engine[] = [];
async function engineFor(options: Partial<EngineOptions> = {}): Promise<Engine> {
  const e = await startEngine(options);
  open.push(e);
  return e;
}
afterEach(async () => {
  for (const e of open.splice(0)) await e.close();
});

/** The request run alone in a fresh engine. */
async function solo(req: GenerationRequest, options: Partial<EngineOptions> = {}): Promise<Outcome> {
  const e = await startEngine(options);
  try {
    return await e.submit(req);
  } finally {
    await e.close();
  }
}

let story: number[];
let tokenizer: TextTokenizer;
beforeAll(async () => {
  const e = await startEngine({ maxNumBatchedTokens: 512 });
  tokenizer = e.tokenizer;
  story = (await e.submit(request('story', [1], 400))).tokens;
  await e.close();
  expect(story.length).toBeGreaterThan(300);
});

/** A prompt of `n` tokens: BOS and the start of the greedy story (a natural text). */
const storyPrompt = (n: number) => [1, ...story.slice(0, n - 1)];

describe('continuous batching', () => {
  it('concurrent requests with mixed prompts, parameters and arrival times each match their solo run', async () => {
    const enc = (text: string) => tokenizer.encode(text);
    const reqs: Record<string, GenerationRequest> = {
      greedy: request('greedy', [1], 60),
      temp: request('temp', enc('Once upon a time'), 80, { temperature: 0.8, seed: 11 }),
      long: request('long', storyPrompt(150), 40, { temperature: 1, topK: 5, seed: 12 }), // > maxNumBatchedTokens: chunked
      topP: request('topP', enc('The cat sat on the'), 50, { temperature: 1, topP: 0.9, seed: 13 }),
      penalties: request('penalties', enc('Tom and Sue went to the park. Tom'), 70, { repetitionPenalty: 1.3, presencePenalty: 0.4, frequencyPenalty: 0.3 }),
      minP: request('minP', enc('She had a'), 30, { temperature: 1.2, minP: 0.1, seed: 14 }),
      long2: request('long2', storyPrompt(97), 25),
      mixed: request('mixed', enc('One day, a little dog'), 90, { temperature: 0.8, topK: 20, topP: 0.95, minP: 0.05, seed: 15 }),
      ninth: request('ninth', enc('Lily'), 20, { temperature: 0.7, seed: 16 }),
      late: request('late', storyPrompt(70), 35, { temperature: 0.9, topP: 0.8, seed: 17 }, { ignoreEos: true }),
    };
    const expected = new Map<string, Outcome>();
    for (const req of Object.values(reqs)) expected.set(req.id, await solo(req));

    const e = await engineFor();
    const all: Promise<Outcome>[] = [];
    const submitted = new Set<string>();
    const submit = (id: string) => {
      if (submitted.has(id)) return;
      submitted.add(id);
      all.push(e.submit(reqs[id]));
    };
    const progress = new Map<string, number>();
    e.onEvent((ev) => {
      const n = (progress.get(ev.id) ?? 0) + ev.tokens.length;
      progress.set(ev.id, n);
      // Arrivals while others are mid-generation (submitted inside the scheduler's step).
      if (ev.id === 'greedy' && n === 5) submit('penalties');
      if (ev.id === 'temp' && n === 10) { submit('minP'); submit('long2'); }
      if (ev.id === 'greedy' && n === 20) { submit('mixed'); submit('ninth'); submit('late'); }
    });
    for (const id of ['greedy', 'temp', 'long', 'topP']) submit(id);
    // Wait until every submission has been made and has finished.
    for (;;) {
      const n = all.length;
      await Promise.all(all);
      if (all.length === n) break;
    }
    expect([...submitted].sort()).toEqual(Object.keys(reqs).sort());
    const results = await Promise.all(all);

    for (const r of results) {
      const id = r.final!.id;
      const want = expected.get(id)!;
      expect(r.tokens, id).toEqual(want.tokens);
      expect(r.text, id).toBe(want.text);
      expect(r.final!.finish, id).toBe(want.final!.finish);
      expect(r.final!.completionTokens, id).toBe(r.tokens.length);
      expect(r.final!.promptTokens, id).toBe(reqs[id].promptIds.length);
    }
    // Sanity: sampled requests really sampled (they differ from greedy on the same prompt).
    expect((await solo({ ...reqs.temp, sampling: GREEDY })).tokens).not.toEqual(expected.get('temp')!.tokens);

    // Batching really happened, within the limits, and the long prompt was split across steps.
    expect(Math.max(...e.steps.map((s) => s.running))).toBe(8);
    expect(e.steps.some((s) => s.waiting > 0)).toBe(true);
    expect(e.steps.some((s) => s.decodeTokens > 1 && s.prefillTokens > 0)).toBe(true);
    for (const s of e.steps) {
      expect(s.running).toBeLessThanOrEqual(8);
      expect(s.prefillTokens + s.decodeTokens).toBeLessThanOrEqual(64);
    }
    // Prefix caching: long2 and late begin with long's first page (64 tokens) and reuse it, and still match solo.
    const cached = results.reduce((a, r) => a + r.final!.cachedTokens!, 0);
    expect(cached).toBeGreaterThanOrEqual(64);
    expect(cached % 64).toBe(0);
    expect(e.steps.reduce((a, s) => a + s.admittedCachedTokens!, 0)).toBe(cached);
    const totalPrompt = Object.values(reqs).reduce((a, r) => a + r.promptIds.length, 0);
    expect(e.steps.reduce((a, s) => a + s.prefillTokens, 0)).toBe(totalPrompt - cached);
    expect(e.steps.filter((s) => s.prefillTokens > 0).length).toBeGreaterThanOrEqual(Math.ceil((totalPrompt - cached) / 64));

    // Cost attribution: the parts of all requests add up to the busy time of all steps.
    const parts = results.reduce((a, r) => a + r.final!.cost!.prefillSeconds + r.final!.cost!.decodeSeconds, 0);
    const busy = e.steps.reduce((a, s) => a + s.busySeconds, 0);
    expect(busy).toBeGreaterThan(0);
    expect(Math.abs(parts - busy) / busy).toBeLessThan(1e-9);
    for (const r of results) {
      expect(r.final!.cost!.prefillSeconds, r.final!.id).toBeGreaterThan(0);
      expect(r.final!.cost!.decodeSeconds, r.final!.id).toBeGreaterThan(0);
    }

    // With attention inside the graph (the slot runner) every request, run concurrently, gets the same tokens.
    const inGraph = await engineFor({ attention: 'onnx' });
    expect(inGraph.info.runner).toBe('slot');
    const again = await Promise.all(Object.values(reqs).map((r) => inGraph.submit(r)));
    for (const r of again) expect(r.tokens, r.final!.id).toEqual(expected.get(r.final!.id)!.tokens);
  });

  it('on a float16 conversion too, concurrent requests each match their solo run', async () => {
    const options = { modelDir: storiesModel('float16') };
    const reqs = [
      request('g', [1], 50),
      request('t', tokenizer.encode('Once upon a time'), 60, { temperature: 0.8, seed: 21 }),
      request('p', storyPrompt(90), 30, { temperature: 1, topK: 10, seed: 22 }),
      request('q', tokenizer.encode('The dog ran'), 40, { repetitionPenalty: 1.2 }),
      request('r', storyPrompt(20), 45, { temperature: 0.9, topP: 0.9, seed: 23 }, { ignoreEos: true }),
    ];
    const alone: Outcome[] = [];
    for (const r of reqs) alone.push(await solo(r, options));
    const e = await engineFor(options);
    const together = await Promise.all(reqs.map((r) => e.submit(r)));
    together.forEach((r, i) => expect(r.tokens, reqs[i].id).toEqual(alone[i].tokens));
    expect(Math.max(...e.steps.map((s) => s.running))).toBe(reqs.length);
    // 2^26 bytes of KV at 5 layers × K,V × 4 KV heads × 8 dims: 1,280 bytes a token in float32, 640 in float16
    // (the float16 graph's cache, and native attention's by default).
    expect((await engineFor({ kvCacheDtype: 'float32' })).info.limits.kvCapacityTokens).toBe(52428);
    expect((await engineFor()).info.limits.kvCapacityTokens).toBe(104857);
    expect(e.info.limits.kvCapacityTokens).toBe(104857);
  });

  it('all-greedy passes fetch only the top logits, and give the tokens that full logits give', async () => {
    const folder = loadModelFolder(storiesModel());
    const { runner } = await loadRunner(folder, { device: { kind: 'cpu' }, threads: 1, maxSlots: 8, maxModelLen: 512 });
    const calls = { full: 0, top: 0 };
    const counted: ModelRunner = Object.assign(Object.create(runner), {
      forward: (rows: ForwardRow[]) => (calls.full++, runner.forward(rows)),
      forwardTop: (rows: ForwardRow[]) => (calls.top++, runner.forwardTop!(rows)),
    });
    const outcomes = new Map<string, number[]>();
    const waiting = new Map<string, () => void>();
    const scheduler = new Scheduler(counted, tokenizer, modelShape(folder.config), [1, 2], { maxNumSeqs: 8, maxNumBatchedTokens: 64, maxModelLen: 512, kvCapacityTokens: 8192 }, (events) => {
      for (const e of events) {
        outcomes.set(e.id, [...(outcomes.get(e.id) ?? []), ...e.tokens.map((t) => t.id)]);
        if (e.finish) waiting.get(e.id)!();
      }
    }, () => {});
    const loop = scheduler.run();
    const run = async (reqs: GenerationRequest[]) => {
      const done = reqs.map((r) => new Promise<void>((resolve) => waiting.set(r.id, resolve)));
      reqs.forEach((r) => scheduler.submit(r));
      await Promise.all(done);
      return reqs.map((r) => outcomes.get(r.id)!);
    };
    try {
      // Greedy, with EOS banned (ignore_eos) and with min_tokens: only top logits are fetched.
      const greedy = [
        request('g1', storyPrompt(12), 40, {}, { ignoreEos: true }),
        request('g2', tokenizer.encode('The dog'), 30, {}, { minTokens: 30, stopTokenIds: [13] }),
        request('g3', [1], 60),
      ];
      const fast = await run(greedy);
      expect(calls).toEqual({ full: 0, top: expect.any(Number) });
      expect(calls.top).toBeGreaterThan(40);
      // The same requests with logprobs need the full rows; the tokens are the same.
      const top = calls.top;
      const full = await run(greedy.map((r) => ({ ...r, id: `${r.id}-full`, sampling: { ...r.sampling, logprobs: 0 } })));
      expect(full).toEqual(fast);
      expect(calls.top).toBe(top);
      expect(calls.full).toBeGreaterThan(40);
      // One sampled row in the batch: that pass fetches the full rows for everyone.
      const fullBefore = calls.full;
      const mixed = await run([request('m1', storyPrompt(12), 40, {}, { ignoreEos: true }), request('m2', [1], 40, { temperature: 0.8, seed: 3 })]);
      expect(mixed[0]).toEqual(fast[0]);
      expect(calls.full - fullBefore).toBeGreaterThanOrEqual(40);
    } finally {
      scheduler.stop();
      await loop;
      await runner.release();
    }
  });

  it('a runner that packs rows (native) runs decode rows and prompt chunks as one pass within the token budget; one that pads (js) runs them apart', async () => {
    const folder = loadModelFolder(storiesModel());
    const seen: Record<string, { passes: number[]; steps: StepRecord[]; tokens: Map<string, number[]> }> = {};
    for (const choice of ['native', 'js'] as const) {
      const { runner } = await loadRunner(folder, { device: { kind: 'cpu' }, threads: 1, maxSlots: 8, maxModelLen: 512, runner: choice });
      expect(runner.packedRows === true).toBe(choice === 'native');
      let passes = 0;
      const counted: ModelRunner = Object.assign(Object.create(runner), {
        forward: (rows: ForwardRow[]) => (passes++, runner.forward(rows)),
        forwardTop: (rows: ForwardRow[], k?: number) => (passes++, runner.forwardTop!(rows, k)),
      });
      const run = { passes: [] as number[], steps: [] as StepRecord[], tokens: new Map<string, number[]>() };
      seen[choice] = run;
      const waiting = new Map<string, () => void>();
      let scheduler!: Scheduler;
      const late = [request('b', storyPrompt(40), 12, {}, { ignoreEos: true }), request('c', tokenizer.encode('The cat sat on the mat and looked at the bird in the tree for a long time'), 12, {}, { ignoreEos: true })];
      scheduler = new Scheduler(counted, tokenizer, modelShape(folder.config), [1, 2], { maxNumSeqs: 8, maxNumBatchedTokens: 64, maxModelLen: 512, kvCapacityTokens: 8192 }, (events) => {
        for (const e of events) {
          const got = [...(run.tokens.get(e.id) ?? []), ...e.tokens.map((t) => t.id)];
          run.tokens.set(e.id, got);
          // Two prompts arrive while `a` decodes.
          if (e.id === 'a' && got.length === 5 && e.tokens.length > 0) late.forEach((r) => scheduler.submit(r));
          if (e.finish) waiting.get(e.id)!();
        }
      }, (record) => {
        run.steps.push(record);
        run.passes.push(passes);
        passes = 0;
      });
      const loop = scheduler.run();
      const submit = (reqs: GenerationRequest[]) => Promise.all(reqs.map((r) => new Promise<void>((resolve) => { waiting.set(r.id, resolve); scheduler.submit(r); })));
      try {
        const done = Promise.all(['a', ...late.map((r) => r.id)].map((id) => new Promise<void>((resolve) => waiting.set(id, resolve))));
        scheduler.submit(request('a', storyPrompt(8), 30, {}, { ignoreEos: true }));
        await done;
        // Each request alone afterwards, in the same runner: the same tokens.
        const together = new Map(run.tokens);
        for (const r of [request('a', storyPrompt(8), 30, {}, { ignoreEos: true }), ...late]) {
          const alone = { ...r, id: `${r.id}-alone` };
          await submit([alone]);
          expect(run.tokens.get(alone.id), `${choice}: ${r.id}`).toEqual(together.get(r.id));
        }
      } finally {
        scheduler.stop();
        await loop;
        await runner.release();
      }
    }
    const c = tokenizer.encode('The cat sat on the mat and looked at the bird in the tree for a long time').length;
    // The step that takes the two prompts: one pass of a's decode row and 63 prompt tokens (b's 40, c's first 23).
    const native = seen.native.steps.findIndex((r) => r.prefillTokens > 0 && r.decodeTokens > 0);
    expect(seen.native.steps[native]).toMatchObject({ decodeTokens: 1, prefillTokens: 63 });
    expect(seen.native.passes[native]).toBe(1);
    // Its time is split by FLOPs: the 63 prompt tokens take most of it.
    expect(seen.native.steps[native].decodeSeconds).toBeGreaterThan(0);
    expect(seen.native.steps[native].prefillSeconds).toBeGreaterThan(10 * seen.native.steps[native].decodeSeconds);
    expect(seen.native.steps[native + 1]).toMatchObject({ decodeTokens: 2, prefillTokens: c - 23 });
    // Padded rows: b's 40 tokens alone fill the budget of that step (two rows of 40 would not fit), in a pass of their own.
    const js = seen.js.steps.findIndex((r) => r.prefillTokens > 0 && r.decodeTokens > 0);
    expect(seen.js.steps[js]).toMatchObject({ decodeTokens: 1, prefillTokens: 40 });
    expect(seen.js.passes[js]).toBe(2);
    expect(seen.native.tokens.get('b')).toEqual(seen.js.tokens.get('b'));
  });

  it('admits FCFS when maxNumSeqs is reached: the 9th request waits for a slot, then runs', async () => {
    const e = await engineFor();
    const prompts = ['Once', 'The dog', 'A big red', 'Tim', 'Sue said', 'The sun', 'Ben and', 'Mom', 'Lily', 'The bird'].map((t) => tokenizer.encode(t));
    const maxTokens = [30, 30, 6, 30, 30, 12, 30, 30, 8, 8];
    const reqs = prompts.map((p, i) => request(`q${i}`, p, maxTokens[i], {}, { ignoreEos: true }));
    const results = await Promise.all(reqs.map((r) => e.submit(r)));

    const first = e.steps[0];
    expect([first.running, first.waiting]).toEqual([8, 2]);
    for (const s of e.steps) expect(s.running).toBeLessThanOrEqual(8);
    const byId = new Map(results.map((r) => [r.final!.id, r]));
    const firstEvent = (id: string) => byId.get(id)!.order[0];
    const finishEvent = (id: string) => byId.get(id)!.order.at(-1)!;
    // q2 (6 tokens) finishes first, and only then does q8 start; q9 starts after q5 finishes.
    expect(firstEvent('q8')).toBeGreaterThan(finishEvent('q2'));
    expect(firstEvent('q8')).toBeLessThan(finishEvent('q5'));
    expect(firstEvent('q9')).toBeGreaterThan(finishEvent('q5'));
    expect(firstEvent('q9')).toBeGreaterThan(firstEvent('q8'));
    // Nobody else was waiting, so each started as soon as a slot was free.
    for (const [i, r] of results.entries()) {
      expect(r.final!.finish).toBe('length');
      expect(r.tokens).toHaveLength(maxTokens[i]);
    }
    // Waiting does not change what a request generates.
    expect(byId.get('q8')!.tokens).toEqual((await solo(reqs[8])).tokens);
  });

  it('with a small KV capacity requests wait for room, never exceed it, and all finish correctly', async () => {
    const capacity = 100;
    const e = await engineFor({ kvCacheTokens: capacity });
    expect(e.info.limits.kvCapacityTokens).toBe(capacity);
    const reqs = ['Once upon a time', 'The little cat', 'Ben had a toy', 'Sara went', 'Max the dog', 'The sky was'].map((t, i) =>
      request(`kv${i}`, tokenizer.encode(t), 35 + i, i % 2 ? { temperature: 0.9, seed: i } : {}, { ignoreEos: true }),
    );
    // Each needs 40..50 tokens: at most two fit at once.
    const results = await Promise.all(reqs.map((r) => e.submit(r)));
    expect(Math.max(...e.steps.map((s) => s.running))).toBe(2);
    expect(e.steps.some((s) => s.waiting > 0)).toBe(true);
    for (const s of e.steps) expect(s.kvUsedTokens).toBeLessThanOrEqual(capacity);
    for (const [i, r] of results.entries()) {
      expect(r.final!.finish).toBe('length');
      expect(r.tokens).toEqual((await solo(reqs[i])).tokens);
    }
    // One that can never fit is refused rather than left waiting forever.
    const tooBig = await e.submit(request('huge', tokenizer.encode('Once'), 200));
    expect(tooBig.final!.finish).toBe('error');
    expect(tooBig.final!.error).toMatch(/needs \d+ KV tokens; the cache holds 100/);
  });

  it('cancel() of a running request frees its slot at the next step; cancel() of a waiting one drops it', async () => {
    const e = await engineFor({ maxNumSeqs: 2 });
    const a = request('a', tokenizer.encode('Once upon a time'), 200, {}, { ignoreEos: true });
    const b = request('b', tokenizer.encode('The dog'), 120, {}, { ignoreEos: true });
    const c = request('c', tokenizer.encode('Lily'), 10, {}, { ignoreEos: true });
    const d = request('d', tokenizer.encode('Tom'), 10, {}, { ignoreEos: true });
    let stepsAtCancel = -1;
    e.onEvent((ev) => {
      if (ev.id === 'a' && e.outcomes.get('a')!.tokens.length === 5 && stepsAtCancel < 0) {
        stepsAtCancel = e.steps.length;
        e.scheduler.cancel('a');
        e.scheduler.cancel('d');
      }
    });
    const [ra, rb, rc, rd] = await Promise.all([a, b, c, d].map((r) => e.submit(r)));

    expect(ra.final!.finish).toBe('cancelled');
    expect(ra.tokens).toHaveLength(5);
    expect(ra.final!.completionTokens).toBe(5);
    expect(ra.final!.cost!.decodeSeconds).toBeGreaterThan(0);
    expect(rd.final!.finish).toBe('cancelled');
    expect(rd.tokens).toEqual([]);
    expect(rd.final!.completionTokens).toBe(0);
    // The freed slot went to c in the very next step: it ran alongside b and finished long before it.
    const next = e.steps[stepsAtCancel + 1];
    expect(next.running).toBe(2);
    expect(next.waiting).toBe(0);
    expect(rc.final!.finish).toBe('length');
    expect(rc.tokens).toHaveLength(10);
    expect(rc.order.at(-1)!).toBeLessThan(rb.order.at(-1)!);
    expect(rb.tokens).toEqual((await solo(b)).tokens);
    // 'a' produced nothing after the cancellation.
    expect(ra.order.at(-1)!).toBeLessThan(rc.order[0]);
  });

  it('a prompt at or over maxModelLen is refused with a clear error; one just under it gets one token', async () => {
    const e = await engineFor({ maxModelLen: 64 });
    expect(e.info.limits.maxModelLen).toBe(64);
    const over = await e.submit(request('over', storyPrompt(64), 10));
    expect(over.final!.finish).toBe('error');
    expect(over.final!.error).toMatch(/prompt has 64 tokens; the model's limit is 64/);
    expect(over.tokens).toEqual([]);
    const way = await e.submit(request('way', storyPrompt(200), 10));
    expect(way.final!.error).toMatch(/prompt has 200 tokens/);
    const under = await e.submit(request('under', storyPrompt(63), 10));
    expect(under.final!.finish).toBe('length');
    expect(under.tokens).toHaveLength(1);
    const empty = await e.submit(request('empty', [], 10));
    expect(empty.final!.finish).toBe('error');
    expect(empty.final!.error).toMatch(/empty/);
    // Out-of-range sampling parameters fail that request alone; the engine goes on.
    const bad = request('bad', storyPrompt(8), 10);
    const refused = await e.submit({ ...bad, sampling: { ...bad.sampling, topP: 0 } });
    expect(refused.final!.finish).toBe('error');
    expect(refused.final!.error).toMatch(/invalid sampling parameters: topP/);
    expect((await e.submit(request('after', storyPrompt(8), 3))).tokens).toHaveLength(3);
  });

  it('the slot runner (attention in the graph) regroups sequences when every slot is taken (two occupied slots swap places)', async () => {
    const folder = loadModelFolder(storiesModel());
    const opts = { device: { kind: 'cpu' as const }, threads: 1, maxSlots: 3, maxModelLen: 64, attention: 'onnx' as const };
    const { runner } = await loadRunner(folder, opts);
    const { runner: alone } = await loadRunner(folder, opts);
    try {
      const prompts = [[1, 403, 407], [1, 261, 378], [1, 432, 383]];
      prompts.forEach((_, i) => runner.open(i + 1));
      await runner.forward(prompts.map((tokens, i) => ({ seq: i + 1, tokens })));
      // Rows 1 and 3 must sit in adjacent slots: 3 has to trade places with 2, with all three slots full.
      const out = (await runner.forward([{ seq: 1, tokens: [5] }, { seq: 3, tokens: [6] }])).logits.map((l) => Float32Array.from(l));
      const again = (await runner.forward([{ seq: 2, tokens: [7] }, { seq: 3, tokens: [8] }, { seq: 1, tokens: [9] }])).logits;
      const expectedLogits = async (seq: number, steps: number[][]) => {
        alone.open(seq);
        let last: Float32Array = new Float32Array();
        for (const tokens of steps) last = Float32Array.from((await alone.forward([{ seq, tokens }])).logits[0]);
        alone.close(seq);
        return last;
      };
      const close = (a: Float32Array, b: Float32Array) => {
        let m = 0;
        for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
        return m;
      };
      expect(close(out[0], await expectedLogits(11, [prompts[0], [5]]))).toBeLessThan(1e-4);
      expect(close(out[1], await expectedLogits(13, [prompts[2], [6]]))).toBeLessThan(1e-4);
      expect(close(again[0], await expectedLogits(12, [prompts[1], [7]]))).toBeLessThan(1e-4);
      expect(close(again[1], await expectedLogits(13, [prompts[2], [6], [8]]))).toBeLessThan(1e-4);
      expect(close(again[2], await expectedLogits(11, [prompts[0], [5], [9]]))).toBeLessThan(1e-4);
      expect([1, 2, 3].map((s) => runner.cachedLength(s))).toEqual([5, 4, 5]);
    } finally {
      await runner.release();
      await alone.release();
    }
  });
});
