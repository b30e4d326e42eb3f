import { EventEmitter } from 'node:events';
import type { DeviceSpec, EngineInfo, EngineOptions, GenerationRequest, RequestEvent, StepRecord } from '../protocol.ts';
import { ENGINE_WORKER, EngineClient } from './engine-client.ts';
import type { EngineHandle } from './engine-handle.ts';

/**
 * One engine worker per device in one server (`--devices 0,1,…`). A request goes to the worker with the
 * fewest outstanding tokens (prompt + max_tokens of what it has in flight); step records carry their
 * device so that cost is metered per device.
 */
export class EnginePool extends EventEmitter<{ step: [StepRecord]; restart: [string] }> implements EngineHandle {
  private readonly owner = new Map<string, { worker: number; tokens: number }>();
  private readonly outstanding: number[];

  private constructor(private readonly workers: EngineClient[], readonly deviceNames: string[]) {
    super();
    this.outstanding = workers.map(() => 0);
    workers.forEach((w, i) => {
      w.on('step', (record) => this.emit('step', { ...record, device: deviceNames[i] }));
      w.on('restart', (why) => this.emit('restart', `${deviceNames[i]}: ${why}`));
    });
  }

  static async start(options: EngineOptions, devices: DeviceSpec[], workerEntry: URL = ENGINE_WORKER): Promise<EnginePool> {
    const workers: EngineClient[] = [];
    try {
      for (const device of devices) workers.push(await EngineClient.start({ ...options, device }, workerEntry));
    } catch (err) {
      await Promise.all(workers.map((w) => w.close()));
      throw err;
    }
    return new EnginePool(workers, workers.map((w, i) => `${w.info.device}#${i}`));
  }

  get info(): EngineInfo {
    const first = this.workers[0].info;
    return {
      ...first,
      device: this.deviceNames.join(','),
      limits: { ...first.limits, maxNumSeqs: first.limits.maxNumSeqs * this.workers.length, kvCapacityTokens: first.limits.kvCapacityTokens * this.workers.length },
    };
  }

  get inFlight(): number {
    return this.workers.reduce((n, w) => n + w.inFlight, 0);
  }

  get restarts(): number {
    return this.workers.reduce((n, w) => n + w.restarts, 0);
  }

  get available(): boolean {
    return this.workers.some((w) => w.available);
  }

  /** Outstanding tokens per worker, for tests and the log. */
  load(): number[] {
    return [...this.outstanding];
  }

  submit(request: GenerationRequest, listener: (event: RequestEvent) => void): void {
    let worker = -1;
    for (let i = 0; i < this.workers.length; i++) {
      if (this.workers[i].available && (worker < 0 || this.outstanding[i] < this.outstanding[worker])) worker = i;
    }
    if (worker < 0) worker = 0;
    const tokens = request.promptIds.length + request.maxTokens;
    this.outstanding[worker] += tokens;
    this.owner.set(request.id, { worker, tokens });
    this.workers[worker].submit(request, (event) => {
      if (event.finish) {
        this.outstanding[worker] -= tokens;
        this.owner.delete(request.id);
      }
      listener(event);
    });
  }

  cancel(id: string): void {
    const owner = this.owner.get(id);
    if (owner) this.workers[owner.worker].cancel(id);
  }

  cancelAll(): void {
    for (const w of this.workers) w.cancelAll();
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.close()));
  }
}
