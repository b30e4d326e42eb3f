/** Two runners fed the same steps, compared logit by logit. */
import { expect } from 'vitest';
import type { ForwardRow, ModelRunner } from '../../src/engine/runners/runner.ts';

/** n token ids, varied by seed, within stories260K-sized vocabularies. */
export const tokens = (n: number, seed: number) => Array.from({ length: n }, (_, i) => 3 + ((i * 37 + seed * 11) % 200));

/** Steps that open, grow and close sequences: multi-page prompts, chunks, decode (`decode` steps in each of two runs), padding rows. */
function* schedule(decode: [number, number]): Generator<{ open?: number[]; close?: number[]; rows: ForwardRow[] }> {
  yield { open: [0, 1, 2], rows: [{ seq: 0, tokens: tokens(5, 0) }, { seq: 1, tokens: [1, 7] }, { seq: 2, tokens: tokens(70, 2) }] };
  yield { open: [3], rows: [{ seq: 0, tokens: [44] }, { seq: 1, tokens: tokens(19, 1) }, { seq: 2, tokens: [48] }, { seq: 3, tokens: tokens(130, 3) }] };
  for (let i = 0; i < decode[0]; i++) yield { rows: [{ seq: 3, tokens: [12 + i] }, { seq: 0, tokens: [10 + i] }, { seq: 2, tokens: [11 + i] }] };
  yield { close: [2], open: [4], rows: [{ seq: 4, tokens: tokens(64, 4) }, { seq: 1, tokens: [9] }] };
  for (let i = 0; i < decode[1]; i++) yield { rows: [{ seq: 4, tokens: [20 + i] }, { seq: 1, tokens: [21 + i] }, { seq: 3, tokens: [22 + i] }] };
}

/** The largest difference between the two runners' logits over the schedule; their cached lengths must agree. */
export async function maxLogitDifference(a: ModelRunner, b: ModelRunner, vocab: number, decode: [number, number] = [12, 6]): Promise<number> {
  let diff = 0;
  for (const step of schedule(decode)) {
    for (const s of step.close ?? []) { a.close(s); b.close(s); }
    for (const s of step.open ?? []) { a.open(s); b.open(s); }
    const [x, y] = [await a.forward(step.rows), await b.forward(step.rows)];
    step.rows.forEach((r, i) => {
      expect(a.cachedLength(r.seq)).toBe(b.cachedLength(r.seq));
      for (let v = 0; v < vocab; v++) diff = Math.max(diff, Math.abs(x.logits[i][v] - y.logits[i][v]));
    });
  }
  return diff;
}
