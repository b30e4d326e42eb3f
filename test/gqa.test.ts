/**
 * The gqa runner (--runner gqa): the whole model as one graph on ONNX Runtime's GroupQueryAttention, its KV cache in
 * buffers from the session's own allocator (device memory on CUDA), bound as past and present of every pass.
 * Checked here on the CPU execution provider (no GPU in CI): the addon's buffers, the runner's logits against the
 * native runner's, the engine's batched == solo, and what it refuses.
 */
import { describe, expect, it } from 'vitest';
import { loadRunner } from '../src/engine/runners/load.ts';
import { type NativeBuffer, createNativeSession, openOrt } from '../src/engine/runners/native-ort.ts';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { loadModelFolder } from '../src/model/folder.ts';
import { DataType, encodeModel, type ModelSpec } from '../src/model/onnx-proto.ts';
import { EngineOptionError, type EngineOptions, type GenerationRequest, type RequestEvent } from '../src/engine/protocol.ts';
import { explainEngineError } from '../src/config/serve-config.ts';
import { kvBytesPerToken } from '../src/engine/core/limits.ts';
import { randomLike, storiesModel } from './helpers/models.ts';
import { maxLogitDifference, tokens } from './helpers/runner-compare.ts';

const GREEDY = { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };
/** y = x + 1 over float32, written in place when x and y are bound to the same memory. */
const increment: ModelSpec = {
  graphName: 'increment',
  nodes: [{ opType: 'Add', inputs: ['x', 'one'], outputs: ['y'], name: 'add' }],
  inputs: [{ name: 'x', type: DataType.FLOAT, dims: ['n'] }],
  outputs: [{ name: 'y', type: DataType.FLOAT, dims: ['n'] }],
  initializers: [{ name: 'one', type: DataType.FLOAT, dims: [1], raw: new Uint8Array(Float32Array.of(1).buffer) }],
  opsets: [{ domain: '', version: 17 }],
  metadata: {},
};
const gqaModel = () => randomLike('SmolLM2-135M-Instruct');
/** 20 layers: a pass binds 80 cache values beside its other inputs and outputs. */
const deepModel = () => randomLike('SmolLM2-135M-Instruct', { num_hidden_layers: 20, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16 });

describe('buffers from a session allocator (native/ort)', () => {
  it('are bound as views by byte offset, updated in place across runs, and outlive no session', async () => {
    const opened = openOrt();
    if ('reason' in opened) throw new Error(opened.reason);
    const { binding } = opened;
    const session = createNativeSession(binding, encodeModel(increment).model, { threads: 1 });
    const buffer = binding.allocate(session, 16 * 4);
    const out = new Float32Array(4);
    binding.sessionRun(session, [['x', new Float32Array(16).fill(-1), [16]]], [['y', buffer, [16], 0, 'float32']]);
    // Elements 4 … 7 of the buffer, incremented in place twice (the second run off the event loop).
    const view: [NativeBuffer, number[], number, 'float32'] = [buffer, [4], 16, 'float32'];
    expect(binding.sessionRun(session, [['x', ...view]], [['y', ...view]])).toBeGreaterThanOrEqual(0);
    expect(await binding.sessionRunAsync(session, [['x', ...view]], [['y', ...view]])).toBeGreaterThanOrEqual(0);
    binding.sessionRun(session, [['x', ...view]], [['y', out, [4]]]);
    expect([...out]).toEqual([3, 3, 3, 3]);
    binding.sessionRun(session, [['x', buffer, [4], 0, 'float32']], [['y', out, [4]]]);
    expect([...out]).toEqual([1, 1, 1, 1]);
    // A view past the buffer's end, or of an unknown type, is refused before anything runs.
    expect(() => binding.sessionRun(session, [['x', buffer, [4], 52, 'float32']], [['y', out, [4]]])).toThrow(/input 0 must be/);
    expect(() => binding.sessionRun(session, [['x', buffer, [4], 0, 'bfloat16' as 'float32']], [['y', out, [4]]])).toThrow(/input 0 must be/);
    expect(() => binding.release(session)).toThrow(/release the session's buffers first/);
    binding.release(buffer);
    expect(() => binding.sessionRun(session, [['x', ...view]], [['y', out, [4]]])).toThrow(/input 0 must be/);
    binding.release(session);
  });
});

describe('GqaRunner', () => {
  const options = { device: { kind: 'cpu' as const }, threads: 1, maxSlots: 8, maxModelLen: 512 };

  it("gives the native runner's logits (float32 cache) over prompts, chunks, decode passes with slots left out, and sequences ending", async () => {
    const folder = loadModelFolder(gqaModel());
    const gqa = (await loadRunner(folder, { ...options, runner: 'gqa' })).runner;
    const native = (await loadRunner(folder, { ...options, runner: 'native', kvCacheDtype: 'float32' })).runner;
    expect([gqa.kind, native.kind]).toEqual(['gqa', 'native']);
    expect(gqa.kvBytes()).toBe(options.maxSlots * options.maxModelLen * kvBytesPerToken(folder.config, 4));
    expect(await maxLogitDifference(gqa, native, folder.config.vocab_size, [6, 4])).toBeLessThan(1e-4);
    await gqa.release();
    await native.release();
  });

  it('forwardTop returns the k largest of the rows forward returns (20 layers); a failed pass leaves the cache as it was', async () => {
    const folder = loadModelFolder(deepModel());
    const [full, top] = [(await loadRunner(folder, { ...options, runner: 'gqa' })).runner, (await loadRunner(folder, { ...options, runner: 'gqa' })).runner];
    for (const r of [full, top]) [0, 1, 2].forEach((s) => r.open(s));
    for (const [rows, k] of [[[{ seq: 0, tokens: tokens(9, 1) }, { seq: 2, tokens: [1] }], 16], [[{ seq: 2, tokens: [5] }, { seq: 0, tokens: [7] }], 1], [[{ seq: 0, tokens: [8] }], 3]] as const) {
      const { logits } = await full.forward(rows.map((r) => ({ seq: r.seq, tokens: [...r.tokens] })));
      const got = await top.forwardTop!(rows.map((r) => ({ seq: r.seq, tokens: [...r.tokens] })), k);
      logits.forEach((l, b) => {
        const order = [...l.keys()].sort((x, y) => l[y] - l[x] || x - y).slice(0, k);
        expect(got.top[b].ids).toEqual(order);
        expect(got.top[b].values).toEqual(order.map((i) => l[i]));
      });
    }
    expect(top.cachedLength(0)).toBe(11);
    await expect(top.forward([{ seq: 1, tokens: [folder.config.vocab_size + 5] }])).rejects.toThrow(/indices|out of bounds|out of range/i);
    expect(top.cachedLength(1)).toBe(0);
    expect((await top.forward([{ seq: 1, tokens: [4, 5] }])).logits).toHaveLength(1);
    expect(top.cachedLength(1)).toBe(2);
    await full.release();
    await top.release();
  });

  it('a full slot left out of a pass of single tokens does not stop it', async () => {
    const folder = loadModelFolder(gqaModel());
    const small = { ...options, maxModelLen: 32 };
    const gqa = (await loadRunner(folder, { ...small, runner: 'gqa' })).runner;
    const native = (await loadRunner(folder, { ...small, runner: 'native', kvCacheDtype: 'float32' })).runner;
    for (const r of [gqa, native]) {
      [0, 1].forEach((s) => r.open(s));
      await r.forward([{ seq: 0, tokens: tokens(32, 1) }]);
      await r.forward([{ seq: 1, tokens: tokens(5, 2) }]);
    }
    await expect(gqa.forward([{ seq: 0, tokens: [3] }])).rejects.toThrow(/exceed the model length 32/);
    const [a, b] = [await gqa.forward([{ seq: 1, tokens: [9] }]), await native.forward([{ seq: 1, tokens: [9] }])];
    expect(Math.max(...a.logits[0].map((v, i) => Math.abs(v - b.logits[0][i])))).toBeLessThan(1e-4);
    expect(gqa.cachedLength(0)).toBe(32);
    await gqa.release();
    await native.release();
  });

  it('serves through the engine: concurrent requests each give their solo tokens', async () => {
    const modelDir = gqaModel();
    const base = { modelDir, device: { kind: 'cpu' as const }, threads: 1, maxNumSeqs: 4, maxNumBatchedTokens: 64, maxModelLen: 256, kvCacheBytes: 2 ** 24, runner: 'gqa' as const };
    const engine = await createEngineCore(base, (events) => events.forEach((e) => listeners.get(e.id)?.(e)), () => {});
    expect([engine.info.runner, engine.info.device, engine.info.kvCacheDtype]).toEqual(['gqa', 'cpu', 'float32']);
    const listeners = new Map<string, (e: RequestEvent) => void>();
    const loop = engine.scheduler.run();
    const submit = (req: GenerationRequest) =>
      new Promise<number[]>((resolve, reject) => {
        const got: number[] = [];
        listeners.set(req.id, (e) => {
          got.push(...e.tokens.map((t) => t.id));
          if (e.finish === 'error') reject(new Error(e.error));
          else if (e.finish) resolve(got);
        });
        engine.scheduler.submit(req);
      });
    const request = (id: string, promptIds: number[], maxTokens: number): GenerationRequest => ({ id, promptIds, maxTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], sampling: GREEDY });
    const reqs = [request('a', tokens(90, 1), 20), request('b', tokens(3, 2), 30), request('c', tokens(40, 3), 12), request('d', [7], 25), request('e', tokens(20, 5), 16)];
    try {
      const alone: number[][] = [];
      for (const r of reqs) alone.push(await submit({ ...r, id: `${r.id}-alone` }));
      // Five requests on four slots: the fifth waits for one to end.
      const together = await Promise.all(reqs.map((r) => submit(r)));
      expect(together).toEqual(alone);
      expect(together.map((t) => t.length)).toEqual([20, 30, 12, 25, 16]);
    } finally {
      engine.scheduler.stop();
      await loop;
      await engine.release();
    }
  });

  it('says what it cannot take, with the flag', async () => {
    const base = { device: { kind: 'cpu' as const }, maxNumSeqs: 4, maxNumBatchedTokens: 64, maxModelLen: 256, kvCacheBytes: 2 ** 24, runner: 'gqa' as const };
    const fail = (options: Partial<EngineOptions> & { modelDir: string }) =>
      createEngineCore({ ...base, ...options }, () => {}, () => {}).then(
        () => undefined,
        (e: Error) => e,
      );
    const stories = await fail({ modelDir: storiesModel() });
    expect(stories).toBeInstanceOf(EngineOptionError);
    expect(explainEngineError(stories!).message).toBe("--runner gqa: ONNX Runtime's GroupQueryAttention takes head_dim in multiples of 16; this model's is 8");
    expect(explainEngineError((await fail({ modelDir: gqaModel(), kvCacheBytes: 2 ** 16 }))!).message).toMatch(/^--kv-cache-gb .*: the gqa runner keeps a slot of 256 positions \(the model length\) for each of 4 sequences, 0\.00 GiB; raise the KV cache size or lower --max-num-seqs or --max-model-len$/);
    expect(explainEngineError((await fail({ modelDir: gqaModel(), kvCacheDtype: 'float16' }))!).message).toBe("--kv-cache-dtype float16: the gqa runner's cache has the graph's type, float32");
    // onnxruntime-node's library lists the CUDA provider; its library is installed only by `npm run install-cuda`.
    expect(explainEngineError((await fail({ modelDir: gqaModel(), device: { kind: 'cuda', index: 0 } }))!).message).toMatch(/^--runner gqa: the CUDA execution provider is not installed \(.*libonnxruntime_providers_cuda\.so is missing\)/);
  });
});
