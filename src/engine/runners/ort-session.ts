/**
 * ONNX Runtime and the device mapping, in one place: session options, execution providers, and what to tell the
 * user when CUDA cannot be had.
 */
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import ort from 'onnxruntime-node';
import type { DeviceSpec } from '../protocol.ts';

/** Where onnxruntime-node keeps its native libraries; the CUDA provider is installed there too. */
export function ortBinaryDir(): string {
  const require = createRequire(import.meta.url);
  const pkg = path.dirname(require.resolve('onnxruntime-node/package.json'));
  return path.join(pkg, 'bin', 'napi-v6', process.platform, process.arch);
}

/**
 * Explains what is missing for the CUDA provider beside an ONNX Runtime library (in `dir`, by default
 * onnxruntime-node's), or returns undefined when its library is present.
 */
export function cudaProviderProblem(dir = ortBinaryDir()): string | undefined {
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

export function describeCudaFailure(err: unknown): string {
  const msg = (err as Error).message ?? String(err);
  if (/libcudart|libcublas|libcudnn|libcufft|libcurand/.test(msg)) {
    return `the CUDA provider could not load its CUDA libraries (${msg.match(/lib[\w.+-]+\.so[\w.]*/)?.[0] ?? 'libcudart / cuDNN'}): install the CUDA 12 runtime and cuDNN 9, or use --device cpu`;
  }
  if (/driver|CUDA failure 35|CUDA failure 100|no CUDA-capable device/i.test(msg)) {
    return `no usable NVIDIA driver or GPU was found (${msg.split('\n')[0]}); use --device cpu`;
  }
  return `the CUDA provider failed to start: ${msg.split('\n')[0]}`;
}

export function baseSessionOptions(options: SessionOptions): ort.InferenceSession.SessionOptions {
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

/** A session on the device asked for; with `auto`, CUDA when it starts, else the CPU with a note saying why. */
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

