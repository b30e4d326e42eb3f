import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import os from 'node:os';
import { GgufValueType, readGguf, writeGguf, type GgmlType } from '../src/model/gguf.ts';
import { ggmlTypeName } from '../src/model/ggml-quants.ts';
import { SHARED_MODELS } from './helpers/models.ts';

const DIR = path.join(SHARED_MODELS, 'quant-reference');
interface Expected { name: string; type: string; shape: number[]; sum: number; sum_sq: number; first8: number[]; max_abs_diff_vs_f32: number }
const expected = JSON.parse(fs.readFileSync(path.join(DIR, 'expected.json'), 'utf8')) as { files: Record<string, { tensors: Expected[] }> };

/** Neumaier-compensated sums: within a few ulps of the exact sums numpy's pairwise summation approximates. */
function sums(x: Float32Array): { sum: number; sumSq: number; sumAbs: number } {
  let s = 0, cs = 0, q = 0, cq = 0, a = 0;
  const add = (acc: number, c: number, v: number): [number, number] => {
    const t = acc + v;
    return [t, c + (Math.abs(acc) >= Math.abs(v) ? acc - t + v : v - t + acc)];
  };
  for (let i = 0; i < x.length; i++) {
    [s, cs] = add(s, cs, x[i]);
    [q, cq] = add(q, cq, x[i] * x[i]);
    a += Math.abs(x[i]);
  }
  return { sum: s + cs, sumSq: q + cq, sumAbs: a };
}

describe('GGUF quantised tensors match llama.cpp dequantisation (quant-reference/expected.json)', () => {
  for (const [file, { tensors }] of Object.entries(expected.files)) {
    it(file, () => {
      const g = readGguf(path.join(DIR, file));
      expect(g.tensors.map((t) => t.name)).toEqual(tensors.map((t) => t.name));
      for (const e of tensors) {
        const info = g.tensors.find((t) => t.name === e.name)!;
        expect(ggmlTypeName(info.type), e.name).toBe(e.type);
        expect(info.shape, e.name).toEqual(e.shape);
        const x = g.tensorData(e.name);
        // first8 are exact float32 values (-0.0 included).
        expect(Array.from(x.subarray(0, 8)), e.name).toEqual(e.first8);
        const { sum, sumSq, sumAbs } = sums(x);
        // numpy's pairwise float64 sums differ from exact ones by ~log2(n) ulps of the absolute sum.
        expect(Math.abs(sum - e.sum), `${e.name} sum`).toBeLessThanOrEqual(1e-9 * Math.abs(e.sum) + 1e-13 * sumAbs);
        expect(Math.abs(sumSq - e.sum_sq), `${e.name} sum_sq`).toBeLessThanOrEqual(1e-9 * e.sum_sq);
      }
    });
  }

  it('a type it cannot decode is named in the error', () => {
    const file = path.join(os.tmpdir(), `q5_0-${process.pid}.gguf`);
    writeGguf(file, { 'general.architecture': { type: GgufValueType.STRING, value: 'llama' } }, [{ name: 'w', shape: [32], type: 6 as GgmlType, data: new Uint8Array(22) }]);
    try {
      expect(() => readGguf(file).tensorData('w')).toThrow(/type 6, which this reader can't decode/);
    } finally {
      fs.rmSync(file, { force: true });
    }
  });
});
