import { Worker } from 'node:worker_threads';
import { EventEmitter } from 'node:events';
import type { EngineOptions } from './engine-options.ts';
import type { EngineInfo } from './engine.ts';
import type { GenerationRequest, RequestEvent, StepRecord } from './scheduler.ts';
import type { FromWorker, ToWorker } from './worker.ts';

const WORKER_URL = new URL('./worker-entry.js', import.meta.url);

type Listener = (event: RequestEvent) => void;

/**
 * The main thread's handle on the engine worker. ONNX Runtime's run() blocks its thread for the
 * whole forward pass, so the engine lives in a worker and HTTP stays responsive. A worker that dies
 * fails its requests in flight and is started again.
 */
export class EngineClient extends EventEmitter<{ step: [StepRecord]; restart: [string]; event: [RequestEvent] }> {
  private worker!: Worker;
  private pending = new Map<string, Listener>();
  private closing = false;
  info!: EngineInfo;
  restarts = 0;

  private constructor(private readonly options: EngineOptions) {
    super();
  }

  static async start(options: EngineOptions): Promise<EngineClient> {
    const client = new EngineClient(options);
    await client.spawn();
    return client;
  }

  private spawn(): Promise<void> {
    return new Promise((resolve, reject) => {
      const worker = new Worker(WORKER_URL, { workerData: this.options });
      this.worker = worker;
      let ready = false;
      worker.on('message', (m: FromWorker) => {
        if (m.type === 'events') {
          for (const e of m.events) this.dispatch(e);
        } else if (m.type === 'step') {
          this.emit('step', m.record);
        } else if (m.type === 'ready') {
          ready = true;
          this.info = m.info;
          resolve();
        } else if (m.type === 'fatal') {
          if (!ready) reject(new Error(m.message));
          else this.failAll(`engine failed: ${m.message}`);
        }
      });
      worker.on('error', (err) => {
        if (!ready) reject(err);
        else this.failAll(`engine worker crashed: ${err.message}`);
      });
      worker.on('exit', (code) => {
        if (!ready) return reject(new Error(`engine worker exited with code ${code} before it was ready`));
        if (this.closing) return;
        this.failAll(`engine worker exited with code ${code}`);
        this.restarts++;
        this.emit('restart', `exit code ${code}`);
        this.spawn().catch((err) => this.emit('restart', `restart failed: ${(err as Error).message}`));
      });
    });
  }

  private dispatch(e: RequestEvent): void {
    const listener = this.pending.get(e.id);
    if (e.finish) this.pending.delete(e.id);
    this.emit('event', e);
    listener?.(e);
  }

  private failAll(message: string): void {
    for (const id of [...this.pending.keys()]) {
      this.dispatch({ id, tokens: [], text: '', finish: 'error', error: message });
    }
  }

  private post(m: ToWorker): void {
    this.worker.postMessage(m);
  }

  /** Requests submitted and not yet finished. */
  get inFlight(): number {
    return this.pending.size;
  }

  submit(request: GenerationRequest, listener: Listener): void {
    this.pending.set(request.id, listener);
    this.post({ type: 'submit', request });
  }

  cancel(id: string): void {
    if (this.pending.has(id)) this.post({ type: 'cancel', id });
  }

  /** Kills the worker (for fault tests and last-resort shutdown). */
  async terminateWorker(): Promise<void> {
    await this.worker.terminate();
  }

  async close(): Promise<void> {
    this.closing = true;
    this.post({ type: 'stop' });
    const exited = new Promise<void>((resolve) => this.worker.once('exit', () => resolve()));
    const timeout = new Promise<void>((resolve) => setTimeout(resolve, 5000).unref());
    await Promise.race([exited, timeout]);
    await this.worker.terminate();
  }
}
