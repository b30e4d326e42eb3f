import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import ort from 'onnxruntime-node';
import type { ModelFolder } from '../model/folder.ts';
import { PlainRunner, TallyRunner, isPlainGraph, isTallyGraph, type ModelRunner } from './runner.ts';

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

export async function createSession(onnxPath: string, options: SessionOptions): Promise<LoadedSession> {
  const base: ort.InferenceSession.SessionOptions = {
    graphOptimizationLevel: 'all',
    intraOpNumThreads: options.threads ?? 0,
    interOpNumThreads: 1,
    executionMode: 'sequential',
    logSeverityLevel: 3,
    // Spinning pool threads take a core from the engine's own thread between runs and from HTTP.
    extra: { session: { intra_op: { allow_spinning: options.spinWait ? '1' : '0' } } },
  };
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

export async function createRunner(
  folder: ModelFolder,
  options: SessionOptions & { maxSlots: number; maxModelLen: number },
): Promise<{ runner: ModelRunner; device: string; note?: string }> {
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
  return { runner, device: loaded.device, note: loaded.note };
}
