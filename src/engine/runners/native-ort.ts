import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ortBinaryDir } from './ort-session.ts';

/** Where scripts/build-native.js leaves the addon. */
export const ORT_ADDON_PATH = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../native/ort/build/Release/ort.node');

/** The ONNX Runtime library the native runner opens unless --ort-library / TALLY_ORT_LIBRARY names another. */
export function defaultOrtLibrary(): string {
  return path.join(ortBinaryDir(), 'libonnxruntime.so.1');
}

export type NativeSession = { readonly __nativeSession: unique symbol };
export type NativeStepper = { readonly __nativeStepper: unique symbol };
/** Memory from a session's allocator, where it runs (device memory on CUDA). */
export type NativeBuffer = { readonly __nativeBuffer: unique symbol };
export type BufferElement = 'float32' | 'float16' | 'int32' | 'int64';
/** A run's input or output: a typed array, or a view of a buffer ([name, buffer, dims, byteOffset, element]). */
export type RunEntry = [string, TensorArray, number[]] | [string, NativeBuffer, number[], number, BufferElement];
export type TensorArray = Float32Array | Int32Array | BigInt64Array | Uint16Array;

export interface LoadedOrt {
  /** The library's own version string, e.g. 1.30.0. */
  version: string;
  path: string;
  /** The C API version asked for. */
  apiVersion: number;
  /** Execution providers built into the library (CPUExecutionProvider, CUDAExecutionProvider, ...). */
  providers: string[];
  /** The env's one intra-op thread pool, as the process's first load() asked for it; null: sessions keep their own. */
  pool: ThreadPool | null;
}

export interface ThreadPool {
  threads: number;
  /** Its threads busy-wait for work between operators and runs instead of sleeping. */
  spin: boolean;
}

export interface SessionCreateOptions {
  threads?: number;
  spin?: boolean;
  /** Run on the env's pool (claimPool()); threads and spin are then the pool's. */
  shared?: boolean;
  /** Folder of the external data files the graph's initializers name. */
  externalDir?: string;
  device?: 'cpu' | 'cuda';
  deviceId?: number;
}

/** The addon's exports (native/ort/ort.c). */
export interface OrtBinding {
  load(library: string, apiVersion?: number, pool?: { threads: number; spin: number }): LoadedOrt;
  /**
   * True where the env has a pool that no other caller holds: the caller's sessions may share it (shared: 1). It is
   * free again once the last of them is released.
   */
  claimPool(): boolean;
  createSession(model: Uint8Array, options: { threads?: number; spin?: number; shared?: number; externalDir?: string; device?: string; deviceId?: number }): NativeSession;
  sessionNames(session: NativeSession): { inputs: string[]; outputs: string[] };
  /**
   * Runs once with inputs and outputs bound to the arrays and buffer views given; outputs are written in place.
   * Returns the run's seconds, until the device has finished it.
   */
  sessionRun(session: NativeSession, inputs: RunEntry[], outputs: RunEntry[]): number;
  /** The same run on a libuv pool thread, off the event loop. */
  sessionRunAsync(session: NativeSession, inputs: RunEntry[], outputs: RunEntry[]): Promise<number>;
  /** `bytes` from the session's allocator where it runs (device memory on CUDA), not initialised. */
  allocate(session: NativeSession, bytes: number): NativeBuffer;
  /** dims: [layers, hidden, heads, kv_heads, head_dim, vocab, pages, kvHalf, graphHalf, threads]. */
  createStepper(parts: NativeSession[], dims: Int32Array, cos: Float32Array, sin: Float32Array): NativeStepper;
  /**
   * A whole forward pass, off the event loop; resolves with its wall time in seconds. ids: the B rows' new tokens
   * packed one row after another (N in all, rows of any lengths); rows: [new, cached, first page in table] per row.
   */
  stepperRun(stepper: NativeStepper, B: number, N: number, k: number, full: boolean, ids: Int32Array, rows: Int32Array, table: Int32Array, logits: Float32Array, topLogits: Float32Array, topIds: Int32Array): Promise<number>;
  /** The same pass on the calling thread; returns its wall time in seconds. */
  stepperRunSync(stepper: NativeStepper, B: number, N: number, k: number, full: boolean, ids: Int32Array, rows: Int32Array, table: Int32Array, logits: Float32Array, topLogits: Float32Array, topIds: Int32Array): number;
  /** Page `to` takes page `from`'s keys and values in every layer (no step may be running). */
  stepperCopyPage(stepper: NativeStepper, from: number, to: number): void;
  /** A session only after its buffers. */
  release(handle: NativeSession | NativeStepper | NativeBuffer): void;
  apiVersion: number;
  pagePositions: number;
  kernels: string;
}

let addon: { binding: OrtBinding } | { reason: string } | undefined;

/** The addon, or why it cannot be used (not built, or built for another Node). */
export function loadOrtAddon(): { binding: OrtBinding } | { reason: string } {
  if (addon) return addon;
  if (!fs.existsSync(ORT_ADDON_PATH)) {
    return (addon = { reason: `the native runner's addon is not built (${path.relative(process.cwd(), ORT_ADDON_PATH)} is missing; run \`node scripts/build-native.js ort\`)` });
  }
  // OpenMP reads this when it loads: threads that spin after each layer would take cores from ONNX Runtime.
  process.env.OMP_WAIT_POLICY ??= 'PASSIVE';
  try {
    addon = { binding: createRequire(import.meta.url)(ORT_ADDON_PATH) as OrtBinding };
  } catch (err) {
    addon = { reason: `the native runner's addon failed to load: ${(err as Error).message.split('\n')[0]}` };
  }
  return addon;
}

/**
 * The addon with ONNX Runtime opened: `library`, else TALLY_ORT_LIBRARY, else onnxruntime-node's own. One library
 * per process: asking for another once one is open is an error. `pool`: the env's thread pool, where this is the
 * process's first load.
 */
export function openOrt(library?: string, pool?: ThreadPool): { binding: OrtBinding; ort: LoadedOrt } | { reason: string } {
  const loaded = loadOrtAddon();
  if ('reason' in loaded) return loaded;
  const file = path.resolve(library || process.env.TALLY_ORT_LIBRARY || defaultOrtLibrary());
  try {
    return { binding: loaded.binding, ort: loaded.binding.load(file, undefined, pool && { threads: pool.threads, spin: pool.spin ? 1 : 0 }) };
  } catch (err) {
    return { reason: (err as Error).message };
  }
}

export function createNativeSession(binding: OrtBinding, model: Uint8Array, options: SessionCreateOptions): NativeSession {
  return binding.createSession(model, { ...options, spin: options.spin ? 1 : 0, shared: options.shared ? 1 : 0 });
}
