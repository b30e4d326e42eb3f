/**
 * Per-sequence token sampler: penalties → temperature → top_k → top_p → min_p → draw, as vLLM does.
 *
 * `sample()` MODIFIES `logits[0, vocabSize)` IN PLACE (NaN → -Infinity, penalties, bans); columns at or
 * beyond `vocabSize` are neither read nor written. Temperature is folded into the softmax, not written back.
 * Nothing sorts the whole vocabulary: greedy is one argmax pass, top-k/top-p/top-logprobs use bounded heaps.
 */
import { randomBytes } from 'node:crypto';
import { MAX_TOP_LOGPROBS, type SamplingParams } from '../protocol.ts';

/** Which tokens a constrained row may take (engine/core/grammar.ts): asked of the drawn token first, applied to the row only when that token is not allowed. */
export interface TokenMask {
  /** Mask before drawing (where the mask is cheap and a free draw would likely be refused). */
  readonly maskFirst?: boolean;
  allows(token: number): boolean;
  /** Sets every token not allowed to -Infinity. */
  apply(row: Float32Array): void;
}

export interface SampleResult { token: number; logprob?: number; topLogprobs?: { token: number; logprob: number }[] }

/** Below this temperature sampling is greedy. */
const GREEDY_TEMPERATURE = 1e-5;
/** First nucleus size tried for top_p without top_k; doubled while its mass is still < top_p. */
const TOP_P_INITIAL_K = 64;

/** murmur3 fmix32 after a golden-ratio add (the splitmix32 step); a bijection on uint32. */
function mix32(x: number): number {
  let z = (x + 0x9e3779b9) | 0;
  z ^= z >>> 16;
  z = Math.imul(z, 0x21f0aaad);
  z ^= z >>> 15;
  z = Math.imul(z, 0x735a2d97);
  z ^= z >>> 15;
  return z >>> 0;
}

/** xoshiro128** with 53-bit float output. */
class Xoshiro128 {
  private readonly s = new Uint32Array(4);

  constructor(seed: number | undefined) {
    if (seed === undefined) {
      const b = randomBytes(16);
      for (let i = 0; i < 4; i++) this.s[i] = b.readUInt32LE(i * 4);
    } else {
      const n = Math.trunc(seed);
      const lo = n >>> 0;                       // ToUint32 is exact modulo 2^32 for integers up to 2^53
      const hi = Math.floor(n / 0x100000000) >>> 0;
      this.s[0] = mix32(lo ^ 0x243f6a88);
      this.s[1] = mix32(hi ^ 0x85a308d3);
      this.s[2] = mix32((lo + 0x13198a2e) >>> 0);
      this.s[3] = mix32((hi + 0x03707344) >>> 0);
    }
    if ((this.s[0] | this.s[1] | this.s[2] | this.s[3]) === 0) this.s[0] = 1;
  }

  private nextU32(): number {
    const s = this.s;
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result;
  }

  /** Uniform in [0, 1) with 53 random bits. */
  nextFloat(): number {
    const a = this.nextU32() >>> 5; // 27 bits
    const b = this.nextU32() >>> 6; // 26 bits
    return (a * 67108864 + b) / 9007199254740992;
  }
}

function rotl(x: number, k: number): number {
  return (x << k) | (x >>> (32 - k));
}

/**
 * Indices of the `k` largest finite values of `row[0, n)`, sorted descending (ties: lower index first).
 * Bounded min-heap, O(n log k); the root is the worst kept entry, so most elements cost one comparison.
 */
function topIndices(row: Float32Array, n: number, k: number): Int32Array {
  const cap = Math.min(k, n);
  const hv = new Float32Array(cap); // heap values
  const hi = new Int32Array(cap);   // heap indices; an entry is worse when its value is smaller, or equal with a larger index
  let size = 0;
  const siftDown = (len: number): void => {
    const v = hv[0];
    const ix = hi[0];
    let i = 0;
    for (;;) {
      let c = 2 * i + 1;
      if (c >= len) break;
      const r = c + 1;
      if (r < len && (hv[r] < hv[c] || (hv[r] === hv[c] && hi[r] > hi[c]))) c = r;
      if (!(hv[c] < v || (hv[c] === v && hi[c] > ix))) break;
      hv[i] = hv[c];
      hi[i] = hi[c];
      i = c;
    }
    hv[i] = v;
    hi[i] = ix;
  };
  for (let i = 0; i < n; i++) {
    const v = row[i];
    if (v === -Infinity) continue;
    if (size < cap) {
      let j = size++;
      while (j > 0) {
        const p = (j - 1) >> 1;
        if (v > hv[p]) break; // i is the largest index so far, so on equal values it is the worse one
        hv[j] = hv[p];
        hi[j] = hi[p];
        j = p;
      }
      hv[j] = v;
      hi[j] = i;
    } else if (v > hv[0]) { // an equal value never wins: its index is larger than the root's
      hv[0] = v;
      hi[0] = i;
      siftDown(size);
    }
  }
  // Move the worst to the back repeatedly: out[0, size) ends up sorted best-first.
  const out = new Int32Array(size);
  for (let len = size; len > 0; len--) {
    out[len - 1] = hi[0];
    hv[0] = hv[len - 1];
    hi[0] = hi[len - 1];
    siftDown(len - 1);
  }
  return out;
}

/** Index of the largest logit in row[0, V), NaN never winning; throws when none is finite or +Infinity. */
function argmaxOf(row: Float32Array, V: number, none = 'sampler: every logit is -Infinity or NaN'): number {
  let m = -Infinity;
  let argmax = -1;
  for (let i = 0; i < V; i++) {
    const x = row[i];
    if (x > m) {
      m = x;
      argmax = i;
    }
  }
  if (argmax < 0) throw new Error(none);
  return argmax;
}

export class SequenceSampler {
  private readonly params: SamplingParams;
  private readonly vocabSize: number;
  private readonly rng: Xoshiro128;
  /** Generated-token counts (presence/frequency penalties; repetition penalty over generated). */
  private readonly generated = new Map<number, number>();
  /** Prompt ∪ generated, for the repetition penalty; only kept when that penalty is on. */
  private readonly seen: Set<number> | null;

  constructor(params: SamplingParams, promptIds: ArrayLike<number>, vocabSize: number) {
    if (!Number.isInteger(vocabSize) || vocabSize <= 0) throw new RangeError(`vocabSize must be a positive integer, got ${vocabSize}`);
    const { temperature, topP, topK, minP, repetitionPenalty, presencePenalty, frequencyPenalty, seed, logprobs } = params;
    if (!(temperature >= 0) || !Number.isFinite(temperature)) throw new RangeError(`temperature must be finite and >= 0, got ${temperature}`);
    if (!(topP > 0 && topP <= 1)) throw new RangeError(`topP must be in (0, 1], got ${topP}`);
    if (!Number.isInteger(topK) || topK < -1) throw new RangeError(`topK must be an integer >= -1, got ${topK}`);
    if (!(minP >= 0 && minP <= 1)) throw new RangeError(`minP must be in [0, 1], got ${minP}`);
    if (!(repetitionPenalty > 0) || !Number.isFinite(repetitionPenalty)) throw new RangeError(`repetitionPenalty must be finite and > 0, got ${repetitionPenalty}`);
    if (!Number.isFinite(presencePenalty) || !Number.isFinite(frequencyPenalty)) throw new RangeError('presencePenalty and frequencyPenalty must be finite');
    if (seed !== undefined && !Number.isFinite(seed)) throw new RangeError(`seed must be finite, got ${seed}`);
    if (logprobs !== undefined && (!Number.isInteger(logprobs) || logprobs < 0 || logprobs > MAX_TOP_LOGPROBS)) {
      throw new RangeError(`logprobs must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${logprobs}`);
    }
    this.params = { ...params };
    this.vocabSize = vocabSize;
    this.rng = new Xoshiro128(seed);
    if (repetitionPenalty !== 1) {
      this.seen = new Set();
      for (let i = 0; i < promptIds.length; i++) {
        const t = promptIds[i];
        if (t >= 0 && t < vocabSize) this.seen.add(t);
      }
    } else {
      this.seen = null;
    }
  }

  /** Plain greedy (no logprobs, no penalties): the next token is the largest logit that is not banned. */
  get greedy(): boolean {
    const p = this.params;
    return p.temperature < GREEDY_TEMPERATURE && p.logprobs === undefined && this.seen === null && p.frequencyPenalty === 0 && p.presencePenalty === 0;
  }

  /**
   * Greedy from a row's largest logits (largest first, ties lower id first), as sample() would pick from the
   * whole row. Undefined when the top holds no finite logit that is not banned (then the full row is needed).
   */
  sampleTop(top: { ids: ArrayLike<number>; values: ArrayLike<number> }, banned?: ArrayLike<number>): SampleResult | undefined {
    if (!this.greedy) throw new Error('sampleTop is for plain greedy sampling');
    for (let i = 0; i < top.ids.length; i++) {
      const id = top.ids[i];
      const value = top.values[i];
      if (value !== value || value === -Infinity) continue;
      if (banned !== undefined && Array.prototype.includes.call(banned, id)) continue;
      this.rng.nextFloat();
      return { token: this.accept(id) };
    }
    return undefined;
  }

  /**
   * With a mask, the drawn token is kept when the mask allows it; else the row is masked and drawn again with a
   * second uniform: together a draw from the masked distribution (greedy: the largest allowed logit).
   */
  sample(logits: Float32Array, banned?: ArrayLike<number>, mask?: TokenMask): SampleResult {
    const V = this.vocabSize;
    if (logits.length < V) throw new RangeError(`logits row has ${logits.length} columns, vocabSize is ${V}`);
    const row = logits;
    const p = this.params;
    // Exactly one uniform per call, drawn first, so a seeded stream depends only on the step count.
    const u = this.rng.nextFloat();

    // Plain greedy (banned tokens aside): one pass, nothing else to apply.
    if (this.greedy) {
      if (banned !== undefined) for (let i = 0; i < banned.length; i++) if (banned[i] >= 0 && banned[i] < V) row[banned[i]] = -Infinity;
      if (mask?.maskFirst) mask.apply(row);
      let token = argmaxOf(row, V);
      if (mask !== undefined && !mask.maskFirst && !mask.allows(token)) {
        mask.apply(row);
        token = argmaxOf(row, V);
      }
      return { token: this.accept(token) };
    }

    for (let i = 0; i < V; i++) if (row[i] !== row[i]) row[i] = -Infinity;

    // Logprobs are of the raw model distribution: log_softmax(raw logits), before penalties/temperature/bans.
    const wantLogprobs = p.logprobs !== undefined;
    let rawLse = 0;
    let topLogprobs: { token: number; logprob: number }[] | undefined;
    let saved: Map<number, number> | null = null;
    if (wantLogprobs) {
      let m = -Infinity;
      for (let i = 0; i < V; i++) if (row[i] > m) m = row[i];
      if (m === -Infinity) throw new Error('sampler: every logit is -Infinity or NaN');
      let s = 0;
      for (let i = 0; i < V; i++) s += Math.exp(row[i] - m);
      rawLse = m + Math.log(s);
      if (p.logprobs! > 0) {
        topLogprobs = Array.from(topIndices(row, V, p.logprobs!), (t) => ({ token: t, logprob: row[t] - rawLse }));
      }
      saved = new Map();
    }
    const set = (i: number, v: number): void => {
      if (saved !== null && !saved.has(i)) saved.set(i, row[i]);
      row[i] = v;
    };

    // Penalties (vLLM order: repetition, frequency, presence), touching only seen tokens.
    if (this.seen !== null) {
      const r = p.repetitionPenalty;
      for (const t of this.seen) {
        const x = row[t];
        set(t, x > 0 ? x / r : x * r);
      }
    }
    if (p.frequencyPenalty !== 0 || p.presencePenalty !== 0) {
      for (const [t, c] of this.generated) set(t, row[t] - c * p.frequencyPenalty - p.presencePenalty);
    }
    if (banned !== undefined) {
      for (let i = 0; i < banned.length; i++) {
        const t = banned[i];
        if (t >= 0 && t < V) set(t, -Infinity);
      }
    }
    if (mask?.maskFirst) {
      // Masked tokens' raw logits are only needed for logprobs of the chosen token, which is never masked.
      mask.apply(row);
    }

    let argmax = argmaxOf(row, V, 'sampler: every logit is -Infinity or NaN after penalties and banned tokens');
    let m = row[argmax];

    let token = p.temperature < GREEDY_TEMPERATURE ? argmax : this.draw(row, m, u);
    if (mask !== undefined && !mask.maskFirst && !mask.allows(token)) {
      mask.apply(row);
      argmax = argmaxOf(row, V, 'sampler: no allowed token has a finite logit');
      m = row[argmax];
      token = p.temperature < GREEDY_TEMPERATURE ? argmax : this.draw(row, m, this.rng.nextFloat());
    }

    this.accept(token);

    if (!wantLogprobs) return { token };
    const raw = saved!.has(token) ? saved!.get(token)! : row[token];
    const result: SampleResult = { token, logprob: raw - rawLse };
    if (topLogprobs !== undefined) result.topLogprobs = topLogprobs;
    return result;
  }

  /** Records a sampled token for the penalties of later steps. */
  private accept(token: number): number {
    this.generated.set(token, (this.generated.get(token) ?? 0) + 1);
    this.seen?.add(token);
    return token;
  }

  /** Temperature → top_k → top_p → min_p → inverse-CDF draw with `u`. `m` is the max of row[0, V). */
  private draw(row: Float32Array, m: number, u: number): number {
    const V = this.vocabSize;
    const { topP, minP } = this.params;
    const invT = 1 / this.params.temperature;
    const useTopK = this.params.topK > 0 && this.params.topK < V;

    if (useTopK) {
      const cand = topIndices(row, V, this.params.topK);
      const w = new Float64Array(cand.length);
      let mass = 0;
      for (let j = 0; j < cand.length; j++) mass += w[j] = Math.exp((row[cand[j]] - m) * invT);
      return drawFromCandidates(cand, w, mass, topP, minP, u); // top_p is relative to the top-k mass
    }

    // Unnormalised softmax weights; the max weight is exactly 1, so w >= minP is the min_p test.
    if (weightScratch.length < V) weightScratch = new Float64Array(V);
    const w = weightScratch;
    let total = 0;
    for (let i = 0; i < V; i++) total += w[i] = Math.exp((row[i] - m) * invT);

    if (topP >= 1) {
      // No candidate list needed: min_p is a linear threshold.
      if (minP > 0) {
        total = 0;
        for (let i = 0; i < V; i++) if (w[i] >= minP) total += w[i];
      }
      const target = u * total;
      let acc = 0;
      let last = -1;
      for (let i = 0; i < V; i++) {
        const x = w[i];
        if (x < minP || x === 0) continue;
        acc += x;
        last = i;
        if (acc > target) return i;
      }
      return last; // rounding: target reached the end of the cumulative sum
    }

    // Nucleus: the top K by heap, K doubled while their mass is still < topP of the full softmax.
    // No weight exceeds 1, so fewer than `need` tokens cannot reach it: start K at that bound.
    const need = topP * total;
    let k = TOP_P_INITIAL_K;
    while (k < need) k *= 2;
    let cand: Int32Array;
    for (;;) {
      cand = topIndices(row, V, k);
      if (cand.length < k || k >= V) break; // holds every finite token
      let mass = 0;
      for (let j = 0; j < cand.length; j++) mass += w[cand[j]];
      if (mass >= need) break;
      k *= 2;
    }
    const cw = new Float64Array(cand.length);
    for (let j = 0; j < cand.length; j++) cw[j] = w[cand[j]];
    return drawFromCandidates(cand, cw, total, topP, minP, u);
  }
}

/** Module-level weight buffer for full-vocabulary passes; `sample()` is synchronous, so sharing it is safe. */
let weightScratch = new Float64Array(0);

/**
 * Draws from candidates sorted best-first with weights `w` (w[0] = 1): keeps the shortest prefix whose
 * mass reaches `topP * total` (`total` = the top-k mass, or the full softmax normaliser), then drops
 * weights below `minP`, then samples the rest in proportion to their weights.
 */
function drawFromCandidates(cand: Int32Array, w: Float64Array, total: number, topP: number, minP: number, u: number): number {
  let n = cand.length;
  if (topP < 1) {
    const need = topP * total;
    let acc = 0;
    for (let j = 0; j < cand.length; j++) {
      acc += w[j];
      if (acc >= need) {
        n = j + 1;
        break;
      }
    }
  }
  if (minP > 0) {
    let j = 1; // the top candidate has weight 1 >= minP
    while (j < n && w[j] >= minP) j++;
    n = j;
  }
  let sum = 0;
  for (let j = 0; j < n; j++) sum += w[j];
  const target = u * sum;
  let acc = 0;
  let last = cand[0];
  for (let j = 0; j < n; j++) {
    if (w[j] === 0) continue;
    acc += w[j];
    last = cand[j];
    if (acc > target) return cand[j];
  }
  return last;
}
