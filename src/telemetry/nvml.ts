import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** Where scripts/build-native.js leaves the addon. */
export const NVML_ADDON_PATH = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../native/nvml/build/Release/nvml.node');

/** One NVML reading; a figure NVML cannot give (NOT_SUPPORTED, NO_PERMISSION, ...) is null, with NVML's reason in `unavailable`. */
export interface NvmlSample {
  name: string;
  /** Percent of the last sample period a kernel ran. */
  utilizationGpu: number | null;
  /** Percent of the last sample period device memory was read or written. */
  utilizationMemory: number | null;
  memoryUsedBytes: number | null;
  memoryTotalBytes: number | null;
  powerWatts: number | null;
  /** Since the driver was loaded (Volta and newer). */
  energyJoules: number | null;
  unavailable: Partial<Record<Exclude<keyof NvmlSample, 'name' | 'unavailable'>, string>>;
}

export type NvmlOpen = { ok: true; count: number } | { ok: false; reason: string };

/** The addon's exports (native/nvml/nvml.c). */
export interface NvmlBinding {
  open(): NvmlOpen;
  close(): void;
  /** Throws a RangeError for an index NVML does not know. */
  sample(index: number): NvmlSample;
}

/** The addon, or why it cannot be used (not built, or built for another Node). */
export function loadNvmlAddon(file = NVML_ADDON_PATH): { binding: NvmlBinding } | { reason: string } {
  if (!fs.existsSync(file)) return { reason: `the NVML addon is not built (${path.relative(process.cwd(), file)} is missing; run \`node scripts/build-native.js\`)` };
  try {
    return { binding: createRequire(import.meta.url)(file) as NvmlBinding };
  } catch (err) {
    return { reason: `the NVML addon failed to load: ${(err as Error).message.split('\n')[0]}` };
  }
}
