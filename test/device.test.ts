import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DeviceTelemetry, fromGraphics, type TelemetrySample } from '../src/telemetry/device.ts';
import { NVML_ADDON_PATH, loadNvmlAddon, type NvmlBinding, type NvmlSample } from '../src/telemetry/nvml.ts';

const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
const compiler = has('gcc') || has('cc');
/** A real NVIDIA driver here (the device machine): open() then succeeds instead of saying why not. */
const driver = spawnSync('sh', ['-c', 'ldconfig -p | grep -q libnvidia-ml.so.1']).status === 0;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-device-'));

beforeAll(() => {
  if (!fs.existsSync(NVML_ADDON_PATH) && compiler) {
    const r = spawnSync(process.execPath, ['scripts/build-native.js'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
  }
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function addon(): NvmlBinding {
  const loaded = loadNvmlAddon();
  if ('reason' in loaded) throw new Error(loaded.reason);
  return loaded.binding;
}

describe('NVML addon', () => {
  it.skipIf(!compiler)('open() says why when libnvidia-ml.so.1 cannot be loaded', () => {
    const opened = addon().open();
    if (driver) {
      expect(opened).toMatchObject({ ok: true });
      return;
    }
    expect(opened.ok).toBe(false);
    expect(!opened.ok && opened.reason).toMatch(/libnvidia-ml\.so\.1 could not be loaded \(libnvidia-ml\.so\.1: cannot open shared object file/);
    expect(() => addon().sample(0)).toThrow(/call open\(\) first/);
  });

  it('loadNvmlAddon names the missing build', () => {
    expect(loadNvmlAddon(path.join(tmp, 'nope.node'))).toEqual({ reason: expect.stringMatching(/not built .*scripts\/build-native\.js/) });
  });

  // A stand-in libnvidia-ml.so.1 with fixed figures proves the dlopen path, the ABI and the unit conversions.
  const FAKE_NVML = String.raw`
    #include <string.h>
    typedef struct nvmlDevice_st *nvmlDevice_t;
    typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
    typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
    static int devices[2];
    static unsigned long long energy0 = 123456789ULL;
    static int idx(nvmlDevice_t d) { return (int *)d - devices; }
    int nvmlInit_v2(void) { return 0; }
    int nvmlShutdown(void) { return 0; }
    const char *nvmlErrorString(int r) { return r == 3 ? "Not Supported" : "Unknown Error"; }
    int nvmlDeviceGetCount_v2(unsigned int *n) { *n = 2; return 0; }
    int nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *d) { if (i >= 2) return 2; *d = (nvmlDevice_t)&devices[i]; return 0; }
    int nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int len) { strncpy(name, idx(d) ? "Fake L4" : "Fake H100 80GB HBM3", len); return 0; }
    int nvmlDeviceGetUtilizationRates(nvmlDevice_t d, nvmlUtilization_t *u) { u->gpu = idx(d) ? 5 : 87; u->memory = idx(d) ? 1 : 42; return 0; }
    int nvmlDeviceGetMemoryInfo(nvmlDevice_t d, nvmlMemory_t *m) {
      m->total = idx(d) ? 24159191040ULL : 85899345920ULL; m->used = idx(d) ? 1048576ULL : 12345678848ULL; m->free = m->total - m->used; return 0; }
    int nvmlDeviceGetPowerUsage(nvmlDevice_t d, unsigned int *mw) { *mw = idx(d) ? 27125 : 312456; return 0; }
    /* device 0's counter advances 500 J per read; device 1 has none (pre-Volta) */
    int nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t d, unsigned long long *mj) {
      if (idx(d)) return 3; *mj = energy0; energy0 += 500000ULL; return 0; }
  `;

  it.skipIf(!compiler)('reads exactly what a libnvidia-ml.so.1 on LD_LIBRARY_PATH reports', () => {
    fs.writeFileSync(path.join(tmp, 'fake-nvml.c'), FAKE_NVML);
    const cc = spawnSync(has('gcc') ? 'gcc' : 'cc', ['-shared', '-fPIC', '-o', path.join(tmp, 'libnvidia-ml.so.1'), path.join(tmp, 'fake-nvml.c')], { encoding: 'utf8' });
    expect(cc.status, cc.stderr).toBe(0);
    const script = path.join(tmp, 'child.mts');
    fs.writeFileSync(
      script,
      `import { loadNvmlAddon } from ${JSON.stringify(path.resolve('src/telemetry/nvml.ts'))};
       import { DeviceTelemetry } from ${JSON.stringify(path.resolve('src/telemetry/device.ts'))};
       const { binding } = loadNvmlAddon();
       const opened = binding.open();
       const raw = [binding.sample(0), binding.sample(1)];
       let missing; try { binding.sample(2); } catch (err) { missing = err.message; }
       binding.close();
       const telemetry = new DeviceTelemetry({ engineDevice: 'cuda:0', gpus: [0, 1] });
       const powered = [];
       telemetry.onPower((w) => powered.push(w));
       const samples = [await telemetry.sample(), await new Promise((r) => setTimeout(r, 50)).then(() => telemetry.sample())];
       telemetry.stop();
       console.log(JSON.stringify({ opened, raw, missing, samples, powered }));`,
    );
    const child = spawnSync(process.execPath, ['--import', 'tsx', script], {
      encoding: 'utf8',
      env: { ...process.env, LD_LIBRARY_PATH: [tmp, process.env.LD_LIBRARY_PATH].filter(Boolean).join(':') },
    });
    expect(child.status, child.stderr).toBe(0);
    const out = JSON.parse(child.stdout) as { opened: unknown; raw: NvmlSample[]; missing: string; samples: TelemetrySample[]; powered: number[] };

    expect(out.opened).toEqual({ ok: true, count: 2 });
    expect(out.raw[0]).toEqual({
      name: 'Fake H100 80GB HBM3',
      utilizationGpu: 87,
      utilizationMemory: 42,
      memoryUsedBytes: 12345678848,
      memoryTotalBytes: 85899345920,
      powerWatts: 312.456,
      energyJoules: 123456.789,
      unavailable: {},
    });
    expect(out.raw[1]).toEqual({
      name: 'Fake L4',
      utilizationGpu: 5,
      utilizationMemory: 1,
      memoryUsedBytes: 1048576,
      memoryTotalBytes: 24159191040,
      powerWatts: 27.125,
      energyJoules: null,
      unavailable: { energyJoules: 'Not Supported' },
    });
    expect(out.missing).toMatch(/no NVML device 2/);

    // Through DeviceTelemetry: source nvml, fractions, and watts from device 0's energy counter (500 J between
    // reads) plus device 1's power reading; the first sample has no previous reading, so power readings only.
    const [first, second] = out.samples;
    expect(first.source).toBe('nvml');
    expect(first.notes).toEqual([]);
    expect(first.devices.map((d) => [d.index, d.name, d.utilization, d.memoryUtilization])).toEqual([
      [0, 'Fake H100 80GB HBM3', 0.87, 0.42],
      [1, 'Fake L4', 0.05, 0.01],
    ]);
    expect(first.devices[1]).toMatchObject({ energyJoules: null, unavailable: { energyJoules: 'NVML: Not Supported' } });
    expect(first.watts).toBeCloseTo(312.456 + 27.125, 9);
    const seconds = (second.atMs - first.atMs) / 1000;
    expect(second.devices[0].energyJoules! - first.devices[0].energyJoules!).toBeCloseTo(500, 9);
    expect(second.watts).toBeCloseTo(500 / seconds + 27.125, 9);
    expect(out.powered).toEqual([first.watts, second.watts]);
  });
});

describe('DeviceTelemetry', () => {
  const noGpu = !driver && !has('nvidia-smi');

  it.skipIf(!noGpu)('falls back nvml → nvidia-smi → cpu and reads the CPU', async () => {
    const telemetry = new DeviceTelemetry();
    const watts: number[] = [];
    telemetry.onPower((w) => watts.push(w));
    const before = await telemetry.sample();
    const u0 = process.cpuUsage();
    const end = Date.now() + 300;
    while (Date.now() < end); // burn CPU for the next sample
    const burned = (process.cpuUsage().user - u0.user) / 1e6;
    const s = await telemetry.sample();
    expect(s.source).toBe('cpu');
    expect(s.notes[0]).toMatch(/^nvml: (the NVML addon is not built|libnvidia-ml\.so\.1 could not be loaded)/);
    expect(s.notes[1]).toMatch(/^nvidia-smi: /);
    const [cpu] = s.devices;
    expect(cpu.name).toBe(os.cpus()[0].model.trim());
    expect(cpu.utilization).toBeGreaterThan(0);
    expect(cpu.utilization).toBeLessThanOrEqual(1);
    // This process's CPU time in the sampler's window covers at least what the loop burned.
    expect(cpu.processCpuCores! * ((s.atMs - before.atMs) / 1000)).toBeGreaterThanOrEqual(burned * 0.9);
    expect(cpu.processCpuCores).toBeLessThanOrEqual(os.availableParallelism() + 0.1);
    expect(cpu.memoryTotalBytes).toBe(os.totalmem());
    expect(cpu.memoryUsedBytes).toBeGreaterThan(0);
    expect(cpu.memoryUsedBytes).toBeLessThan(os.totalmem());
    // No power on the CPU: null with a reason, never 0, and no power callbacks.
    expect(cpu.powerWatts).toBeNull();
    expect(cpu.unavailable.powerWatts).toMatch(/no power meter/);
    expect(s.watts).toBeNull();
    expect(watts).toEqual([]);
  });

  it.skipIf(!noGpu)('a CUDA engine with no GPU telemetry reports none, with the reasons, not CPU figures', async () => {
    const s = await new DeviceTelemetry({ engineDevice: 'cuda:0' }).sample();
    expect(s).toMatchObject({ source: 'none', devices: [], watts: null });
    expect(s.notes.at(-1)).toBe('no device telemetry for cuda:0: its figures are unavailable');
  });

  it('a CPU engine reads the CPU and samples at its interval until stopped', async () => {
    const telemetry = new DeviceTelemetry({ engineDevice: 'cpu', intervalMs: 200 });
    const first = await telemetry.start();
    expect(first.source).toBe('cpu');
    expect(first.notes.filter((n) => /^nvml|^nvidia-smi/.test(n))).toEqual([]);
    await new Promise((r) => setTimeout(r, 700));
    const later = telemetry.latest()!;
    telemetry.stop();
    expect(later.atMs).toBeGreaterThan(first.atMs);
    await new Promise((r) => setTimeout(r, 400));
    expect(telemetry.latest()).toBeUndefined();
  });

  it('reads nvidia-smi figures from systeminformation, null where it has none', () => {
    const devices = fromGraphics({
      controllers: [
        { vendor: 'Intel Corporation', model: 'UHD 630', bus: 'PCI', vram: 0, vramDynamic: true },
        {
          vendor: 'NVIDIA Corporation', model: 'GH100', bus: 'PCI', vram: 81559, vramDynamic: false, name: 'NVIDIA H100 80GB HBM3',
          driverVersion: '550.54', memoryTotal: 81559, memoryUsed: 1024, utilizationGpu: 93, powerDraw: 412.5,
        },
      ],
      displays: [],
    });
    expect(devices).toEqual([
      {
        index: 0,
        name: 'NVIDIA H100 80GB HBM3',
        utilization: 0.93,
        memoryUtilization: null,
        memoryUsedBytes: 1024 * 2 ** 20,
        memoryTotalBytes: 81559 * 2 ** 20,
        powerWatts: 412.5,
        energyJoules: null,
        unavailable: {
          energyJoules: expect.stringMatching(/no energy counter/),
          memoryUtilization: expect.stringMatching(/nvidia-smi reported no value/),
        },
      },
    ]);
  });
});
