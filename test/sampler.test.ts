import { describe, expect, it } from 'vitest';
import { SequenceSampler } from '../src/engine/core/sampler.ts';
import type { SamplingParams } from '../src/engine/protocol.ts';

const OFF: SamplingParams = {
  temperature: 1,
  topP: 1,
  topK: 0,
  minP: 0,
  repetitionPenalty: 1,
  presencePenalty: 0,
  frequencyPenalty: 0,
};

function make(over: Partial<SamplingParams>, vocab: number, prompt: number[] = []): SequenceSampler {
  return new SequenceSampler({ ...OFF, seed: 1234, ...over }, prompt, vocab);
}

/** Draw `n` tokens, giving the sampler a fresh copy of `logits` each step (it modifies the row in place). */
function draws(s: SequenceSampler, logits: ArrayLike<number>, n: number, banned?: number[]): number[] {
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push(s.sample(Float32Array.from(logits), banned).token);
  return out;
}

function counts(tokens: number[]): Map<number, number> {
  const c = new Map<number, number>();
  for (const t of tokens) c.set(t, (c.get(t) ?? 0) + 1);
  return c;
}

function logSoftmax(x: ArrayLike<number>): number[] {
  const v = Array.from(x, Number);
  const m = Math.max(...v);
  const lse = m + Math.log(v.reduce((s, y) => s + Math.exp(y - m), 0));
  return v.map((y) => y - lse);
}

/** Deterministic pseudo-random logits for test fixtures. */
function fixture(n: number, seed: number, lo = -3, hi = 3): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = lo + ((s >>> 8) / 2 ** 24) * (hi - lo);
  }
  return out;
}

const PROBS4 = [0.5, 0.3, 0.15, 0.05];
const LOGITS4 = PROBS4.map(Math.log);

describe('SequenceSampler', () => {
  it('greedy picks the argmax, also for temperatures below 1e-5', () => {
    const logits = fixture(1000, 7);
    logits[613] = 10;
    logits[614] = 9.999;
    expect(make({ temperature: 0 }, 1000).sample(Float32Array.from(logits)).token).toBe(613);
    expect(new Set(draws(make({ temperature: 1e-6 }, 1000), logits, 200))).toEqual(new Set([613]));
  });

  it('same seed gives the same 200 tokens; different seeds differ', () => {
    const logits = fixture(1000, 11, -1, 1);
    const a = draws(make({ seed: 42 }, 1000), logits, 200);
    const b = draws(make({ seed: 42 }, 1000), logits, 200);
    const c = draws(make({ seed: 43 }, 1000), logits, 200);
    const d = draws(make({ seed: 42 + 2 ** 32 }, 1000), logits, 200);
    expect(a).toEqual(b);
    expect(c).not.toEqual(a);
    expect(d).not.toEqual(a);
    expect(new Set(a).size).toBeGreaterThan(100);
    // Unseeded samplers differ from each other.
    expect(draws(make({ seed: undefined }, 1000), logits, 50)).not.toEqual(draws(make({ seed: undefined }, 1000), logits, 50));
  });

  it('a seeded sequence is independent of its place in a batch buffer and of extra columns', () => {
    const vocab = 500;
    const logits = fixture(vocab, 3, -1, 1);
    const alone = draws(make({ seed: 9 }, vocab), logits, 100);
    const s = make({ seed: 9 }, vocab);
    const batched: number[] = [];
    for (let i = 0; i < 100; i++) {
      const buf = new Float32Array(3 * (vocab + 12)).fill(50); // padded rows; padding would win if read
      const rowStart = vocab + 12;
      buf.set(logits, rowStart);
      batched.push(s.sample(buf.subarray(rowStart, rowStart + vocab + 12)).token);
    }
    expect(batched).toEqual(alone);
  });

  it('temperature 1 without filtering matches softmax frequencies over 20k draws', () => {
    const logits = [0, 1, 2, 0.5, -1, 1.5];
    const probs = logSoftmax(logits).map(Math.exp);
    const n = 20_000;
    const c = counts(draws(make({ seed: 5 }, logits.length), logits, n));
    for (let t = 0; t < logits.length; t++) {
      const sd = Math.sqrt((probs[t] * (1 - probs[t])) / n);
      expect(Math.abs((c.get(t) ?? 0) / n - probs[t])).toBeLessThan(5 * sd);
    }
  });

  it('temperature reshapes the distribution (T=0.5 squares the probability ratios)', () => {
    const logits = [Math.log(2), 0];
    const n = 20_000;
    const p0 = 4 / 5; // softmax(logits / 0.5): ratio 2^2 = 4
    const c = counts(draws(make({ temperature: 0.5, seed: 8 }, 2), logits, n));
    expect(Math.abs((c.get(0) ?? 0) / n - p0)).toBeLessThan(5 * Math.sqrt((p0 * (1 - p0)) / n));
  });

  it('top_k never leaves the top k and returns each of them', () => {
    const vocab = 1000;
    const logits = fixture(vocab, 21, -1, 2.5);
    const top = [17, 400, 401, 999, 0];
    top.forEach((t, i) => (logits[t] = 3 - i * 0.1));
    const c = counts(draws(make({ topK: 5, seed: 3 }, vocab), logits, 5000));
    expect(new Set(c.keys())).toEqual(new Set(top));
    // top_k composed with top_p renormalises over the top k first: {17, 400} hold ~42% of the top-5 mass.
    const c2 = counts(draws(make({ topK: 5, topP: 0.4, seed: 3 }, vocab), logits, 2000));
    expect(new Set(c2.keys())).toEqual(new Set([17, 400]));
  });

  it('top_p returns exactly the smallest set whose mass reaches p', () => {
    const c1 = counts(draws(make({ topP: 0.75 }, 4), LOGITS4, 5000));
    expect(new Set(c1.keys())).toEqual(new Set([0, 1]));
    expect(Math.abs((c1.get(0) ?? 0) / 5000 - 0.5 / 0.8)).toBeLessThan(0.035); // renormalised 0.625
    const c2 = counts(draws(make({ topP: 0.85 }, 4), LOGITS4, 5000));
    expect(new Set(c2.keys())).toEqual(new Set([0, 1, 2]));
    const c3 = counts(draws(make({ topP: 0.4 }, 4), LOGITS4, 500));
    expect(new Set(c3.keys())).toEqual(new Set([0]));
  });

  it('top_p grows past the first 64 candidates on a 50k near-flat vocabulary', () => {
    const vocab = 50_000;
    const logits = new Float32Array(vocab);
    for (let i = 0; i < vocab; i++) logits[i] = -i * 1e-5; // sorted descending, no ties
    const perm = fixture(vocab, 77); // shuffle positions so index order is not value order
    const order = Array.from({ length: vocab }, (_, i) => i).sort((a, b) => perm[a] - perm[b]);
    const shuffled = new Float32Array(vocab);
    order.forEach((pos, rank) => (shuffled[pos] = logits[rank]));
    // Reference nucleus by full sort (test only).
    let z = 0;
    for (let i = 0; i < vocab; i++) z += Math.exp(logits[i]);
    const p = 0.5;
    let acc = 0;
    let nucleus = 0;
    while (acc < p * z) acc += Math.exp(logits[nucleus++]);
    expect(nucleus).toBeGreaterThan(20_000);
    const allowed = new Set(order.slice(0, nucleus));
    const out = draws(make({ topP: p, seed: 2 }, vocab), shuffled, 200);
    for (const t of out) expect(allowed.has(t)).toBe(true);
    const ranks = out.map((t) => order.indexOf(t));
    expect(Math.max(...ranks)).toBeGreaterThan(0.8 * nucleus);
    expect(new Set(out).size).toBeGreaterThan(170);
  });

  it('top_p doubles K from 64 until the nucleus mass is reached (one dominant token, long tail)', () => {
    // Weights ≈ 1 (token 0) then 0.001 each: the first 64 hold ~2% of the mass, the 0.9 nucleus ~45k tokens.
    const vocab = 50_000;
    const logits = new Float32Array(vocab);
    for (let i = 1; i < vocab; i++) logits[i] = Math.log(0.001) - i * 1e-7;
    let z = 0;
    for (let i = 0; i < vocab; i++) z += Math.exp(logits[i]);
    let acc = 0;
    let nucleus = 0;
    while (acc < 0.9 * z) acc += Math.exp(logits[nucleus++]);
    expect(nucleus).toBeGreaterThan(40_000);
    expect(nucleus).toBeLessThan(vocab - 1000);
    const out = draws(make({ topP: 0.9, seed: 12 }, vocab), logits, 100);
    for (const t of out) expect(t).toBeLessThan(nucleus);
    expect(Math.max(...out)).toBeGreaterThan(0.8 * nucleus);
  });

  it('min_p drops tokens below minP * maxProb', () => {
    // probs 0.5/0.3/0.15/0.05: minP 0.2 → threshold 0.1 keeps {0,1,2}; minP 0.5 → 0.25 keeps {0,1}.
    expect(new Set(draws(make({ minP: 0.2 }, 4), LOGITS4, 3000))).toEqual(new Set([0, 1, 2]));
    expect(new Set(draws(make({ minP: 0.5 }, 4), LOGITS4, 3000))).toEqual(new Set([0, 1]));
    // min_p composes with top_k (candidate path) the same way.
    expect(new Set(draws(make({ minP: 0.5, topK: 3 }, 4), LOGITS4, 3000))).toEqual(new Set([0, 1]));
  });

  it('repetition penalty covers prompt and generated tokens, dividing positive and multiplying negative logits', () => {
    const g = { temperature: 0, repetitionPenalty: 2 };
    expect(draws(make({ temperature: 0 }, 2, [0]), [2, 1.5], 1)).toEqual([0]);
    expect(draws(make(g, 2, [0]), [2, 1.5], 1)).toEqual([1]); // 2/2 = 1 < 1.5
    expect(draws(make(g, 2, [0]), [-1, -1.5], 1)).toEqual([1]); // -1*2 = -2 < -1.5
    expect(draws(make({ ...g, repetitionPenalty: 1.2 }, 2, [0]), [2, 1.5], 1)).toEqual([0]); // 1.667 > 1.5
    // No prompt: the first pick is penalised on the next step.
    expect(draws(make(g, 3), [2, 1.5, 0], 2)).toEqual([0, 1]);
    // Out-of-vocab prompt ids are ignored.
    expect(draws(make(g, 2, [5, -1]), [2, 1.5], 1)).toEqual([0]);
  });

  it('presence penalty subtracts once per generated token and ignores the prompt', () => {
    expect(draws(make({ temperature: 0, presencePenalty: 0.51 }, 2, [0]), [2, 1.5], 3)).toEqual([0, 1, 0]);
    expect(draws(make({ temperature: 0, presencePenalty: 0.49 }, 2), [2, 1.5], 5)).toEqual([0, 0, 0, 0, 0]);
  });

  it('frequency penalty subtracts count * penalty over generated tokens only', () => {
    // 0: 2 - 0.3c, 1: 1.5 - 0.3c, 2: 1.2 - 0.3c
    expect(draws(make({ temperature: 0, frequencyPenalty: 0.3 }, 3, [0, 0, 0]), [2, 1.5, 1.2], 4)).toEqual([0, 0, 1, 0]);
    // Presence at the same strength never overtakes: the gap 0.5 exceeds 0.3.
    expect(draws(make({ temperature: 0, presencePenalty: 0.3 }, 3), [2, 1.5, 1.2], 4)).toEqual([0, 0, 0, 0]);
  });

  it('banned tokens are never sampled; all banned throws; NaN counts as -Infinity', () => {
    expect(make({ temperature: 0 }, 3).sample(Float32Array.from([1, 5, 2]), [1]).token).toBe(2);
    const out = draws(make({ seed: 4 }, 4), LOGITS4, 2000, [0, 2]);
    expect(new Set(out)).toEqual(new Set([1, 3]));
    expect(() => make({}, 3).sample(Float32Array.from([1, 2, 3]), [0, 1, 2])).toThrow(/-Infinity/);
    expect(make({ temperature: 0 }, 3).sample(Float32Array.from([NaN, 1, 0])).token).toBe(1);
    expect(new Set(draws(make({}, 3), [NaN, 0, 0], 500))).toEqual(new Set([1, 2]));
    expect(() => make({}, 2).sample(Float32Array.from([NaN, NaN]))).toThrow(/-Infinity or NaN/);
  });

  it('greedy from the top logits picks what greedy over the whole row picks', () => {
    const row = [0.5, 3, -1, 3, 2.5, NaN, 7, 7, -Infinity, 1];
    // The top as TopK gives it: largest first, ties lower id first.
    const order = row.map((v, i) => i).filter((i) => !Number.isNaN(row[i])).sort((a, b) => row[b] - row[a] || a - b);
    const top = { ids: order.slice(0, 4), values: order.slice(0, 4).map((i) => row[i]) };
    for (const banned of [[], [6], [6, 7], [7, 1], [2, 6, 7]]) {
      const full = make({ temperature: 0 }, row.length).sample(Float32Array.from(row), banned).token;
      expect(make({ temperature: 0 }, row.length).sampleTop(top, banned)!.token, `banned ${banned}`).toBe(full);
    }
    // Nothing usable in the top: the caller needs the full row.
    expect(make({ temperature: 0 }, row.length).sampleTop(top, [6, 7, 1, 3])).toBeUndefined();
    expect(make({ temperature: 0 }, 3).sampleTop({ ids: [0, 1], values: [NaN, -Infinity] })).toBeUndefined();
    // Only plain greedy can use it.
    expect(make({ temperature: 0 }, 3).greedy).toBe(true);
    for (const over of [{ temperature: 0.7 }, { temperature: 0, logprobs: 0 }, { temperature: 0, repetitionPenalty: 1.1 }, { temperature: 0, presencePenalty: 0.5 }]) {
      expect(make(over, 3).greedy).toBe(false);
    }
    expect(() => make({ temperature: 1 }, 3).sampleTop({ ids: [0], values: [1] })).toThrow(/plain greedy/);
  });

  it('ignores columns beyond vocabSize and rejects short rows', () => {
    const row = Float32Array.from([0, 1, 0.5, 0, 0, 100, 100, 100]);
    expect(make({ temperature: 0 }, 5).sample(row).token).toBe(1);
    expect(row[5]).toBe(100);
    for (const t of draws(make({ temperature: 1 }, 5), row.subarray(0), 500)) expect(t).toBeLessThan(5);
    expect(() => make({}, 10).sample(new Float32Array(5))).toThrow(RangeError);
  });

  it('logprobs are the raw log-softmax, with sorted top logprobs', () => {
    const vocab = 300;
    const logits = fixture(vocab, 99);
    logits[10] = 5;
    logits[20] = 4.5;
    logits[30] = 4.25;
    const ref = logSoftmax(logits);
    // Penalties, temperature and bans must not leak into the reported logprobs.
    const s = make({ temperature: 0.7, repetitionPenalty: 1.5, frequencyPenalty: 0.4, logprobs: 3, seed: 6 }, vocab, [10, 20]);
    for (let step = 0; step < 20; step++) {
      const r = s.sample(Float32Array.from(logits), [30]);
      expect(r.token).not.toBe(30);
      expect(r.logprob).toBeCloseTo(ref[r.token], 5);
      expect(r.topLogprobs!.map((x) => x.token)).toEqual([10, 20, 30]);
      r.topLogprobs!.forEach((x) => expect(x.logprob).toBeCloseTo(ref[x.token], 5));
    }
    // Greedy with 20 top logprobs: sorted descending, matching a full sort of the reference.
    const want = ref.map((lp, t) => ({ t, lp })).sort((a, b) => b.lp - a.lp).slice(0, 20);
    const g = make({ temperature: 0, logprobs: 20 }, vocab).sample(Float32Array.from(logits));
    expect(g.token).toBe(10);
    expect(g.logprob).toBeCloseTo(ref[10], 5);
    expect(g.topLogprobs!.map((x) => x.token)).toEqual(want.map((x) => x.t));
    for (let i = 1; i < 20; i++) expect(g.topLogprobs![i].logprob).toBeLessThanOrEqual(g.topLogprobs![i - 1].logprob);
    // logprobs 0: chosen token only; undefined: nothing.
    const z = make({ temperature: 0, logprobs: 0 }, vocab).sample(Float32Array.from(logits));
    expect(z.logprob).toBeCloseTo(ref[10], 5);
    expect(z.topLogprobs).toBeUndefined();
    expect(make({ temperature: 0 }, vocab).sample(Float32Array.from(logits))).toEqual({ token: 10 });
  });

  it('rejects invalid parameters', () => {
    expect(() => make({ topP: 0 }, 4)).toThrow(RangeError);
    expect(() => make({ temperature: -1 }, 4)).toThrow(RangeError);
    expect(() => make({ logprobs: 21 }, 4)).toThrow(RangeError);
    expect(() => make({ repetitionPenalty: 0 }, 4)).toThrow(RangeError);
    expect(() => new SequenceSampler(OFF, [], 0)).toThrow(RangeError);
  });
});
