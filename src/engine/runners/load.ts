import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import ort from 'onnxruntime-node';
import type { ModelFolder } from '../../model/folder.ts';
import { encodeModel, readInitializers, readModelMetadata } from '../../model/onnx-proto.ts';
import { buildLlamaParts } from '../../model/llama-parts.ts';
import type { LlamaConfig } from '../../model/types.ts';
import { linearFlopsPerToken, modelShape } from '../../meter/attribution.ts';
import { kvBytesPerToken, kvCapacityTokens } from '../core/limits.ts';
import { type AttentionMode, ENGINE_DEFAULTS, EngineOptionError, type KvCacheDtype, type RunnerChoice } from '../protocol.ts';
import { isPlainGraph, isTallyGraph } from './graph-io.ts';
import { loadAttentionAddon } from './native-attention.ts';
import { type NativeBuffer, createNativeSession, type NativeSession, openOrt } from './native-ort.ts';
import { GqaRunner } from './gqa-runner.ts';
import { buildLlamaGqaGraph } from '../../model/llama-parts.ts';
import { headDim } from '../../model/types.ts';
import { NativeRunner } from './native-runner.ts';
import { TOP_LOGITS } from '../../model/llama-graph.ts';
import { baseSessionOptions, createSession, cudaProviderProblem, describeCudaFailure, type SessionOptions } from './ort-session.ts';
import { PagedRunner } from './paged-runner.ts';
import { PlainRunner } from './plain-runner.ts';
import { kvCacheDtypeOf, type ModelRunner } from './runner.ts';
import { SlotRunner } from './slot-runner.ts';

export interface RunnerOptions extends SessionOptions {
  maxSlots: number;
  maxModelLen: number;
  /** Where a Tally graph runs its attention on the CPU (default: native when the addon is built). */
  attention?: AttentionMode;
  /** KV capacity: tokens, else what fits in bytes. */
  kvCacheTokens?: number;
  /** Default ENGINE_DEFAULTS.kvCacheBytes. */
  kvCacheBytes?: number;
  /**
   * Element type of the KV cache. Default: float16 with native attention (as llama.cpp's server stores its
   * cache: half the bytes that every decode step reads), the graph's own type on the other paths, where an
   * explicit type must match it.
   */
  kvCacheDtype?: KvCacheDtype;
  /** Automatic prefix caching on the paged cache (default on; the other runners have no pages to share). */
  prefixCache?: boolean;
  /** Who drives a pass on the CPU (default: native where the addon is built and the graph allows it). */
  runner?: RunnerChoice;
  /** The ONNX Runtime library the native runner opens (default: TALLY_ORT_LIBRARY, else onnxruntime-node's). */
  ortLibrary?: string;
}

/**
 * A graph Tally converted (version 6 on: the layout the cut and GroupQueryAttention graphs are built from), its
 * bytes and element type; undefined for any other graph.
 */
function readTallyGraph(folder: ModelFolder): { bytes: Buffer; graphDtype: KvCacheDtype } | undefined {
  const bytes = fs.readFileSync(folder.onnxPath);
  const meta = readModelMetadata(bytes);
  if (meta['tally.graph'] !== 'tally' || Number(meta['tally.graph_version']) < 6) return undefined;
  return { bytes, graphDtype: (meta['tally.dtype'] ?? 'float32') === 'float16' ? 'float16' : 'float32' };
}

/** The options with the intra-op thread count decided (loadRunner). */
type ResolvedRunnerOptions = RunnerOptions & { threads: number };

/**
 * A Tally graph on the CPU cut at its attention, each pass run whole in native code (native/ort); undefined (with
 * why) where that path does not apply.
 */
async function createNativeRunner(folder: ModelFolder, options: ResolvedRunnerOptions): Promise<{ runner?: NativeRunner; reason?: string; note?: string; broken?: boolean }> {
  if (options.runner === 'js') return {};
  const cudaProblem = options.device.kind === 'auto' ? cudaProviderProblem() : undefined;
  const onCpu = options.device.kind === 'cpu' || cudaProblem !== undefined;
  if (!onCpu) return { reason: 'the native runner runs on the CPU only (its CUDA path is not finished)' };
  if (options.attention === 'onnx') return { reason: 'the native runner attends in native code (--attention native)' };
  const graph = readTallyGraph(folder);
  if (!graph) return { reason: 'the native runner needs a graph converted by Tally' };
  const { bytes, graphDtype } = graph;
  const threads = options.threads;
  // A pass is a session per layer: on a pool of its own each would wake its own threads, layer after layer, and
  // spinning ones would take every core. Sharing one pool, its threads can spin through a pass (--spin-wait).
  const pool = { threads, spin: options.spinWait ?? false };
  const opened = openOrt(options.ortLibrary, pool);
  // The addon or the library is missing or broken: worth a warning when the JavaScript runner takes over.
  if ('reason' in opened) return { reason: opened.reason, broken: true };
  const { binding, ort: lib } = opened;
  let shared = lib.pool?.threads === pool.threads && lib.pool.spin === pool.spin && binding.claimPool();
  const ownPool = { threads, spin: false, externalDir: path.dirname(folder.onnxPath) };
  const kvDtype = options.kvCacheDtype ?? 'float16';
  const kvTokens = kvCapacityTokens(folder.config, { kvCacheTokens: options.kvCacheTokens, kvCacheBytes: options.kvCacheBytes ?? ENGINE_DEFAULTS.kvCacheBytes }, kvDtype === 'float16' ? 2 : 4);
  const parts: NativeSession[] = [];
  try {
    for (const spec of buildLlamaParts(folder.config, readInitializers(bytes))) {
      const model = encodeModel(spec).model;
      try {
        parts.push(createNativeSession(binding, model, shared ? { shared, externalDir: ownPool.externalDir } : ownPool));
      } catch (err) {
        if (!shared || !/has none to share/.test((err as Error).message)) throw err;
        shared = false;
        parts.push(createNativeSession(binding, model, ownPool));
      }
    }
    const topLogits = Math.min(TOP_LOGITS, folder.config.vocab_size);
    // Attention runs between the parts while the pool's threads spin for the next one: threads of its own would
    // take turns with them on the same cores.
    const attentionThreads = shared && pool.spin ? 1 : threads;
    const runner = new NativeRunner(binding, parts, folder.config, { maxSlots: options.maxSlots, maxModelLen: options.maxModelLen, kvTokens, kvDtype, graphDtype, topLogits, threads: attentionThreads, prefixCache: options.prefixCache ?? true });
    return { runner, note: cudaProblem ? `--device auto: ${cudaProblem}; using the CPU` : undefined };
  } catch (err) {
    for (const p of parts) binding.release(p);
    throw err;
  }
}

/**
 * A Tally graph as one GroupQueryAttention graph run through native/ort (--runner gqa), on CUDA where asked for and
 * the library has it, else on the CPU; its KV cache, a slot of maxModelLen positions per sequence, allocated whole
 * from the session's allocator.
 */
function createGqaRunner(folder: ModelFolder, options: ResolvedRunnerOptions): { runner: GqaRunner; device: string; note?: string } {
  const fail = (why: string) => new EngineOptionError('runner', `gqa: ${why}`);
  const graph = readTallyGraph(folder);
  if (!graph) throw fail('the GroupQueryAttention graph is built from a graph converted by Tally');
  const { bytes, graphDtype } = graph;
  const hd = headDim(folder.config);
  if (hd % 16 !== 0) throw fail(`ONNX Runtime's GroupQueryAttention takes head_dim in multiples of 16; this model's is ${hd}`);
  const opened = openOrt(options.ortLibrary);
  if ('reason' in opened) throw fail(opened.reason);
  const { binding, ort: lib } = opened;
  const cudaProblem = lib.providers.includes('CUDAExecutionProvider')
    ? cudaProviderProblem(path.dirname(lib.path))
    : `the ONNX Runtime library ${lib.path} has no CUDA execution provider (providers: ${lib.providers.join(', ')}); name a CUDA build with --ort-library`;
  if (options.device.kind === 'cuda' && cudaProblem) throw fail(cudaProblem);
  const onCuda = options.device.kind === 'cuda' || (options.device.kind === 'auto' && !cudaProblem);
  const deviceId = options.device.kind === 'cuda' ? options.device.index : 0;
  // The operator's CUDA kernel takes float16 (and bfloat16) only.
  if (onCuda && graphDtype !== 'float16') throw fail(`on CUDA GroupQueryAttention takes a float16 graph; this one is ${graphDtype} (convert with --dtype fp16)`);
  if (options.kvCacheDtype && options.kvCacheDtype !== graphDtype) throw new EngineOptionError('kvCacheDtype', `${options.kvCacheDtype}: the gqa runner's cache has the graph's type, ${graphDtype}`);
  const perToken = kvBytesPerToken(folder.config, graphDtype === 'float16' ? 2 : 4);
  const cacheBytes = options.maxSlots * options.maxModelLen * perToken;
  const budget = options.kvCacheTokens !== undefined ? options.kvCacheTokens * perToken : (options.kvCacheBytes ?? ENGINE_DEFAULTS.kvCacheBytes);
  if (cacheBytes > budget) {
    throw new EngineOptionError('kvCacheBytes', `${(budget / 2 ** 30).toFixed(2)} GiB: the gqa runner keeps a slot of ${options.maxModelLen} positions (the model length) for each of ${options.maxSlots} sequences, ${(cacheBytes / 2 ** 30).toFixed(2)} GiB; raise the KV cache size or lower --max-num-seqs or --max-model-len`);
  }
  let session: NativeSession;
  try {
    session = createNativeSession(binding, encodeModel(buildLlamaGqaGraph(folder.config, readInitializers(bytes), options.maxModelLen)).model, {
      threads: options.threads,
      spin: options.spinWait,
      externalDir: path.dirname(folder.onnxPath),
      device: onCuda ? 'cuda' : 'cpu',
      deviceId,
    });
  } catch (err) {
    throw onCuda ? fail(describeCudaFailure(err)) : err;
  }
  const buffers: NativeBuffer[] = [];
  try {
    for (let i = 0; i < 2 * folder.config.num_hidden_layers; i++) buffers.push(binding.allocate(session, cacheBytes / (2 * folder.config.num_hidden_layers)));
  } catch (err) {
    for (const b of buffers) binding.release(b);
    binding.release(session);
    throw err;
  }
  const topLogits = Math.min(TOP_LOGITS, folder.config.vocab_size);
  const runner = new GqaRunner(binding, session, buffers, folder.config, { maxSlots: options.maxSlots, maxModelLen: options.maxModelLen, graphDtype, topLogits, batchFirstPrompts: !onCuda });
  const note = options.device.kind === 'auto' && cudaProblem ? `--device auto: ${cudaProblem}; using the CPU` : undefined;
  return { runner, device: onCuda ? `cuda:${deviceId}` : 'cpu', note };
}

/**
 * A Tally graph on the CPU cut at its attention, which runs in native/attention over a paged cache; undefined
 * (with why, when the caller asked for it) where that path does not apply.
 */
async function createPagedRunner(folder: ModelFolder, options: ResolvedRunnerOptions): Promise<{ runner?: PagedRunner; reason?: string; note?: string }> {
  const cudaProblem = options.device.kind === 'auto' ? cudaProviderProblem() : undefined;
  const onCpu = options.device.kind === 'cpu' || cudaProblem !== undefined;
  if (options.attention === 'onnx' || !onCpu) return {};
  const graph = readTallyGraph(folder);
  if (!graph) return { reason: 'native attention needs a graph converted by Tally' };
  if (graph.graphDtype !== 'float32') return { reason: 'native attention runs float32 graphs' };
  const { bytes } = graph;
  const addon = loadAttentionAddon();
  if ('reason' in addon) return { reason: addon.reason };
  const kvDtype = options.kvCacheDtype ?? 'float16';
  const kvTokens = kvCapacityTokens(folder.config, { kvCacheTokens: options.kvCacheTokens, kvCacheBytes: options.kvCacheBytes ?? ENGINE_DEFAULTS.kvCacheBytes }, kvDtype === 'float16' ? 2 : 4);
  const sessionOptions = baseSessionOptions(options);
  sessionOptions.extra = { session: { ...(sessionOptions.extra as { session: object }).session, model_external_initializers_file_folder_path: path.dirname(folder.onnxPath) } };
  sessionOptions.executionProviders = ['cpu'];
  const parts: ort.InferenceSession[] = [];
  try {
    for (const spec of buildLlamaParts(folder.config, readInitializers(bytes))) {
      parts.push(await ort.InferenceSession.create(encodeModel(spec).model, sessionOptions));
    }
  } catch (err) {
    for (const p of parts) await p.release();
    throw err;
  }
  addon.binding.threads(options.threads);
  const runner = new PagedRunner(parts, folder.config, addon.binding, { maxSlots: options.maxSlots, maxModelLen: options.maxModelLen, kvTokens, kvDtype, prefixCache: options.prefixCache ?? true });
  return { runner, note: cudaProblem ? `--device auto: ${cudaProblem}; using the CPU` : undefined };
}

/** Models below this many FLOPs per token get one intra-op thread unless --threads says otherwise. */
export const SMALL_MODEL_FLOPS_PER_TOKEN = 5e6;

/**
 * Intra-op threads (ONNX Runtime's and native attention's) when none are asked for: one for very small models,
 * else one per core. A step of a model of a few million parameters is made of operators that take about what
 * waking a pool thread costs, and under HTTP load that thread takes a core from the server's own threads.
 */
export function defaultThreads(config: LlamaConfig): number {
  const perToken = linearFlopsPerToken(modelShape(config)) + 2 * config.hidden_size * config.vocab_size;
  return perToken < SMALL_MODEL_FLOPS_PER_TOKEN ? 1 : os.availableParallelism();
}

/** The runner for a model folder's graph on the device asked for (see the README's model folders section). */
export async function loadRunner(folder: ModelFolder, runnerOptions: RunnerOptions): Promise<{ runner: ModelRunner; device: string; threads: number; note?: string }> {
  const threads = runnerOptions.threads && runnerOptions.threads > 0 ? runnerOptions.threads : defaultThreads(folder.config);
  const options = { ...runnerOptions, threads };
  if (options.runner === 'gqa') return { ...createGqaRunner(folder, options), threads };
  const native = await createNativeRunner(folder, options);
  if (native.runner) return { runner: native.runner, device: 'cpu', threads, note: native.note };
  if (options.runner === 'native') throw new EngineOptionError('runner', `native: ${native.reason}`);
  const fallback = native.broken ? `the native runner is unavailable (${native.reason}); using the JavaScript runner` : undefined;
  const withFallback = (note?: string) => [fallback, note].filter(Boolean).join('; ') || undefined;
  const paged = await createPagedRunner(folder, options);
  if (paged.runner) return { runner: paged.runner, device: 'cpu', threads, note: withFallback(paged.note) };
  if (options.attention === 'native') throw new EngineOptionError('attention', `native: ${paged.reason ?? 'only on the CPU'}`);
  const loaded = await createSession(folder.onnxPath, options);
  const { session } = loaded;
  let runner: ModelRunner;
  if (isTallyGraph(session)) {
    const key = session.inputMetadata.find((m) => m.name === 'past_key.0');
    // Graphs before version 6 cached K transposed: [batch, kv_heads, head_dim, past].
    if (key && key.isTensor && typeof key.shape[3] !== 'number') {
      await session.release();
      throw new Error(`${folder.onnxPath} was converted by an older Tally (its K cache is laid out [batch, kv_heads, head_dim, past]); convert the checkpoint again with \`tally convert\``);
    }
    runner = new SlotRunner(session, folder.config, options);
  } else if (isPlainGraph(session)) {
    runner = new PlainRunner(session, folder.config);
  } else {
    await session.release();
    throw new Error(
      `${folder.onnxPath} has neither Tally's interface (past_key.N, new_kv) nor a decoder-with-past interface ` +
        `(input_ids, past_key_values.N.key/value → logits, present.N.*); inputs: ${session.inputNames.join(', ')}`,
    );
  }
  const graphDtype = kvCacheDtypeOf(runner);
  if (options.kvCacheDtype && options.kvCacheDtype !== graphDtype) {
    await runner.release();
    const why = paged.reason ?? (options.attention === 'onnx' ? 'attention is set to onnx' : 'native attention runs on the CPU only');
    throw new EngineOptionError('kvCacheDtype', `${options.kvCacheDtype}: this graph's KV cache is ${graphDtype}, and only native attention stores another type (${why})`);
  }
  return { runner, device: loaded.device, threads, note: withFallback(loaded.note) };
}
