/**
 * Pure statistics for the benchmark: no clocks, no I/O, so that every figure can be checked exactly.
 *
 * Percentiles use linear interpolation between closest ranks, numpy.percentile's default method
 * ("linear", Hyndman & Fan type 7): for sorted values x[0..n-1] and p in [0, 100], h = (n − 1)·p/100 and
 * the percentile is x[⌊h⌋] + (h − ⌊h⌋)·(x[⌊h⌋ + 1] − x[⌊h⌋]). The standard deviation is the population
 * one (numpy.std's default, ddof = 0).
 */

/** The p-th percentile (0..100) of values sorted ascending; NaN for no values. */
export function percentileSorted(sorted: readonly number[], p: number): number {
  const n = sorted.length;
  if (n === 0) return NaN;
  if (!(p >= 0 && p <= 100)) throw new RangeError(`percentile must be within 0..100 (got ${p})`);
  const h = ((n - 1) * p) / 100;
  const lo = Math.floor(h);
  const hi = Math.min(lo + 1, n - 1);
  return sorted[lo] + (h - lo) * (sorted[hi] - sorted[lo]);
}

/** The p-th percentile (0..100) of values in any order. */
export function percentile(values: readonly number[], p: number): number {
  return percentileSorted([...values].sort((a, b) => a - b), p);
}

export interface Summary {
  count: number;
  mean: number | null;
  /** Population standard deviation. */
  stdev: number | null;
  min: number | null;
  max: number | null;
  /** Keyed "p50", "p90", "p99.9", ... */
  percentiles: Record<string, number | null>;
}

export const percentileKey = (p: number): string => `p${p}`;

export function summarize(values: readonly number[], percentiles: readonly number[]): Summary {
  const n = values.length;
  if (n === 0) {
    return { count: 0, mean: null, stdev: null, min: null, max: null, percentiles: Object.fromEntries(percentiles.map((p) => [percentileKey(p), null])) };
  }
  const sorted = [...values].sort((a, b) => a - b);
  let sum = 0;
  for (const v of sorted) sum += v;
  const mean = sum / n;
  let sq = 0;
  for (const v of sorted) sq += (v - mean) ** 2;
  return {
    count: n,
    mean,
    stdev: Math.sqrt(sq / n),
    min: sorted[0],
    max: sorted[n - 1],
    percentiles: Object.fromEntries(percentiles.map((p) => [percentileKey(p), percentileSorted(sorted, p)])),
  };
}

/** mulberry32: a small seeded PRNG, uniform in [0, 1). */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Exponential inter-arrival gap (seconds) of a Poisson process at `rate` per second, from a uniform u in [0, 1). */
export function exponentialGap(u: number, rate: number): number {
  return -Math.log(1 - u) / rate;
}

/** A standard normal variate from two uniforms (Box–Muller). */
export function normalVariate(u1: number, u2: number): number {
  return Math.sqrt(-2 * Math.log(1 - u1)) * Math.cos(2 * Math.PI * u2);
}
