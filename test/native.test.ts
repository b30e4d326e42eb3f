/**
 * The native runner (native/ort): the addon against the ONNX Runtime library it opens (version, the C API table
 * on a tiny graph, refusals), and NativeRunner against the JavaScript runners on the same rows.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { loadRunner } from '../src/engine/runners/load.ts';
import { ATTENTION_ADDON_PATH } from '../src/engine/runners/native-attention.ts';
import { ORT_ADDON_PATH, createNativeSession, defaultOrtLibrary, loadOrtAddon, openOrt } from '../src/engine/runners/native-ort.ts';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { loadModelFolder } from '../src/model/folder.ts';
import { DataType, encodeModel, type ModelSpec } from '../src/model/onnx-proto.ts';
import type { ForwardRow } from '../src/engine/runners/runner.ts';
import { EngineOptionError } from '../src/engine/protocol.ts';
import { explainEngineError } from '../src/config/serve-config.ts';
import { randomLike, storiesModel } from './helpers/models.ts';
import { maxLogitDifference, tokens } from './helpers/runner-compare.ts';

beforeAll(() => {
  for (const [name, file] of [['ort', ORT_ADDON_PATH], ['attention', ATTENTION_ADDON_PATH]]) {
    if (!fs.existsSync(file)) {
      const r = spawnSync(process.execPath, ['scripts/build-native.js', name], { encoding: 'utf8' });
      expect(fs.existsSync(file), r.stderr).toBe(true);
    }
  }
});

const ortNodeVersion = (createRequire(import.meta.url)('onnxruntime-node/package.json') as { version: string }).version;

/** c = a + b (float32), d = c as int64. */
const tinyGraph: ModelSpec = {
  graphName: 'tiny',
  nodes: [
    { opType: 'Add', inputs: ['a', 'b'], outputs: ['c'], name: 'add' },
    { opType: 'Cast', inputs: ['c'], outputs: ['d'], name: 'cast', attributes: { to: DataType.INT64 } },
  ],
  inputs: [{ name: 'a', type: DataType.FLOAT, dims: ['n'] }, { name: 'b', type: DataType.FLOAT, dims: ['n'] }],
  outputs: [{ name: 'c', type: DataType.FLOAT, dims: ['n'] }, { name: 'd', type: DataType.INT64, dims: ['n'] }],
  initializers: [],
  opsets: [{ domain: '', version: 17 }],
  metadata: {},
};

describe('the native/ort addon and the ONNX Runtime library', () => {
  it('says clearly what it cannot open', () => {
    const loaded = loadOrtAddon();
    if ('reason' in loaded) throw new Error(loaded.reason);
    const { binding } = loaded;
    expect(() => binding.load('/nonexistent/libonnxruntime.so')).toThrow(/^cannot open the ONNX Runtime library \/nonexistent\/libonnxruntime.so: /);
    expect(() => binding.load(ATTENTION_ADDON_PATH)).toThrow(/is not an ONNX Runtime library \(it has no OrtGetApiBase\)$/);
  });

  it("opens onnxruntime-node's own library, agrees with it on the version, and refuses a C API version it lacks", () => {
    const opened = openOrt();
    if ('reason' in opened) throw new Error(opened.reason);
    expect(opened.ort.path).toBe(defaultOrtLibrary());
    expect(opened.ort.version).toBe(ortNodeVersion);
    expect(opened.ort.apiVersion).toBe(13);
    expect(opened.ort.providers).toContain('CPUExecutionProvider');
    expect(() => opened.binding.load(defaultOrtLibrary(), 1000)).toThrow(`is version ${ortNodeVersion}, which does not offer C API version 1000`);
    // One library per process.
    expect(() => opened.binding.load('/tmp/other/libonnxruntime.so.1')).toThrow(/already loaded from .* cannot be loaded beside it/);
    expect(opened.binding.load(defaultOrtLibrary()).version).toBe(ortNodeVersion);
  });

  it('runs a tiny graph with its inputs and outputs bound to the arrays given, and reports ONNX Runtime errors', () => {
    const opened = openOrt();
    if ('reason' in opened) throw new Error(opened.reason);
    const { binding } = opened;
    const session = createNativeSession(binding, encodeModel(tinyGraph).model, { threads: 1 });
    expect(binding.sessionNames(session)).toEqual({ inputs: ['a', 'b'], outputs: ['c', 'd'] });
    const c = new Float32Array(4).fill(-1);
    const d = new BigInt64Array(4);
    binding.sessionRun(session, [['a', Float32Array.of(1, 2, 3), [3]], ['b', Float32Array.of(10, 20, 30.5), [3]]], [['c', c, [3]], ['d', d, [3]]]);
    expect([...c]).toEqual([11, 22, 33.5, -1]);
    expect([...d]).toEqual([11n, 22n, 33n, 0n]);
    binding.sessionRun(session, [['a', Float32Array.of(2), [1]], ['b', Float32Array.of(5), [1]]], [['c', c, [1]], ['d', d, [1]]]);
    expect(c[0]).toBe(7);
    // Shapes that do not agree are ONNX Runtime's error, said as it says it.
    expect(() => binding.sessionRun(session, [['a', Float32Array.of(1, 2), [2]], ['b', Float32Array.of(1, 2, 3), [3]]], [['c', c, [3]]])).toThrow(/broadcast|dimension|shape/i);
    expect(() => binding.sessionRun(session, [['a', Float32Array.of(1), [5]]], [])).toThrow(/dims within the array/);
    binding.release(session);
    expect(() => binding.sessionNames(session)).toThrow(/live session/);
  });
});

describe('NativeRunner', () => {
  const options = { device: { kind: 'cpu' as const }, threads: 2, maxSlots: 8, maxModelLen: 256, kvCacheBytes: 2 ** 26 };
  const layouts: [string, () => string][] = [
    ['stories260K (8 heads, 4 KV heads, head_dim 8)', () => storiesModel()],
    ['GQA 6/2, head_dim 16', () => randomLike('SmolLM2-135M-Instruct', { num_hidden_layers: 2, hidden_size: 96, intermediate_size: 128, num_attention_heads: 6, num_key_value_heads: 2, head_dim: 16 })],
  ];
  for (const [name, model] of layouts) {
    for (const kvCacheDtype of ['float32', 'float16'] as const) {
      it(`gives the logits the JavaScript runner gives with the same kernels (${kvCacheDtype} cache): ${name}`, async () => {
        const folder = loadModelFolder(model());
        const native = (await loadRunner(folder, { ...options, runner: 'native', kvCacheDtype })).runner;
        const js = (await loadRunner(folder, { ...options, runner: 'js', attention: 'native', kvCacheDtype })).runner;
        expect([native.kind, js.kind]).toEqual(['native', 'paged']);
        expect(native.kvElementBytes).toBe(js.kvElementBytes);
        expect(await maxLogitDifference(native, js, folder.config.vocab_size, [6, 4])).toBeLessThan(1e-4);
        expect(native.kvBytes()).toBe(js.kvBytes());
        await native.release();
        await js.release();
      });
    }
  }

  it('a float16 graph: logits close to the float32 graph attended in the graph', async () => {
    const fp16 = loadModelFolder(storiesModel('float16'));
    const native = (await loadRunner(fp16, { ...options, runner: 'native', kvCacheDtype: 'float32' })).runner;
    const slot = (await loadRunner(loadModelFolder(storiesModel()), { ...options, attention: 'onnx' })).runner;
    expect(native.kind).toBe('native');
    expect(await maxLogitDifference(native, slot, fp16.config.vocab_size, [6, 4])).toBeLessThan(0.05);
    await native.release();
    await slot.release();
  });

  it('forwardTop returns the k largest of the rows forward returns, for each k', async () => {
    const folder = loadModelFolder(storiesModel());
    const [full, top] = [(await loadRunner(folder, { ...options, runner: 'native' })).runner, (await loadRunner(folder, { ...options, runner: 'native' })).runner];
    expect(top.topLogits).toBe(16);
    for (const r of [full, top]) [0, 1].forEach((s) => r.open(s));
    for (const [rows, k] of [[[{ seq: 0, tokens: tokens(9, 1) }, { seq: 1, tokens: [1] }], 16], [[{ seq: 1, tokens: [5] }, { seq: 0, tokens: [7] }], 1], [[{ seq: 0, tokens: [8] }], 3]] as const) {
      const { logits } = await full.forward(rows as unknown as ForwardRow[]);
      const got = await top.forwardTop!(rows as unknown as ForwardRow[], k);
      logits.forEach((l, b) => {
        const order = [...l.keys()].sort((x, y) => l[y] - l[x] || x - y).slice(0, k);
        expect(got.top[b].ids).toEqual(order);
        expect(got.top[b].values).toEqual(order.map((i) => l[i]));
      });
    }
    await expect(top.forwardTop!([{ seq: 0, tokens: [1] }], 17)).rejects.toThrow(/k must be an integer in 1 … 16/);
    await full.release();
    await top.release();
  });

  it('runs its pass off the event loop; an error in the pass fails that pass only; release waits for the pass in flight', async () => {
    const dir = randomLike('SmolLM2-135M-Instruct', { num_hidden_layers: 4, hidden_size: 256, intermediate_size: 512, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 64 });
    const folder = loadModelFolder(dir);
    const runner = (await loadRunner(folder, { ...options, threads: 1, runner: 'native', maxModelLen: 512, kvCacheTokens: 1024 })).runner;
    runner.open(0);
    let ticks = 0;
    let done = false;
    const tick = () => {
      ticks++;
      if (!done) setImmediate(tick);
    };
    setImmediate(tick);
    const pass = runner.forward([{ seq: 0, tokens: tokens(400, 5) }]);
    await pass.finally(() => (done = true));
    expect(ticks).toBeGreaterThan(0);
    // An id past the vocabulary is ONNX Runtime's Gather error; the cache is as before and the next pass works.
    runner.open(1);
    await expect(runner.forward([{ seq: 1, tokens: [folder.config.vocab_size + 5] }])).rejects.toThrow(/indices|out of bounds|out of range/i);
    expect(runner.cachedLength(1)).toBe(0);
    expect((await runner.forward([{ seq: 1, tokens: [4, 5] }])).logits).toHaveLength(1);
    expect(runner.cachedLength(1)).toBe(2);
    // Released while a pass runs: the pass finishes first.
    const last = runner.forward([{ seq: 1, tokens: tokens(200, 9) }]);
    await runner.release();
    expect((await last).logits).toHaveLength(1);
    await expect(runner.forward([{ seq: 1, tokens: [4] }])).rejects.toThrow(/released/);
  });

  it("a native runner runs every layer's session on the env's one thread pool; a second beside it keeps pools of its own, with the same logits; the pool is free again once released", () => {
    const model = randomLike('SmolLM2-135M-Instruct', { num_hidden_layers: 6, hidden_size: 96, intermediate_size: 128, num_attention_heads: 6, num_key_value_heads: 2, head_dim: 16 });
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'test/helpers/native-pool-child.ts', model], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const got = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { pool: unknown; sharedThreads: number; ownThreads: number; thirdThreads: number; sessions: number; diff: number };
    expect(got.pool).toEqual({ threads: 2, spin: false });
    expect(got.sessions).toBe(7);
    expect(got.sharedThreads).toBeLessThanOrEqual(2);
    expect(got.ownThreads).toBeGreaterThanOrEqual(got.sessions);
    expect(got.thirdThreads).toBeLessThanOrEqual(2);
    expect(got.diff).toBeLessThan(1e-5);
  });

  it('--runner native says why it cannot be had, with the flag; the engine reports the native runner by default', async () => {
    const base = { modelDir: storiesModel(), device: { kind: 'cpu' as const }, maxNumSeqs: 4, maxNumBatchedTokens: 256, kvCacheBytes: 2 ** 24 };
    const refused = await createEngineCore({ ...base, runner: 'native', attention: 'onnx' }, () => {}, () => {}).catch((e: Error) => e);
    expect(refused).toBeInstanceOf(EngineOptionError);
    expect(explainEngineError(refused).message).toBe('--runner native: the native runner attends in native code (--attention native)');
    const other = await createEngineCore({ ...base, runner: 'native', ortLibrary: path.join('/tmp', 'no-such', 'libonnxruntime.so.1') }, () => {}, () => {}).catch((e: Error) => e);
    expect(explainEngineError(other).message).toMatch(/^--runner native: ONNX Runtime is already loaded from .*libonnxruntime.so.1 in this process/);
    const engine = await createEngineCore(base, () => {}, () => {});
    expect([engine.info.runner, engine.info.device, engine.info.kvCacheDtype]).toEqual(['native', 'cpu', 'float16']);
    await engine.release();
    // Without --runner, a library that cannot be had is a warning and the JavaScript runner serves.
    const fallback = await createEngineCore({ ...base, ortLibrary: '/tmp/no-such/libonnxruntime.so.1' }, () => {}, () => {});
    expect(fallback.info.runner).toBe('paged');
    expect(fallback.info.deviceNote).toMatch(/^the native runner is unavailable \(ONNX Runtime is already loaded from .*\); using the JavaScript runner$/);
    await fallback.release();
  });
});
