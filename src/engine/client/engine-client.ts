import { Worker } from 'node:worker_threads';
import { EventEmitter } from 'node:events';
import { type EngineInfo, EngineOptionError, type EngineOptions, type FromWorker, type GenerationRequest, type RequestEvent, type StepRecord, type ToWorker } from '../protocol.ts';
import type { EngineHandle } from './engine-handle.ts';

/** The engine worker's entry module (engine/core). */
export const ENGINE_WORKER = new URL('../core/worker-entry.js', import.meta.url);

type Listener = (event: RequestEvent) => void;

/** Restart back-off after a failed restart: 1 s, 2 s, 4 s, … at most 30 s. */
const RESTART_BACKOFF_MS = [1000, 2000, 4000, 8000, 16_000, 30_000];

/**
 * The main thread's handle on the engine worker. ONNX Runtime's run() blocks its thread for the
 * whole forward pass, so the engine lives in a worker and HTTP stays responsive. A worker that dies
 * fails its requests in flight (each gets a finish 'error' event saying so) and is started again;
 * requests submitted while it restarts wait and go to the new worker. While a restart keeps failing,
 * new requests fail at once.
 */
export class EngineClient extends EventEmitter<{ step: [StepRecord]; restart: [string] }> implements EngineHandle {
  private worker!: Worker;
  private pending = new Map<string, Listener>();
  private closing = false;
  /** Whether the current worker is up (ready, not exited). */
  private up = false;
  /** Messages for a worker that is (re)starting. */
  private backlog: ToWorker[] = [];
  /** Why the engine cannot take requests (its restart failed). */
  private broken?: string;
  private failedRestarts = 0;
  private retryTimer?: NodeJS.Timeout;
  private exited: Promise<void> = Promise.resolve();
  info!: EngineInfo;
  restarts = 0;

  private constructor(
    private readonly options: EngineOptions,
    private readonly workerEntry: URL,
  ) {
    super();
  }

  /**
   * Starts the worker (`workerEntry`, default the engine's own) and loads the model; rejects with a message that
   * names the model folder if it cannot (an EngineOptionError when an option is what stands in the way).
   */
  static async start(options: EngineOptions, workerEntry: URL = ENGINE_WORKER): Promise<EngineClient> {
    const client = new EngineClient(options, workerEntry);
    try {
      await client.spawn();
    } catch (err) {
      if (err instanceof EngineOptionError) throw err;
      throw new Error(`could not load the model in ${options.modelDir}: ${(err as Error).message}`, { cause: err });
    }
    return client;
  }

  private spawn(): Promise<void> {
    return new Promise((resolve, reject) => {
      const worker = new Worker(this.workerEntry, { workerData: this.options });
      this.worker = worker;
      this.exited = new Promise((r) => worker.once('exit', () => r()));
      let ready = false;
      worker.on('message', (m: FromWorker) => {
        if (m.type === 'events') {
          for (const e of JSON.parse(m.json) as RequestEvent[]) this.dispatch(e);
        } else if (m.type === 'step') {
          this.emit('step', m.record);
        } else if (m.type === 'ready') {
          ready = true;
          this.info = m.info;
          this.up = true;
          for (const queued of this.backlog.splice(0)) worker.postMessage(queued);
          if (this.closing) worker.postMessage({ type: 'stop' } satisfies ToWorker);
          resolve();
        } else if (m.type === 'fatal') {
          if (!ready) reject(m.option ? new EngineOptionError(m.option, m.message) : new Error(m.message));
          else this.failAll(`the engine failed (${m.message}); it is restarting`);
        }
      });
      worker.on('error', (err) => {
        if (!ready) reject(err);
        else this.failAll(`the engine worker crashed (${err.message}); it is restarting`);
      });
      worker.on('exit', (code) => {
        this.up = false;
        if (!ready) return reject(new Error(`the engine worker exited with code ${code} before it was ready`));
        if (this.closing) return this.failAll('the server is shutting down');
        this.failAll(`the engine worker exited (code ${code}) while running this request; it is restarting`);
        this.restarts++;
        this.emit('restart', `exit code ${code}`);
        this.restart();
      });
    });
  }

  private restart(): void {
    this.spawn().then(
      () => {
        this.broken = undefined;
        this.failedRestarts = 0;
      },
      (err: Error) => {
        if (this.closing) return;
        this.broken = `the engine is down: its worker could not restart (${err.message})`;
        // Whatever waited for the new worker fails now; later submissions fail at once until it is back.
        this.backlog = [];
        this.failAll(this.broken);
        this.emit('restart', `restart failed: ${err.message}`);
        const delay = RESTART_BACKOFF_MS[Math.min(this.failedRestarts++, RESTART_BACKOFF_MS.length - 1)];
        this.retryTimer = setTimeout(() => this.restart(), delay);
        this.retryTimer.unref();
      },
    );
  }

  private dispatch(e: RequestEvent): void {
    const listener = this.pending.get(e.id);
    if (e.finish) this.pending.delete(e.id);
    listener?.(e);
  }

  private failAll(message: string): void {
    for (const id of [...this.pending.keys()]) {
      this.dispatch({ id, tokens: [], text: '', finish: 'error', error: message });
    }
  }

  private post(m: ToWorker): void {
    if (this.up) this.worker.postMessage(m);
    else this.backlog.push(m);
  }

  /** Requests submitted and not yet finished. */
  get inFlight(): number {
    return this.pending.size;
  }

  /** Whether the engine takes requests (false while its restart keeps failing, and once closed). */
  get available(): boolean {
    return this.broken === undefined && !this.closing;
  }

  submit(request: GenerationRequest, listener: Listener): void {
    this.pending.set(request.id, listener);
    const refusal = this.closing ? 'the server is shutting down' : this.broken;
    if (refusal !== undefined) {
      queueMicrotask(() => this.dispatch({ id: request.id, tokens: [], text: '', finish: 'error', error: refusal }));
      return;
    }
    this.post({ type: 'submit', request });
  }

  cancel(id: string): void {
    if (this.pending.has(id)) this.post({ type: 'cancel', id });
  }

  /** Cancels every request in flight; each ends with a 'cancelled' event at the engine's next step. */
  cancelAll(): void {
    for (const id of this.pending.keys()) this.post({ type: 'cancel', id });
  }

  /**
   * Stops the worker after its current step; requests still in flight then end with an error event (so that
   * they reach the meter). Terminates it if it has not stopped within 5 s.
   */
  async close(): Promise<void> {
    this.closing = true;
    clearTimeout(this.retryTimer);
    if (this.up) this.worker.postMessage({ type: 'stop' } satisfies ToWorker);
    const timeout = new Promise<boolean>((resolve) => setTimeout(() => resolve(false), 5000).unref());
    const stopped = await Promise.race([this.exited.then(() => true), timeout]);
    if (!stopped) await this.worker.terminate();
    this.up = false;
    this.failAll('the server is shutting down');
  }
}
