import { EventEmitter } from 'node:events';
import { EngineClient } from './engine-client.ts';
import type { WorkerFault } from './worker.ts';
import type { EngineOptions } from './engine-options.ts';
import type { EngineInfo } from './engine.ts';
import type { DeviceSpec } from './session.ts';
import type { GenerationRequest, RequestEvent, StepRecord } from './scheduler.ts';

/** What the server needs of an engine: one worker (EngineClient) or several (EnginePool). */
export interface Engine extends EventEmitter {
  readonly info: EngineInfo;
  /** Worker restarts since start. */
  readonly restarts: number;
  readonly inFlight: number;
  /** false while a worker is restarting and cannot take requests. */
  readonly available: boolean;
  submit(request: GenerationRequest, listener: (event: RequestEvent) => void): void;
  cancel(id: string): void;
  cancelAll(): void;
  injectFault(fault: WorkerFault): void;
  close(): Promise<void>;
}

/**
 * One engine worker per device in one server (`--devices 0,1,…`). A request goes to the worker with the
 * fewest outstanding tokens (prompt + max_tokens of what it has in flight); step records carry their
 * device so that cost is metered per device.
 */
export class EnginePool extends EventEmitter<{ step: [StepRecord]; restart: [string] }> implements Engine {
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

  static async start(options: EngineOptions, devices: DeviceSpec[]): Promise<EnginePool> {
    const workers: EngineClient[] = [];
    try {
      for (const device of devices) workers.push(await EngineClient.start({ ...options, device }));
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

  /** Fault injection for tests: on the first worker. */
  injectFault(fault: WorkerFault): void {
    this.workers[0].injectFault(fault);
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.close()));
  }
}
