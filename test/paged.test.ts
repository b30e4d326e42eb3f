/**
 * Native attention over the paged KV cache (native/attention, PagedRunner) against attention inside the
 * ONNX graph (TallyRunner): same rows, same logits, for several head layouts, multi-page prompts, chunks of
 * new tokens, padding rows and sequences that come and go; the float16 cache; page accounting; refusals.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { loadRunner, defaultThreads } from '../src/engine/runners/load.ts';
import { ATTENTION_ADDON_PATH, loadAttentionAddon } from '../src/engine/runners/native-attention.ts';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { loadModelFolder } from '../src/model/folder.ts';
import type { KvCacheDtype } from '../src/engine/protocol.ts';
import path from 'node:path';
import { SHARED_MODELS, randomLike, storiesModel } from './helpers/models.ts';
import { explainEngineError } from '../src/config/serve-config.ts';
import { EngineOptionError } from '../src/engine/protocol.ts';
import { maxLogitDifference, tokens } from './helpers/runner-compare.ts';

beforeAll(() => {
  if (!fs.existsSync(ATTENTION_ADDON_PATH)) {
    const r = spawnSync(process.execPath, ['scripts/build-native.js', 'attention'], { encoding: 'utf8' });
    expect(fs.existsSync(ATTENTION_ADDON_PATH), r.stderr).toBe(true);
  }
});

async function runners(dir: string, kvCacheDtype: KvCacheDtype) {
  const folder = loadModelFolder(dir);
  const options = { device: { kind: 'cpu' as const }, threads: 2, maxSlots: 8, maxModelLen: 256, kvCacheBytes: 2 ** 26 };
  const native = (await loadRunner(folder, { ...options, attention: 'native', runner: 'js', kvCacheDtype })).runner;
  const graph = (await loadRunner(folder, { ...options, attention: 'onnx' })).runner;
  return { native, graph, vocab: folder.config.vocab_size };
}

describe('native attention over the paged cache', () => {
  const layouts: [string, () => string][] = [
    ['stories260K (8 heads, 4 KV heads, head_dim 8)', () => storiesModel()],
    ['GQA 6/2, head_dim 16', () => randomLike('SmolLM2-135M-Instruct', { num_hidden_layers: 2, hidden_size: 96, intermediate_size: 128, num_attention_heads: 6, num_key_value_heads: 2, head_dim: 16 })],
    ['3 heads on 1 KV head, head_dim 64', () => randomLike('SmolLM2-135M-Instruct', { num_hidden_layers: 2, hidden_size: 192, intermediate_size: 128, num_attention_heads: 3, num_key_value_heads: 1, head_dim: 64 })],
    ['head_dim 12 (not a multiple of 8: the portable kernels)', () => randomLike('Qwen2.5-0.5B-Instruct', { num_hidden_layers: 2, hidden_size: 48, intermediate_size: 96, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 12 })],
  ];
  for (const [name, model] of layouts) {
    it(`gives the logits attention inside the graph gives: ${name}`, async () => {
      const { native, graph, vocab } = await runners(model(), 'float32');
      expect(native.kind).toBe('paged');
      expect(graph.kind).toBe('slot');
      expect(await maxLogitDifference(native, graph, vocab)).toBeLessThan(1e-3);
      await native.release();
      await graph.release();
    });
  }

  it.each(layouts.slice(0, 2))('with a float16 cache: half the bytes, logits close to the float32 ones (and not identical): %s', async (_name, model) => {
    const dir = model();
    const { native, graph, vocab } = await runners(dir, 'float16');
    const fp32 = (await runners(dir, 'float32')).native;
    expect(native.kvElementBytes).toBe(2);
    const diff = await maxLogitDifference(native, graph, vocab);
    expect(diff).toBeGreaterThan(0);
    expect(diff).toBeLessThan(0.05);
    for (const s of [0, 1]) fp32.open(s);
    await fp32.forward([{ seq: 0, tokens: tokens(70, 0) }, { seq: 1, tokens: [1] }]);
    const open = [0, 1, 3, 4].filter((s) => { try { native.cachedLength(s); return true; } catch { return false; } });
    for (const s of open) native.close(s);
    for (const s of [0, 1]) native.open(s);
    await native.forward([{ seq: 0, tokens: tokens(70, 0) }, { seq: 1, tokens: [1] }]);
    expect(native.kvBytes() * 2).toBe(fp32.kvBytes());
    await Promise.all([native.release(), graph.release(), fp32.release()]);
  });

  it.each(['js', 'native'] as const)('holds whole pages per sequence, returns them on close and reuses them; refuses what it cannot hold (%s runner)', async (runnerChoice) => {
    const folder = loadModelFolder(storiesModel());
    const { runner } = await loadRunner(folder, { device: { kind: 'cpu' }, maxSlots: 2, maxModelLen: 200, attention: 'native', runner: runnerChoice, kvCacheTokens: 128 });
    expect(runner.kind).toBe(runnerChoice === 'js' ? 'paged' : 'native');
    expect(runner.kvElementBytes).toBe(2);
    const page = 64 * folder.config.num_hidden_layers * 2 * folder.config.num_key_value_heads * (folder.config.hidden_size / folder.config.num_attention_heads) * 2;
    runner.open(0);
    expect(runner.kvBytes()).toBe(0);
    await runner.forward([{ seq: 0, tokens: tokens(65, 0) }]);
    expect(runner.kvBytes()).toBe(2 * page);
    runner.open(1);
    expect(() => runner.open(2)).toThrow(/no free KV slot/);
    // 128 tokens of capacity + one page of slack per sequence: 4 pages; sequence 0 holds 2.
    await runner.forward([{ seq: 1, tokens: tokens(120, 1) }]);
    expect(runner.kvBytes()).toBe(4 * page);
    await expect(runner.forward([{ seq: 0, tokens: tokens(70, 2) }])).rejects.toThrow(/no free page/);
    await expect(runner.forward([{ seq: 1, tokens: tokens(90, 2) }])).rejects.toThrow(/exceed the model length 200/);
    runner.close(1);
    expect(runner.kvBytes()).toBe(2 * page);
    runner.open(1);
    await runner.forward([{ seq: 1, tokens: [1, 2, 3] }]);
    expect(runner.cachedLength(1)).toBe(3);
    expect(runner.kvBytes()).toBe(3 * page);
    await runner.release();
  });

  it('the addon refuses arguments that do not fit together, with a message', () => {
    const loaded = loadAttentionAddon();
    if ('reason' in loaded) throw new Error(loaded.reason);
    const a = loaded.binding;
    const f = (n: number) => new Float32Array(n);
    const dims = Int32Array.of(1, 2, 1, 8, 1);
    const arena = f(1 * 2 * 1 * 64 * 8);
    // One token: 2 query heads and 1 KV head of head_dim 8 → qkv holds (2 + 2) * 8 floats; rotary tables for 128 positions.
    const [cos, sin] = [f(128 * 4), f(128 * 4)];
    const one = Int32Array.of(1, 0, 0);
    expect(() => a.attend(arena, f(32), f(16), one, Int32Array.of(0), dims, cos, sin)).not.toThrow();
    expect(() => a.attend(arena, f(31), f(16), one, Int32Array.of(0), dims, cos, sin)).toThrow(/qkv must hold/);
    expect(() => a.attend(arena, f(32), f(15), one, Int32Array.of(0), dims, cos, sin)).toThrow(/out must hold/);
    expect(() => a.attend(arena, f(32), f(16), Int32Array.of(1, 70, 0), Int32Array.of(0), dims, cos, sin)).toThrow(/page list is shorter/);
    expect(() => a.attend(arena, f(32), f(16), Int32Array.of(1, 127, 0), Int32Array.of(0, 0), dims, cos, sin)).not.toThrow();
    expect(() => a.attend(arena, f(32), f(16), Int32Array.of(1, 128, 0), Int32Array.of(0, 0, 0), dims, cos, sin)).toThrow(/past the rotary tables/);
    expect(() => a.attend(arena, f(32), f(16), one, Int32Array.of(3), dims, cos, sin)).toThrow(/outside the arena/);
    expect(() => a.attend(f(10), f(32), f(16), one, Int32Array.of(0), dims, cos, sin)).toThrow(/arena must hold/);
    expect(() => a.attend(arena, f(32), f(16), one, Int32Array.of(0), dims, cos, f(10))).toThrow(/cos and sin/);
    expect(() => a.attend(arena, f(32), f(16), one, Int32Array.of(0), Int32Array.of(1, 3, 2, 8, 1), cos, sin)).toThrow(/bad dims/);
  });

  it('a float16 cache saturates values past its range at ±65504 instead of storing infinities (vector and scalar paths)', () => {
    const loaded = loadAttentionAddon();
    if ('reason' in loaded) throw new Error(loaded.reason);
    const a = loaded.binding;
    // One head, one token at position 0: it sees only itself, so its output is its own value row. With
    // head_dim 12, elements 8-11 go through the scalar conversion.
    const v = [1e6, -1e6, Infinity, -Infinity, 65504, 70000, 1.5, NaN, 1e6, -Infinity, NaN, 2];
    const saturated = v.map((x) => (Number.isNaN(x) ? x : Math.max(-65504, Math.min(65504, x))));
    for (const hd of [8, 12]) {
      const dims = Int32Array.of(1, 1, 1, hd, 1);
      const [cos, sin] = [new Float32Array(128 * (hd / 2)).fill(1), new Float32Array(128 * (hd / 2))];
      const qkv = Float32Array.from([...Array(2 * hd).fill(0), ...v.slice(0, hd)]);
      for (const [arena, expected] of [
        [new Uint16Array(2 * 64 * hd), saturated.slice(0, hd)],
        [new Float32Array(2 * 64 * hd), v.slice(0, hd)],
      ] as const) {
        const out = new Float32Array(hd);
        a.attend(arena, qkv, out, Int32Array.of(1, 0, 0), Int32Array.of(0), dims, cos, sin);
        expect([...out], `head_dim ${hd}, ${arena.constructor.name}`).toEqual(expected);
      }
    }
  });

  it('positions past a row\'s length never reach its output, whatever a reused page holds there (NaN here)', () => {
    const loaded = loadAttentionAddon();
    if ('reason' in loaded) throw new Error(loaded.reason);
    const a = loaded.binding;
    let seed = 5;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32 - 0.5) * 4;
    // 2 query heads on 1 KV head; head_dim 8 (the AVX-512 machines' fused kernel) and 16; a token at a time up to
    // 70 positions (odd and even counts, a second page), so every step's last block and page are partly stale.
    for (const hd of [8, 16]) {
      const dims = Int32Array.of(1, 2, 1, hd, 2);
      const [cos, sin] = [new Float32Array(128 * (hd / 2)).fill(1), new Float32Array(128 * (hd / 2))];
      const qkv = Array.from({ length: 70 }, () => Float32Array.from({ length: 4 * hd }, rnd));
      for (const make of [(n: number) => new Float32Array(n), (n: number) => new Uint16Array(n)]) {
        const outputs = (stale: number) => {
          const arena = make(2 * 2 * 64 * hd).fill(stale);
          return qkv.map((x, len) => {
            const out = new Float32Array(2 * hd);
            a.attend(arena, x, out, Int32Array.of(1, len, 0), Int32Array.of(1, 0), dims, cos, sin);
            return [...out];
          });
        };
        const clean = outputs(0);
        expect(clean.flat().every(Number.isFinite)).toBe(true);
        expect(outputs(make(1) instanceof Uint16Array ? 0x7e00 : NaN), `head_dim ${hd}`).toEqual(clean);
      }
    }
  });

  it('the engine takes the native runner (native attention) with a float16 cache on the CPU by default; --attention onnx and --kv-cache-dtype say what they need', async () => {
    const base = { modelDir: storiesModel(), device: { kind: 'cpu' as const }, maxNumSeqs: 4, maxNumBatchedTokens: 64, kvCacheBytes: 2 ** 24 };
    const byDefault = await createEngineCore(base, () => {}, () => {});
    expect(byDefault.info.runner).toBe('native');
    expect(byDefault.info.kvCacheDtype).toBe('float16');
    // stories260K is far below SMALL_MODEL_FLOPS_PER_TOKEN: one intra-op thread unless --threads says otherwise.
    expect(byDefault.info.threads).toBe(1);
    await byDefault.release();
    const twoThreads = await createEngineCore({ ...base, threads: 2 }, () => {}, () => {});
    expect(twoThreads.info.threads).toBe(2);
    await twoThreads.release();
    const smol = JSON.parse(fs.readFileSync(path.join(SHARED_MODELS, 'SmolLM2-135M-Instruct', 'config.json'), 'utf8'));
    expect(defaultThreads(smol)).toBe(os.availableParallelism());
    const inGraph = await createEngineCore({ ...base, attention: 'onnx' }, () => {}, () => {});
    expect(inGraph.info.runner).toBe('slot');
    await inGraph.release();
    expect(inGraph.info.kvCacheDtype).toBe('float32');
    const refused = await createEngineCore({ ...base, attention: 'onnx', kvCacheDtype: 'float16' }, () => {}, () => {}).catch((e: Error) => e);
    expect(refused).toBeInstanceOf(EngineOptionError);
    expect((refused as EngineOptionError).option).toBe('kvCacheDtype');
    // The engine does not know flags; the configuration says the message with the flag that set the option.
    expect(explainEngineError(refused).message).toBe("--kv-cache-dtype float16: this graph's KV cache is float32, and only native attention stores another type (attention is set to onnx)");
    // The JavaScript runners: native attention takes float32 graphs only, and a float16 graph keeps its cache type.
    const fp16Graph = await createEngineCore({ ...base, modelDir: storiesModel('float16'), kvCacheDtype: 'float16', runner: 'js' }, () => {}, () => {});
    expect([fp16Graph.info.runner, fp16Graph.info.kvCacheDtype]).toEqual(['slot', 'float16']);
    await fp16Graph.release();
    await expect(createEngineCore({ ...base, modelDir: storiesModel('float16'), kvCacheDtype: 'float32', runner: 'js' }, () => {}, () => {})).rejects.toThrow(/this graph's KV cache is float16/);
    await expect(createEngineCore({ ...base, modelDir: storiesModel('float16'), attention: 'native', runner: 'js' }, () => {}, () => {})).rejects.toThrow(/^native: native attention runs float32 graphs/);
    // The native runner runs a float16 graph's parts with a cache of either type.
    for (const kvCacheDtype of ['float16', 'float32'] as const) {
      const nativeFp16 = await createEngineCore({ ...base, modelDir: storiesModel('float16'), kvCacheDtype }, () => {}, () => {});
      expect([nativeFp16.info.runner, nativeFp16.info.kvCacheDtype]).toEqual(['native', kvCacheDtype]);
      await nativeFp16.release();
    }
    // float16 elements (the default): the same --kv-cache-gb holds twice the tokens.
    const half = await createEngineCore(base, () => {}, () => {});
    const full = await createEngineCore({ ...base, kvCacheDtype: 'float32' }, () => {}, () => {});
    expect(full.info.kvCacheDtype).toBe('float32');
    expect(half.info.limits.kvCapacityTokens).toBe(2 * full.info.limits.kvCapacityTokens);
    await Promise.all([half.release(), full.release()]);
  });
});
