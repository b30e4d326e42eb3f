import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildLlamaGraph } from '../src/model/llama-graph.ts';
import { randomWeights } from '../src/model/random.ts';
import type { LlamaConfig } from '../src/model/types.ts';
import { writeModelFolder, loadModelFolder } from '../src/model/folder.ts';
import { loadRunner } from '../src/engine/runners/load.ts';
import { referenceLogits } from './helpers/reference-llama.ts';

const tiny: LlamaConfig = {
  model_type: 'llama', hidden_size: 48, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 6,
  num_key_value_heads: 2, vocab_size: 80, max_position_embeddings: 160, rms_norm_eps: 1e-5, rope_theta: 10000,
  tie_word_embeddings: true,
};

/** Scales some of head_dim 8's frequencies, smooths others and keeps the rest (wavelengths 6 to ~6000). */
const LLAMA3_ROPE = { rope_type: 'llama3', factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 64 };

function maxDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

function folderFor(config: LlamaConfig, iface: 'tally' | 'hf', positionIds = true) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-graph-'));
  const weights = randomWeights(config, 7);
  // Larger weights than the default init so that attention patterns are far from uniform.
  for (const [name, t] of weights) if (!name.includes('norm')) t.data.forEach((v, i) => (t.data[i] = v * 10));
  writeModelFolder(dir, {
    config, generationConfig: {}, tokenizerJson: {}, tokenizerConfig: {},
    graph: buildLlamaGraph(config, weights, { interface: iface, positionIds }),
  });
  return { folder: loadModelFolder(dir), weights };
}

const seqA = [1, 5, 9, 33, 2, 71, 40, 12, 7, 7, 7, 60];
const seqB = [3, 44, 19, 8, 61, 22, 5, 78, 30];
const seqC = [11, 12];

describe.each([
  ['tally (native runner)', tiny, true, 'native', 'native'],
  ['tally (native attention, JavaScript runner)', tiny, true, 'native', 'js'],
  ['tally (attention in the graph)', tiny, true, 'onnx', undefined],
  ['hf', tiny, true, undefined, undefined],
  ['hf without position_ids', tiny, false, undefined, undefined],
  ['tally with qwen2 biases, untied (native runner)', { ...tiny, model_type: 'qwen2', tie_word_embeddings: false }, true, 'native', 'native'],
  ['tally with qwen2 biases, untied (native attention, JavaScript runner)', { ...tiny, model_type: 'qwen2', tie_word_embeddings: false }, true, 'native', 'js'],
  ['tally with qwen2 biases, untied (attention in the graph)', { ...tiny, model_type: 'qwen2', tie_word_embeddings: false }, true, 'onnx', undefined],
  ['tally with qwen3 q/k norms and head_dim 16 (native runner)', { ...tiny, model_type: 'qwen3', head_dim: 16 }, true, 'native', 'native'],
  ['tally with qwen3 q/k norms and head_dim 16 (native attention, JavaScript runner)', { ...tiny, model_type: 'qwen3', head_dim: 16 }, true, 'native', 'js'],
  ['tally with qwen3 q/k norms and head_dim 16 (attention in the graph)', { ...tiny, model_type: 'qwen3', head_dim: 16 }, true, 'onnx', undefined],
  ['hf with qwen3 q/k norms', { ...tiny, model_type: 'qwen3', head_dim: 16 }, true, undefined, undefined],
  ['tally with llama3 rope_scaling (native runner)', { ...tiny, rope_scaling: LLAMA3_ROPE }, true, 'native', 'native'],
  ['tally with llama3 rope_scaling (native attention, JavaScript runner)', { ...tiny, rope_scaling: LLAMA3_ROPE }, true, 'native', 'js'],
  ['tally with llama3 rope_scaling (attention in the graph)', { ...tiny, rope_scaling: LLAMA3_ROPE }, true, 'onnx', undefined],
] as const)('%s graph', (name, config, positionIds, attention, runnerChoice) => {
  it('matches a direct forward pass, batched and chunked, token by token', async () => {
    const { folder, weights } = folderFor(config as LlamaConfig, name.startsWith('hf') ? 'hf' : 'tally', positionIds);
    // The float32 cache: the reference is float32 throughout (the float16 cache is tested in paged.test.ts).
    const { runner } = await loadRunner(folder, { device: { kind: 'cpu' }, maxSlots: 8, maxModelLen: 160, attention, runner: runnerChoice, kvCacheDtype: attention === 'native' ? 'float32' : undefined });
    expect(runner.kind).toBe(name.startsWith('hf') ? 'plain' : attention === 'native' ? (runnerChoice === 'js' ? 'paged' : 'native') : 'slot');
    const refs = [seqA, seqB, seqC].map((s) => referenceLogits(config as LlamaConfig, weights, s));
    [1, 2, 3].forEach((s) => runner.open(s));
    // Prefill A in two chunks and B in one, batched; C alone; then decode all three together.
    const step = async (rows: { seq: number; tokens: number[] }[]) => (await runner.forward(rows)).logits;
    let out = await step([{ seq: 1, tokens: seqA.slice(0, 4) }, { seq: 2, tokens: seqB.slice(0, 6) }]);
    expect(maxDiff(out[0], refs[0][3])).toBeLessThan(1e-3);
    expect(maxDiff(out[1], refs[1][5])).toBeLessThan(1e-3);
    out = await step([{ seq: 1, tokens: seqA.slice(4, 9) }, { seq: 3, tokens: seqC.slice(0, 1) }]);
    expect(maxDiff(out[0], refs[0][8])).toBeLessThan(1e-3);
    expect(maxDiff(out[1], refs[2][0])).toBeLessThan(1e-3);
    for (let i = 0; i < 3; i++) {
      const rows = [{ seq: 3, tokens: [seqC[1]] }, { seq: 1, tokens: [seqA[9 + i]] }];
      if (i < 3) rows.push({ seq: 2, tokens: [seqB[6 + i]] });
      if (i > 0) rows.shift();
      out = await step(rows);
      const expected = rows.map((r) => (r.seq === 1 ? refs[0][9 + i] : r.seq === 2 ? refs[1][6 + i] : refs[2][1]));
      out.forEach((o, j) => expect(maxDiff(o, expected[j])).toBeLessThan(1e-3));
    }
    // A sequence that closes frees its slot; a new one reuses it and still matches.
    runner.close(1);
    runner.open(4);
    out = await step([{ seq: 4, tokens: seqC }]);
    expect(maxDiff(out[0], refs[2][1])).toBeLessThan(1e-3);
    expect(runner.cachedLength(2)).toBe(9);
    // A long sequence grows the cache; once it leaves, the memory comes back and the others' caches
    // survive (the slot runner re-lays them out at a smaller capacity; the paged one frees the sequence's pages).
    runner.open(5);
    await step([{ seq: 5, tokens: Array.from({ length: 130 }, (_, i) => (i * 7) % 80) }]);
    const grown = runner.kvBytes();
    runner.close(5);
    out = await step([{ seq: 2, tokens: [5] }]);
    if (runner.kind === 'paged' || runner.kind === 'native') expect(runner.kvBytes()).toBe(grown / 2); // 3 of 6 pages were sequence 5's
    else expect(runner.kvBytes()).toBeLessThan(grown / 2);
    expect(maxDiff(out[0], referenceLogits(config as LlamaConfig, weights, [...seqB, 5])[9])).toBeLessThan(1e-3);
    await runner.release();
  });
});

describe.each([
  ['whole graph', 'onnx' as const, undefined],
  ['parts around native attention, JavaScript runner', 'native' as const, 'js' as const],
  ['parts around native attention, native runner', 'native' as const, 'native' as const],
])('top logits of Tally graphs (%s)', (_, attention, runnerChoice) => {
  it('forwardTop gives each row its k largest logits (16 at most, the default), largest first, ties to the lower id, as the full rows have them', async () => {
    const { folder } = folderFor(tiny, 'tally');
    const open = async () => {
      const { runner } = await loadRunner(folder, { device: { kind: 'cpu' }, attention, runner: runnerChoice, maxSlots: 4, maxModelLen: 160 });
      [1, 2, 3].forEach((s) => runner.open(s));
      return runner;
    };
    const [full, top] = [await open(), await open()];
    expect(full.kind).toBe(attention === 'native' ? (runnerChoice === 'js' ? 'paged' : 'native') : 'slot');
    expect(full.topLogits).toBe(16);
    const steps: [{ seq: number; tokens: number[] }[], number | undefined][] = [
      [[{ seq: 1, tokens: seqA.slice(0, 5) }, { seq: 2, tokens: seqB }], undefined],
      [[{ seq: 3, tokens: seqC }, { seq: 1, tokens: [seqA[5]] }, { seq: 2, tokens: [4] }], 1],
      [[{ seq: 2, tokens: [9] }, { seq: 3, tokens: [1] }], 2],
      [[{ seq: 1, tokens: [7] }, { seq: 3, tokens: [2] }], 5],
    ];
    for (const [rows, k] of steps) {
      const { logits } = await full.forward(rows);
      const { top: got } = await top.forwardTop!(rows, k);
      logits.forEach((row, r) => {
        const ids = Array.from(row.keys()).sort((a, b) => row[b] - row[a] || a - b).slice(0, k ?? 16);
        expect(got[r].ids).toEqual(ids);
        expect(got[r].values).toEqual(ids.map((i) => row[i]));
      });
    }
    await expect(top.forwardTop!([{ seq: 1, tokens: [3] }], 17)).rejects.toThrow(/k must be an integer in 1 … 16, got 17/);
    await full.release();
    await top.release();
  });
});
