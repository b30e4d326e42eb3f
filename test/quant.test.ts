/**
 * Block-quantised linear layers (ONNX Runtime's MatMulNBits): the quantiser and GGUF block mapping, quality on
 * stories260K against its float32 greedy story, and the runners on quantised graphs.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import type { EngineOptions } from '../src/engine/protocol.ts';
import type { RequestEvent } from '../src/engine/protocol.ts';
import { convertCheckpoint, readCheckpoint } from '../src/model/convert.ts';
import { GgmlType } from '../src/model/ggml-quants.ts';
import { readGguf } from '../src/model/gguf.ts';
import { buildLlamaGraph, type QuantOptions } from '../src/model/llama-graph.ts';
import { encodeModel, readInitializers, readModelMetadata } from '../src/model/onnx-proto.ts';
import { dequantizeNBits, nbitsAttributes, nbitsFromGgml, quantizeNBits, rowBlockSize } from '../src/model/quant.ts';
import type { Checkpoint } from '../src/model/types.ts';
import { Llama2cTransformer, generateGreedy } from './helpers/llama2c-reference.ts';
import { SHARED_MODELS, storiesModel } from './helpers/models.ts';
import { startTestServer } from './helpers/server.ts';
import express from 'express';
import type { AddressInfo } from 'node:net';
import { CostMeter } from '../src/meter/meter.ts';
import { costRouter } from '../src/server/cost-routes.ts';
import { precisionOf } from '../src/model/quant.ts';

const STORIES = path.join(SHARED_MODELS, 'stories260K');
const QREF = path.join(SHARED_MODELS, 'quant-reference');

function rand(n: number, seed: number, scale = 1): Float32Array {
  let x = seed;
  return Float32Array.from({ length: n }, () => ((x = (x * 16807) % 2147483647), (x / 2147483647 - 0.5) * scale));
}

describe('the block quantiser', () => {
  it('quantises within half a step per block, keeps zeros exact, and pads short last blocks', () => {
    for (const [bits, bs, k] of [[8, 64, 576], [4, 64, 576], [4, 32, 172], [8, 16, 40], [4, 16, 64]] as const) {
      const n = 24, w = rand(n * k, 11 + k, 0.2);
      w[5] = 0;
      const q = quantizeNBits(w, n, k, bits, bs);
      const back = dequantizeNBits(q);
      const blocks = Math.ceil(k / q.blockSize);
      expect(q.packed.length).toBe((n * blocks * q.blockSize * bits) / 8);
      expect(nbitsAttributes(k, [n, blocks, (q.blockSize * bits) / 8])).toEqual({ bits, blockSize: q.blockSize });
      for (let r = 0; r < n; r++) {
        for (let c = 0; c < k; c++) {
          const scale = q.scales[r * blocks + Math.floor(c / q.blockSize)];
          // Half a step, or a little more where the range was pulled in and a value clipped.
          expect(Math.abs(back[r * k + c] - w[r * k + c])).toBeLessThanOrEqual(bits === 8 ? scale : 2 * scale);
        }
      }
      expect(back[5]).toBe(0);
      // Root-mean-square error well under a step of the widest block's scale.
      let se = 0, maxScale = 0;
      for (let i = 0; i < w.length; i++) se += (back[i] - w[i]) ** 2;
      for (const s of q.scales) maxScale = Math.max(maxScale, s);
      expect(Math.sqrt(se / w.length)).toBeLessThan(maxScale * 0.35);
    }
  });

  it('narrow rows get blocks of at most a quarter row', () => {
    expect([rowBlockSize(64, 64), rowBlockSize(172, 64), rowBlockSize(576, 64), rowBlockSize(2048, 32), rowBlockSize(16, 64)]).toEqual([16, 32, 64, 32, 16]);
  });

  it('GGUF Q4_0 and Q8_0 blocks become MatMulNBits blocks with the same values, bit for bit', () => {
    for (const [file, name, type] of [['stories260K-Q4_0.gguf', 'blk.0.ffn_gate.weight', GgmlType.Q4_0], ['tiny256-Q8_0.gguf', 'blk.1.attn_q.weight', GgmlType.Q8_0]] as const) {
      const g = readGguf(path.join(QREF, file));
      const t = g.tensors.find((x) => x.name === name)!;
      expect(t.type).toBe(type);
      const q = nbitsFromGgml(t.type, g.tensorBytes(t), t.shape[0], t.shape[1]);
      expect(q.zeroPoints).toBeUndefined();
      expect(dequantizeNBits(q)).toEqual(g.tensorData(name));
    }
  });
});

/** Logits at every position of ids, through a graph with the onnx-community interface built in memory. */
async function allLogits(ckpt: Checkpoint, quant: QuantOptions | undefined, ids: number[]): Promise<Float32Array> {
  const cfg = ckpt.config;
  const spec = buildLlamaGraph(cfg, ckpt.weights, { interface: 'hf', quant });
  const session = await ort.InferenceSession.create(encodeModel(spec).model, { executionProviders: ['cpu'], logSeverityLevel: 3, intraOpNumThreads: 1 });
  try {
    const T = ids.length, hd = cfg.hidden_size / cfg.num_attention_heads;
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor('int64', BigInt64Array.from(ids.map(BigInt)), [1, T]),
      attention_mask: new ort.Tensor('int64', new BigInt64Array(T).fill(1n), [1, T]),
      position_ids: new ort.Tensor('int64', BigInt64Array.from(ids.map((_, i) => BigInt(i))), [1, T]),
    };
    for (let l = 0; l < cfg.num_hidden_layers; l++) {
      for (const kv of ['key', 'value']) feeds[`past_key_values.${l}.${kv}`] = new ort.Tensor('float32', new Float32Array(0), [1, cfg.num_key_value_heads, 0, hd]);
    }
    return (await session.run(feeds)).logits.data as Float32Array;
  } finally {
    await session.release();
  }
}

function argmaxRows(logits: Float32Array, vocab: number): number[] {
  const out: number[] = [];
  for (let o = 0; o < logits.length; o += vocab) {
    let best = 0;
    for (let i = 1; i < vocab; i++) if (logits[o + i] > logits[o + best]) best = i;
    out.push(best);
  }
  return out;
}

describe('stories260K quantised, teacher-forced over its float32 greedy story from BOS', () => {
  let ckpt: Checkpoint;
  let story: number[];
  beforeAll(() => {
    ckpt = readCheckpoint(path.join(STORIES, 'stories260K.gguf'));
    story = generateGreedy(new Llama2cTransformer(path.join(STORIES, 'stories260K.bin')), [1], 512);
  });

  /** The share of positions whose top-1 token is the story's next token (what float32 predicts). */
  async function agreement(quant: QuantOptions | undefined): Promise<number> {
    const input = [1, ...story.slice(0, -1)];
    const top = argmaxRows(await allLogits(ckpt, quant, input), ckpt.config.vocab_size);
    return top.filter((t, i) => t === story[i]).length / story.length;
  }

  it('float32 agrees everywhere; int8 at >= 99% of positions, int4 at >= 90%', async () => {
    expect(await agreement(undefined)).toBe(1);
    const int8 = await agreement({ bits: 8, blockSize: 64, keep: false });
    const int4 = await agreement({ bits: 4, blockSize: 64, keep: false });
    const int4Head4 = await agreement({ bits: 4, blockSize: 64, keep: false, headBits: 4 });
    console.log(`stories260K top-1 agreement with fp32 over ${story.length} positions: int8 ${(int8 * 100).toFixed(1)}%, int4 ${(int4 * 100).toFixed(1)}% (int8 head), int4 with an int4 head ${(int4Head4 * 100).toFixed(1)}%`);
    expect(int8).toBeGreaterThanOrEqual(0.99);
    expect(int4).toBeGreaterThanOrEqual(0.9);
    expect(int4Head4).toBeLessThan(1);
  });
});

describe('quantised model folders on the engine', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-quant-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  async function greedy(modelDir: string, maxTokens: number, options: Partial<EngineOptions> = {}) {
    let resolve!: () => void;
    const done = new Promise<void>((r) => (resolve = r));
    const tokens: number[] = [];
    const engine = await createEngineCore(
      { modelDir, device: { kind: 'cpu' }, threads: 1, maxNumSeqs: 2, maxNumBatchedTokens: 512, kvCacheBytes: 2 ** 24, ...options },
      (events: RequestEvent[]) => {
        for (const e of events) {
          tokens.push(...e.tokens.map((t) => t.id));
          if (e.finish) resolve();
        }
      },
      () => {},
    );
    const loop = engine.scheduler.run();
    try {
      engine.scheduler.submit({
        id: 'r', promptIds: [1], maxTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [],
        sampling: { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 },
      });
      await done;
    } finally {
      engine.scheduler.stop();
      await loop;
      await engine.release();
    }
    return { tokens, info: engine.info };
  }

  it('int8 and int4 conversions say their precision and run on the native runner, the JavaScript paged runner and with attention in the graph', async () => {
    const story = generateGreedy(new Llama2cTransformer(path.join(STORIES, 'stories260K.bin')), [1], 40);
    for (const quant of ['int8', 'int4'] as const) {
      const dir = path.join(tmp, quant);
      convertCheckpoint(path.join(STORIES, 'stories260K.gguf'), dir, { quant });
      const config = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8'));
      expect(config.tally).toMatchObject({ precision: quant, quantization: { method: 'MatMulNBits', bits: quant === 'int8' ? 8 : 4, accuracy_level: 4 } });
      const bytes = fs.readFileSync(path.join(dir, 'onnx', 'model.onnx'));
      expect(readModelMetadata(bytes)['tally.quant']).toBe(quant);
      const inits = readInitializers(bytes);
      expect(inits.has('model.layers.0.mlp.gate_up.weight_t')).toBe(false);
      // The embedding as 8-bit blocks of 16 for GatherBlockQuantized; the tied head quantised apart.
      expect(inits.has('model.embed_tokens.weight')).toBe(false);
      expect([inits.get('model.embed_tokens.weight_q')!.dims, inits.get('model.embed_tokens.weight_scales')!.dims]).toEqual([[512, 64], [512, 4]]);
      expect(inits.get('lm_head.weight_q')!.dims).toEqual([512, 4, 16]);
      expect(inits.get('model.layers.0.mlp.gate_up.weight_q')!.dims).toEqual([2 * 172, 4, quant === 'int8' ? 16 : 8]);
      // Weights take about a quarter (int8) or less (int4; its head and embedding at 8 bits; stories260K's narrow rows get blocks of 16, a float scale each) of float32's bytes.
      const dataBytes = fs.statSync(path.join(dir, 'onnx', 'model.onnx_data')).size;
      const fp32Bytes = fs.statSync(path.join(storiesModel(), 'onnx', 'model.onnx_data')).size;
      expect(dataBytes / fp32Bytes).toBeLessThan(quant === 'int8' ? 0.45 : 0.35);

      const paged = await greedy(dir, 39, { kvCacheDtype: 'float32', runner: 'js' });
      const native = await greedy(dir, 39, { kvCacheDtype: 'float32' });
      const inGraph = await greedy(dir, 39, { attention: 'onnx' });
      expect([paged.info.runner, native.info.runner, inGraph.info.runner]).toEqual(['paged', 'native', 'slot']);
      const nativeF16 = await greedy(dir, 39);
      expect([nativeF16.info.runner, nativeF16.info.kvCacheDtype, nativeF16.tokens.length]).toEqual(['native', 'float16', 39]);
      expect(paged.tokens).toHaveLength(39);
      expect(inGraph.tokens).toEqual(paged.tokens);
      expect(native.tokens).toEqual(paged.tokens);
      // The story's first sentence survives quantisation.
      const same = paged.tokens.findIndex((t, i) => t !== story[i]);
      expect(same === -1 ? 39 : same).toBeGreaterThanOrEqual(quant === 'int8' ? 39 : 12);
    }
  });

  it("a quantised GGUF keeps its precision: Q4_0 and Q8_0 blocks as they are, K-quants re-quantised to 4 or 8 bits", async () => {
    const q40 = path.join(tmp, 'q4_0');
    convertCheckpoint(path.join(QREF, 'stories260K-Q4_0.gguf'), q40);
    const config = JSON.parse(fs.readFileSync(path.join(q40, 'config.json'), 'utf8'));
    expect(config.tally.precision).toBe('int4');
    const inits = readInitializers(fs.readFileSync(path.join(q40, 'onnx', 'model.onnx')));
    const g = readGguf(path.join(QREF, 'stories260K-Q4_0.gguf'));
    const dims = (name: string) => inits.get(name)!.dims;
    expect(dims('model.layers.0.mlp.gate_up.weight_q')).toEqual([2 * 172, 2, 16]); // Q4_0's own blocks of 32
    expect(dims('model.layers.0.mlp.down_proj.weight_q')).toEqual([64, 6, 16]); // F16 there: 4 bits, blocks of 32
    expect(dims('lm_head.weight_q')).toEqual([512, 2, 32]); // Q8_0 there: kept at 8 bits
    // The kept blocks are the file's bytes, repacked: same scales.
    const gate = nbitsFromGgml(GgmlType.Q4_0, g.tensorBytes('blk.0.ffn_gate.weight'), 172, 64);
    const ext = inits.get('model.layers.0.mlp.gate_up.weight_scales')!.external!;
    const stored = fs.readFileSync(path.join(q40, 'onnx', ext.location)).subarray(ext.offset, ext.offset + ext.length);
    expect(new Float32Array(Uint8Array.from(stored).buffer, 0, gate.scales.length)).toEqual(gate.scales);
    expect(inits.has('model.layers.0.mlp.gate_up.weight_zp')).toBe(false);
    const { tokens } = await greedy(q40, 8);
    expect(tokens).toHaveLength(8);

    const km = path.join(tmp, 'q4_k_m');
    convertCheckpoint(path.join(QREF, 'tiny256-Q4_K_M.gguf'), km);
    const kmInits = readInitializers(fs.readFileSync(path.join(km, 'onnx', 'model.onnx')));
    expect(JSON.parse(fs.readFileSync(path.join(km, 'config.json'), 'utf8')).tally.precision).toBe('int4');
    expect(kmInits.get('model.layers.0.mlp.down_proj.weight_q')!.dims).toEqual([256, 12, 32]); // Q4_K: 4 bits
    expect(kmInits.get('model.layers.1.mlp.down_proj.weight_q')!.dims).toEqual([256, 12, 64]); // Q6_K: 8 bits
    expect(kmInits.get('model.layers.1.self_attn.qkv.weight_q')!.dims).toEqual([512, 4, 64]); // q, k Q4_K + v Q6_K: 8 bits
    expect((await greedy(km, 4)).tokens).toHaveLength(4);

    const widened = path.join(tmp, 'q4_0-fp32');
    convertCheckpoint(path.join(QREF, 'stories260K-Q4_0.gguf'), widened, { quant: 'none' });
    expect(JSON.parse(fs.readFileSync(path.join(widened, 'config.json'), 'utf8')).tally.precision).toBe('fp32');
    expect(readInitializers(fs.readFileSync(path.join(widened, 'onnx', 'model.onnx'))).has('model.layers.0.mlp.gate_up.weight_t')).toBe(true);
  });

  it('/v1/models and /v1/cost say the precision', async () => {
    const dir = path.join(tmp, 'served-int4');
    convertCheckpoint(path.join(STORIES, 'stories260K.gguf'), dir, { quant: 'int4' });
    for (const [modelDir, precision] of [[dir, 'int4'], [storiesModel(), 'fp32'], [storiesModel('float16'), 'fp16']] as const) {
      const server = await startTestServer({ modelDir });
      try {
        const list = await (await fetch(`${server.url}/v1/models`)).json();
        expect(list.data[0].precision).toBe(precision);
        expect((await (await fetch(`${server.url}/v1/models/${server.modelName}`)).json()).precision).toBe(precision);
      } finally {
        await server.close();
      }
    }
    // A folder from before the tally block: torch_dtype says it.
    expect([precisionOf({ torch_dtype: 'float16' }), precisionOf({}), precisionOf({ tally: { precision: 'int8' } })]).toEqual(['fp16', 'fp32', 'int8']);

    const app = express();
    app.use(costRouter(new CostMeter({ devicePriceUsdPerHour: 1, model: 'm', precision: 'int4' }), { apiModels: [] }));
    const server = app.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    try {
      const body = await (await fetch(`http://127.0.0.1:${(server.address() as AddressInfo).port}/v1/cost?window=1m`)).json();
      expect(body.model).toEqual({ id: 'm', precision: 'int4' });
    } finally {
      server.close();
    }
  });
});
