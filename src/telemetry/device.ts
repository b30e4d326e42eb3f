import os from 'node:os';
import si from 'systeminformation';
import { loadNvmlAddon, type NvmlBinding } from './nvml.ts';

/**
 * Device telemetry: what the engine's device is doing, sampled at an interval, through the first source
 * that works:
 *   nvml        native/nvml (libnvidia-ml.so.1 loaded at run time): utilization, memory, power, energy
 *   nvidia-smi  systeminformation's graphics(), which runs nvidia-smi (and lspci): no energy counter
 *   cpu         a CPU engine: system load (systeminformation currentLoad) and this process's CPU time
 *   none        nothing usable; `notes` say why
 * A figure a source cannot give is null, with the reason in `unavailable`; never a made-up zero.
 */
export type TelemetrySource = 'nvml' | 'nvidia-smi' | 'cpu' | 'none';
export type Figure = 'utilization' | 'memoryUtilization' | 'memoryUsedBytes' | 'memoryTotalBytes' | 'powerWatts' | 'energyJoules';

export interface DeviceReading {
  /** The NVML / nvidia-smi index; 0 for the CPU. */
  index: number;
  name: string;
  /** Busy share, 0..1: the share of time a GPU kernel ran, or the load of all CPU cores. */
  utilization: number | null;
  /** GPUs: share of time device memory was read or written, 0..1. */
  memoryUtilization: number | null;
  /** Device memory; on the CPU, the host's active memory and its RAM. */
  memoryUsedBytes: number | null;
  memoryTotalBytes: number | null;
  powerWatts: number | null;
  /** Energy counter since the driver loaded (NVML, Volta and newer). */
  energyJoules: number | null;
  /** Why each null figure is null. */
  unavailable: Partial<Record<Figure, string>>;
  /** CPU only: CPU-seconds this process used per second since the previous sample (cores' worth). */
  processCpuCores?: number;
}

export interface TelemetrySample {
  source: TelemetrySource;
  atMs: number;
  devices: DeviceReading[];
  /**
   * Watts the sampled devices draw together: the rate of their energy counters since the previous sample
   * where they have one, their power reading otherwise; null when some device gives neither.
   */
  watts: number | null;
  /** Why sources earlier in the chain were passed over, why watts is null, or why a sample failed. */
  notes: string[];
}

export interface DeviceTelemetryOptions {
  /** Milliseconds between samples (default 5000). */
  intervalMs?: number;
  /**
   * The engine's device, as the session reports it ('cpu' or 'cuda:N'). 'cpu' reads the CPU; 'cuda:N'
   * reads GPU N through nvml then nvidia-smi and never passes CPU figures off as the GPU's. Unset: the whole
   * chain nvml → nvidia-smi → cpu over every GPU found.
   */
  engineDevice?: string;
  /** GPU indices to read (NVML order, which is nvidia-smi's); default: N of cuda:N, else all. */
  gpus?: number[];
}

type Reader = { source: TelemetrySource; read(): Promise<DeviceReading[]> };

const MIB = 2 ** 20;
const pct = (v: number | null | undefined) => (typeof v === 'number' && Number.isFinite(v) ? v / 100 : null);

/** Readings from systeminformation's graphics(): the NVIDIA controllers nvidia-smi reported on. */
export function fromGraphics(data: si.Systeminformation.GraphicsData): DeviceReading[] {
  const smiFields = ['utilizationGpu', 'memoryTotal', 'powerDraw', 'driverVersion'] as const;
  const nvidia = data.controllers.filter((c) => /nvidia/i.test(c.vendor ?? '') && smiFields.some((f) => c[f] !== undefined && c[f] !== null));
  return nvidia.map((c, index) => {
    const reading: DeviceReading = {
      index,
      name: c.name ?? c.model ?? 'NVIDIA GPU',
      utilization: pct(c.utilizationGpu),
      memoryUtilization: pct(c.utilizationMemory),
      memoryUsedBytes: typeof c.memoryUsed === 'number' ? c.memoryUsed * MIB : null,
      memoryTotalBytes: typeof c.memoryTotal === 'number' ? c.memoryTotal * MIB : null,
      powerWatts: typeof c.powerDraw === 'number' ? c.powerDraw : null,
      energyJoules: null,
      unavailable: { energyJoules: 'nvidia-smi (through systeminformation) reports no energy counter' },
    };
    for (const f of ['utilization', 'memoryUtilization', 'memoryUsedBytes', 'memoryTotalBytes', 'powerWatts'] as const) {
      if (reading[f] === null) reading.unavailable[f] = 'nvidia-smi reported no value (systeminformation drops both N/A and 0)';
    }
    return reading;
  });
}

function nvmlReader(binding: NvmlBinding, indices: number[]): Reader {
  return {
    source: 'nvml',
    async read() {
      return indices.map((index) => {
        const s = binding.sample(index);
        const unavailable: DeviceReading['unavailable'] = {};
        const from = { utilizationGpu: 'utilization', utilizationMemory: 'memoryUtilization' } as const;
        for (const [field, reason] of Object.entries(s.unavailable)) unavailable[(from as Record<string, Figure>)[field] ?? (field as Figure)] = `NVML: ${reason}`;
        return {
          index,
          name: s.name,
          utilization: pct(s.utilizationGpu),
          memoryUtilization: pct(s.utilizationMemory),
          memoryUsedBytes: s.memoryUsedBytes,
          memoryTotalBytes: s.memoryTotalBytes,
          powerWatts: s.powerWatts,
          energyJoules: s.energyJoules,
          unavailable,
        };
      });
    },
  };
}

function cpuReader(): Reader {
  // The first sample covers the process's life so far. process.cpuUsage() counts every thread: ONNX Runtime's too.
  let last = { usage: { user: 0, system: 0 }, atMs: Date.now() - process.uptime() * 1000 };
  const name = os.cpus()[0]?.model?.trim() || 'CPU';
  return {
    source: 'cpu',
    async read() {
      const [load, mem] = await Promise.all([si.currentLoad(), si.mem()]);
      const usage = process.cpuUsage();
      const atMs = Date.now();
      const cpuSeconds = (usage.user - last.usage.user + usage.system - last.usage.system) / 1e6;
      const processCpuCores = atMs > last.atMs ? cpuSeconds / ((atMs - last.atMs) / 1000) : 0;
      last = { usage, atMs };
      return [
        {
          index: 0,
          name,
          utilization: pct(load.currentLoad),
          memoryUtilization: null,
          memoryUsedBytes: mem.active,
          memoryTotalBytes: mem.total,
          powerWatts: null,
          energyJoules: null,
          unavailable: {
            memoryUtilization: 'not measured on the CPU',
            powerWatts: 'no power meter is read on the CPU',
            energyJoules: 'no energy counter is read on the CPU',
          },
          processCpuCores,
        },
      ];
    },
  };
}

function gpuIndices(options: DeviceTelemetryOptions, count: number): number[] {
  if (options.gpus) return options.gpus;
  const m = /^cuda:(\d+)$/.exec(options.engineDevice ?? '');
  return m ? [Number(m[1])] : Array.from({ length: count }, (_, i) => i);
}

/** Picks the first source of the chain that reads at least one device. */
async function selectReader(options: DeviceTelemetryOptions, notes: string[]): Promise<Reader | undefined> {
  const engine = options.engineDevice;
  if (engine !== 'cpu') {
    const addon = loadNvmlAddon();
    if ('reason' in addon) notes.push(`nvml: ${addon.reason}`);
    else {
      const opened = addon.binding.open();
      if (!opened.ok) notes.push(`nvml: ${opened.reason}`);
      else {
        const indices = gpuIndices(options, opened.count);
        const missing = indices.filter((i) => !(i >= 0 && i < opened.count));
        if (opened.count === 0) notes.push('nvml: NVML sees no GPU');
        else if (missing.length > 0) notes.push(`nvml: no GPU ${missing.join(', ')} (NVML sees ${opened.count})`);
        else return nvmlReader(addon.binding, indices);
      }
    }
    try {
      const all = fromGraphics(await si.graphics());
      const indices = gpuIndices(options, all.length);
      if (all.length === 0) notes.push('nvidia-smi: systeminformation found no NVIDIA GPU (it needs nvidia-smi and lspci on PATH)');
      else if (indices.some((i) => !all[i])) notes.push(`nvidia-smi: no GPU ${indices.filter((i) => !all[i]).join(', ')} (it lists ${all.length})`);
      else return { source: 'nvidia-smi', read: async () => fromGraphics(await si.graphics()).filter((d) => indices.includes(d.index)) };
    } catch (err) {
      notes.push(`nvidia-smi: ${(err as Error).message}`);
    }
  }
  if (engine === undefined || engine === 'cpu') return cpuReader();
  notes.push(`no device telemetry for ${engine}: its figures are unavailable`);
  return undefined;
}

export class DeviceTelemetry {
  readonly intervalMs: number;
  private readonly options: DeviceTelemetryOptions;
  private reader?: Promise<Reader | undefined>;
  private selectNotes: string[] = [];
  private last?: TelemetrySample;
  private timer?: NodeJS.Timeout;
  private running = false;
  private readonly powerListeners = new Set<(watts: number) => void>();

  constructor(options: DeviceTelemetryOptions = {}) {
    this.options = options;
    this.intervalMs = options.intervalMs ?? 5000;
    if (!(this.intervalMs > 0)) throw new Error('the telemetry interval must be positive');
  }

  /** Chooses the source, takes the first sample, then samples every intervalMs until stop(). */
  async start(): Promise<TelemetrySample> {
    const first = await this.sample();
    this.running = true;
    this.schedule();
    return first;
  }

  stop(): void {
    this.running = false;
    clearTimeout(this.timer);
    // NVML stays open: the addon's state is the process's, shared by every DeviceTelemetry.
    this.reader = undefined;
    this.last = undefined;
    this.selectNotes = [];
  }

  /** The latest sample, if any. */
  latest(): TelemetrySample | undefined {
    return this.last;
  }

  /** Calls `listener` with the devices' watts after every sample that has them (e.g. CostMeter.observePower); returns an unsubscribe. */
  onPower(listener: (watts: number) => void): () => void {
    this.powerListeners.add(listener);
    return () => this.powerListeners.delete(listener);
  }

  /** Reads the devices now (choosing the source on the first call). */
  async sample(): Promise<TelemetrySample> {
    this.reader ??= selectReader(this.options, this.selectNotes);
    const reader = await this.reader;
    const notes = [...this.selectNotes];
    let devices: DeviceReading[] = [];
    if (reader) {
      try {
        devices = await reader.read();
      } catch (err) {
        notes.push(`${reader.source}: sampling failed: ${(err as Error).message}`);
      }
    }
    const atMs = Date.now();
    const watts = this.watts(devices, atMs, notes);
    const sample: TelemetrySample = { source: reader && devices.length > 0 ? reader.source : 'none', atMs, devices, watts, notes };
    this.last = sample;
    if (watts !== null) {
      for (const listener of this.powerListeners) {
        try {
          listener(watts);
        } catch (err) {
          notes.push(`a power listener failed: ${(err as Error).message}`);
        }
      }
    }
    return sample;
  }

  private watts(devices: DeviceReading[], atMs: number, notes: string[]): number | null {
    if (devices.length === 0) return null;
    let total = 0;
    for (const d of devices) {
      const before = this.last?.devices.find((p) => p.index === d.index);
      const seconds = this.last ? (atMs - this.last.atMs) / 1000 : 0;
      const joules = d.energyJoules !== null && before?.energyJoules != null ? d.energyJoules - before.energyJoules : undefined;
      if (joules !== undefined && joules >= 0 && seconds > 0) total += joules / seconds;
      else if (d.powerWatts !== null) total += d.powerWatts;
      else {
        notes.push(`no power figure for ${d.name} (${d.unavailable.powerWatts ?? 'unavailable'})`);
        return null;
      }
    }
    return total;
  }

  private schedule(): void {
    if (!this.running) return;
    this.timer = setTimeout(() => {
      this.sample().finally(() => this.schedule());
    }, this.intervalMs);
    this.timer.unref();
  }
}
