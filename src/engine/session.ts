import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import ort from 'onnxruntime-node';
import type { ModelFolder } from '../model/folder.ts';
import os from 'node:os';
import { PlainRunner, TallyRunner, isPlainGraph, isTallyGraph, kvCacheDtypeOf, type ModelRunner } from './runner.ts';
import { PagedRunner, type KvCacheDtype } from './paged-runner.ts';
import { loadAttentionAddon } from './native-attention.ts';
import { encodeModel, readInitializers, readModelMetadata } from '../model/onnx-proto.ts';
import { buildLlamaParts } from '../model/llama-parts.ts';
import { kvBytesPerToken } from './engine-options.ts';
import { linearFlopsPerToken, modelShape } from '../meter/attribution.ts';
import type { LlamaConfig } from '../model/types.ts';

export type DeviceSpec = { kind: 'cpu' } | { kind: 'cuda'; index: number } | { kind: 'auto' };

export function parseDevice(value: string): DeviceSpec {
  if (value === 'cpu') return { kind: 'cpu' };
  if (value === 'auto') return { kind: 'auto' };
  const m = /^cuda(?::(\d+))?$/.exec(value);
  if (m) return { kind: 'cuda', index: m[1] ? Number(m[1]) : 0 };
  throw new Error(`--device must be cpu, cuda, cuda:N or auto (got "${value}")`);
}

/** Where onnxruntime-node keeps its native libraries; the CUDA provider is installed there too. */
export function ortBinaryDir(): string {
  const require = createRequire(import.meta.url);
  const pkg = path.dirname(require.resolve('onnxruntime-node/package.json'));
  return path.join(pkg, 'bin', 'napi-v6', process.platform, process.arch);
}

/** Explains what is missing for the CUDA provider, or returns undefined when its library is present. */
export function cudaProviderProblem(): string | undefined {
  const dir = ortBinaryDir();
  const lib = path.join(dir, 'libonnxruntime_providers_cuda.so');
  if (!fs.existsSync(lib)) {
    return `the CUDA execution provider is not installed (${lib} is missing); run \`npm run install-cuda\` (needs the CUDA 12 runtime and cuDNN 9) or use --device cpu`;
  }
  return undefined;
}

export interface SessionOptions {
  device: DeviceSpec;
  threads?: number;
  /** Let ONNX Runtime's intra-op threads busy-wait for work (its default); off, they sleep between operators and runs. */
  spinWait?: boolean;
}

export interface LoadedSession {
  session: ort.InferenceSession;
  device: 'cpu' | `cuda:${number}`;
  note?: string;
}

function describeCudaFailure(err: unknown): string {
  const msg = (err as Error).message ?? String(err);
  if (/libcudart|libcublas|libcudnn|libcufft|libcurand/.test(msg)) {
    return `the CUDA provider could not load its CUDA libraries (${msg.match(/lib[\w.+-]+\.so[\w.]*/)?.[0] ?? 'libcudart / cuDNN'}): install the CUDA 12 runtime and cuDNN 9, or use --device cpu`;
  }
  if (/driver|CUDA failure 35|CUDA failure 100|no CUDA-capable device/i.test(msg)) {
    return `no usable NVIDIA driver or GPU was found (${msg.split('\n')[0]}); use --device cpu`;
  }
  return `the CUDA provider failed to start: ${msg.split('\n')[0]}`;
}

function baseSessionOptions(options: SessionOptions): ort.InferenceSession.SessionOptions {
  return {
    graphOptimizationLevel: 'all',
    intraOpNumThreads: options.threads ?? 0,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    logSeverityLevel: 3,
    // Spinning pool threads take a core from the engine's own thread between runs and from HTTP.
    extra: { session: { intra_op: { allow_spinning: options.spinWait ? '1' : '0' } } },
  };
}

export async function createSession(onnxPath: string, options: SessionOptions): Promise<LoadedSession> {
  const base = baseSessionOptions(options);
  const cpu = async (note?: string): Promise<LoadedSession> => ({
    session: await ort.InferenceSession.create(onnxPath, { ...base, executionProviders: ['cpu'] }),
    device: 'cpu',
    note,
  });
  if (options.device.kind === 'cpu') return cpu();
  const index = options.device.kind === 'cuda' ? options.device.index : 0;
  const problem = cudaProviderProblem();
  if (!problem) {
    try {
      const session = await ort.InferenceSession.create(onnxPath, {
        ...base,
        executionProviders: [{ name: 'cuda', deviceId: index }],
      });
      return { session, device: `cuda:${index}` };
    } catch (err) {
      if (options.device.kind === 'cuda') throw new Error(describeCudaFailure(err));
      return cpu(`--device auto: CUDA unavailable (${describeCudaFailure(err)}); using the CPU`);
    }
  }
  if (options.device.kind === 'cuda') throw new Error(problem);
  return cpu(`--device auto: ${problem}; using the CPU`);
}

export type AttentionMode = 'native' | 'onnx';

export interface RunnerOptions extends SessionOptions {
  maxSlots: number;
  maxModelLen: number;
  /** Where a Tally graph runs its attention on the CPU (default: native when the addon is built). */
  attention?: AttentionMode;
  /** KV capacity: tokens, else what fits in bytes. */
  kvCacheTokens?: number;
  kvCacheBytes?: number;
  /**
   * Element type of the KV cache. Default: float16 with native attention (as llama.cpp's server stores its
   * cache: half the bytes that every decode step reads), the graph's own type on the other paths, where an
   * explicit type must match it.
   */
  kvCacheDtype?: KvCacheDtype;
}

/**
 * A Tally graph on the CPU cut at its attention, which runs in native/attention over a paged cache; undefined
 * (with why, when the caller asked for it) where that path does not apply.
 */
async function createPagedRunner(folder: ModelFolder, options: RunnerOptions): Promise<{ runner?: PagedRunner; reason?: string; note?: string }> {
  const cudaProblem = options.device.kind === 'auto' ? cudaProviderProblem() : undefined;
  const onCpu = options.device.kind === 'cpu' || cudaProblem !== undefined;
  if (options.attention === 'onnx' || !onCpu) return {};
  const bytes = fs.readFileSync(folder.onnxPath);
  const meta = readModelMetadata(bytes);
  if (meta['tally.graph'] !== 'tally' || Number(meta['tally.graph_version']) < 6) return { reason: 'native attention needs a graph converted by Tally' };
  if ((meta['tally.dtype'] ?? 'float32') !== 'float32') return { reason: 'native attention runs float32 graphs' };
  const addon = loadAttentionAddon();
  if ('reason' in addon) return { reason: addon.reason };
  const kvDtype = options.kvCacheDtype ?? 'float16';
  const kvTokens = options.kvCacheTokens ?? Math.floor((options.kvCacheBytes ?? 4 * 2 ** 30) / kvBytesPerToken(folder.config, kvDtype === 'float16' ? 2 : 4));
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
  addon.binding.threads(options.threads && options.threads > 0 ? options.threads : os.availableParallelism());
  const runner = new PagedRunner(parts, folder.config, addon.binding, { maxSlots: options.maxSlots, maxModelLen: options.maxModelLen, kvTokens, kvDtype });
  return { runner, note: cudaProblem ? `--device auto: ${cudaProblem}; using the CPU` : undefined };
}

/** Models below this many FLOPs per token get one intra-op thread unless --threads says otherwise. */
export const SMALL_MODEL_FLOPS_PER_TOKEN = 5e6;

/**
 * Intra-op threads (ONNX Runtime's and native attention's) when --threads is not given: one for very small
 * models, else one per core. A step of a model of a few million parameters is made of operators that take tens
 * of microseconds, about what waking a pool thread costs, and under HTTP load that thread takes a core from the
 * server's own threads: stories260K over HTTP at concurrency 32 streamed 12–15k tokens/s on one thread against
 * 8–9k on two, while the bare engine loop ran at the same speed either way.
 */
export function defaultThreads(config: LlamaConfig): number {
  const perToken = linearFlopsPerToken(modelShape(config)) + 2 * config.hidden_size * config.vocab_size;
  return perToken < SMALL_MODEL_FLOPS_PER_TOKEN ? 1 : os.availableParallelism();
}

export async function createRunner(folder: ModelFolder, runnerOptions: RunnerOptions): Promise<{ runner: ModelRunner; device: string; threads: number; note?: string }> {
  const threads = runnerOptions.threads && runnerOptions.threads > 0 ? runnerOptions.threads : defaultThreads(folder.config);
  const options = { ...runnerOptions, threads };
  const paged = await createPagedRunner(folder, options);
  if (paged.runner) return { runner: paged.runner, device: 'cpu', threads, note: paged.note };
  if (options.attention === 'native') throw new Error(`--attention native: ${paged.reason ?? 'only on the CPU'}`);
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
    runner = new TallyRunner(session, folder.config, options);
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
    const why = paged.reason ?? (options.attention === 'onnx' ? '--attention onnx' : 'native attention runs on the CPU only');
    throw new Error(`--kv-cache-dtype ${options.kvCacheDtype}: this graph's KV cache is ${graphDtype}, and only native attention stores another type (${why})`);
  }
  return { runner, device: loaded.device, threads, note: loaded.note };
}
