import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Where scripts/build-native.js leaves the addon. */
export const ATTENTION_ADDON_PATH = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../native/attention/build/Release/attention.node');

/** The addon's exports (native/attention/attention.c). */
export interface AttentionBinding {
  /**
   * One layer (`arena` is that layer's): rotates the rows' new keys (RoPE from the cos / sin tables) and stores
   * them and the values in their pages, then writes each new token's attention (rotated, scaled query) to `out`.
   * `qkv` holds each token's q, k and v projections side by side.
   */
  attend(arena: Float32Array | Uint16Array, qkv: Float32Array, out: Float32Array, rows: Int32Array, pages: Int32Array, dims: Int32Array, cos: Float32Array, sin: Float32Array): void;
  /** Sets the number of threads (when given) and returns it. */
  threads(n?: number): number;
  /** 'AVX2' or 'portable C'. */
  kernels: string;
  /** Positions per page. */
  pagePositions: number;
}

let loaded: { binding: AttentionBinding } | { reason: string } | undefined;

/** The addon, or why it cannot be used (not built, or built for another Node). */
export function loadAttentionAddon(): { binding: AttentionBinding } | { reason: string } {
  if (loaded) return loaded;
  if (!fs.existsSync(ATTENTION_ADDON_PATH)) {
    return (loaded = { reason: `the attention addon is not built (${path.relative(process.cwd(), ATTENTION_ADDON_PATH)} is missing; run \`node scripts/build-native.js\`)` });
  }
  // OpenMP reads this when the addon loads: threads that spin after each layer would take cores from ONNX Runtime.
  process.env.OMP_WAIT_POLICY ??= 'PASSIVE';
  try {
    loaded = { binding: createRequire(import.meta.url)(ATTENTION_ADDON_PATH) as AttentionBinding };
  } catch (err) {
    loaded = { reason: `the attention addon failed to load: ${(err as Error).message.split('\n')[0]}` };
  }
  return loaded;
}
