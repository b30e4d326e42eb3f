import { describe, expect, it } from 'vitest';
import { EnginePool } from '../src/engine/client/engine-pool.ts';
import { EngineClient } from '../src/engine/client/engine-client.ts';
import { CostMeter } from '../src/meter/meter.ts';
import type { GenerationRequest, RequestEvent, StepRecord } from '../src/engine/protocol.ts';
import { storiesModel } from './helpers/models.ts';
import { startServerWith } from './helpers/server.ts';

const GREEDY = { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };
const request = (id: string, maxTokens: number, promptIds = [1, 403, 407, 261]): GenerationRequest => ({
  id, promptIds, maxTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], sampling: GREEDY,
});
const run = (engine: { submit: EngineClient['submit'] }, req: GenerationRequest) =>
  new Promise<RequestEvent[]>((resolve) => {
    const events: RequestEvent[] = [];
    engine.submit(req, (e) => {
      events.push(e);
      if (e.finish) resolve(events);
    });
  });
const tokensOf = (events: RequestEvent[]) => events.flatMap((e) => e.tokens.map((t) => t.id));

describe('several engine workers in one server (--devices)', () => {
  it('spreads requests by outstanding tokens, meters each device, and gives the same tokens as one worker', async () => {
    const options = { modelDir: storiesModel(), device: { kind: 'cpu' as const }, threads: 1, maxNumSeqs: 8, maxNumBatchedTokens: 256, kvCacheBytes: 2 ** 26 };
    const pool = await EnginePool.start(options, [{ kind: 'cpu' }, { kind: 'cpu' }]);
    const single = await EngineClient.start(options);
    try {
      expect(pool.deviceNames).toEqual(['cpu#0', 'cpu#1']);
      expect(pool.info.limits.maxNumSeqs).toBe(16);
      const steps: StepRecord[] = [];
      pool.on('step', (r) => steps.push(r));
      const meter = new CostMeter({ devicePriceUsdPerHour: 3.6, devices: 2, devicesPerStep: 1 });
      pool.on('step', (r) => meter.observeStep(r));

      // A long request goes to worker 0; the next three go to worker 1 until it has as many tokens outstanding.
      const long = run(pool, request('long', 200));
      expect(pool.load()).toEqual([204, 0]);
      const short = [run(pool, request('s1', 60)), run(pool, request('s2', 60)), run(pool, request('s3', 60))];
      expect(pool.load()).toEqual([204, 192]);
      const fifth = run(pool, request('s4', 20));
      expect(pool.load()).toEqual([204, 216]);
      const results = await Promise.all([long, ...short, fifth]);
      expect(pool.load()).toEqual([0, 0]);
      expect(pool.inFlight).toBe(0);

      const alone = await run(single, request('alone', 200));
      expect(tokensOf(results[0])).toEqual(tokensOf(alone));

      const devices = new Set(steps.map((s) => s.device));
      expect(devices).toEqual(new Set(['cpu#0', 'cpu#1']));
      const busy = (d: string) => steps.filter((s) => s.device === d).reduce((a, s) => a + s.busySeconds, 0);
      expect(meter.busyByDevice.get('cpu#0')).toBeCloseTo(busy('cpu#0'), 9);
      expect(meter.busyByDevice.get('cpu#1')).toBeCloseTo(busy('cpu#1'), 9);
      // A request on one of two devices is charged its own device-seconds, not twice them.
      const finish = results[1].at(-1)!;
      const cost = meter.requestFinished({
        id: 's1', model: 'm', tenant: 't', status: 'completed', promptTokens: 4, completionTokens: 60,
        prefillSeconds: finish.cost!.prefillSeconds, decodeSeconds: finish.cost!.decodeSeconds,
        arrivalMs: Date.now() - 1000, endMs: Date.now(), interTokenSeconds: [],
      });
      expect(cost.device_seconds.prefill + cost.device_seconds.decode).toBeCloseTo(finish.cost!.prefillSeconds + finish.cost!.decodeSeconds, 12);
      expect(cost.usd.usage).toBeCloseTo(((finish.cost!.prefillSeconds + finish.cost!.decodeSeconds) * 3.6) / 3600, 15);

      // Cancelling reaches the worker that owns the request.
      const cancelled = run(pool, request('c', 400));
      pool.cancel('c');
      const events = await cancelled;
      expect(events.at(-1)!.finish).toBe('cancelled');
    } finally {
      await pool.close();
      await single.close();
    }
  });
});

describe('tally serve --devices', () => {
  it('runs one worker per device behind one endpoint and reports busy time per device', async () => {
    const { deviceList } = await import('../src/config/serve-config.ts');
    expect(deviceList({ device: 'cuda', devices: '0,1' })).toEqual([{ kind: 'cuda', index: 0 }, { kind: 'cuda', index: 1 }]);
    expect(deviceList({ device: 'cpu', devices: 'cpu,cpu' })).toEqual([{ kind: 'cpu' }, { kind: 'cpu' }]);
    expect(() => deviceList({ device: 'cpu', devices: 'gpu7' })).toThrow(/--devices "gpu7": must be cpu, cuda, cuda:N or auto/);
    const fs = await import('node:fs');
    const os = await import('node:os');
    const path = await import('node:path');
    const pino = (await import('pino')).pino;
    const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-devices-'));
    const server = await startServerWith(
      { model: storiesModel(), host: '127.0.0.1', port: 0, device: 'cpu', devices: 'cpu,cpu', threads: 1, dataDir, logLevel: 'silent', maxNumSeqs: 4 },
      pino({ level: 'silent' }),
    );
    try {
      expect(server.engine.info.device).toBe('cpu#0,cpu#1');
      const post = (i: number) =>
        fetch(`${server.url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: `Once upon a time ${i}`, max_tokens: 40, ignore_eos: true }) }).then((r) => r.json());
      const replies = await Promise.all([0, 1, 2, 3, 4, 5].map(post));
      for (const r of replies) expect(r.usage.completion_tokens).toBe(40);
      const cost = await (await fetch(`${server.url}/v1/cost`)).json();
      expect(cost.devices).toBe(2);
      expect(Object.keys(cost.per_device_busy_seconds_since_start).sort()).toEqual(['cpu#0', 'cpu#1']);
      const perDevice = Object.values(cost.per_device_busy_seconds_since_start) as number[];
      expect(perDevice.every((s) => s > 0)).toBe(true);
      expect(perDevice.reduce((a, b) => a + b, 0)).toBeCloseTo(cost.device_seconds.busy, 6);
    } finally {
      await server.shutdown(5);
    }
  });
});
