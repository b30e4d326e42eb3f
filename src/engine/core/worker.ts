import type { MessagePort } from 'node:worker_threads';
import { createEngineCore, type EngineCore } from './engine-core.ts';
import { EngineOptionError, type EngineOptions, type FromWorker, type StepRecord, type ToWorker } from '../protocol.ts';

export interface WorkerHooks {
  /** After each step's record is posted: no forward pass is running. */
  afterStep?(core: EngineCore, record: StepRecord): void;
  /** Once the engine is loaded, before it is announced ready. */
  loaded?(core: EngineCore): void;
}

/** Runs the engine on this worker thread: loads the model, answers the main thread's messages, steps until stopped. */
export async function serveEngine(port: MessagePort, options: EngineOptions, hooks: WorkerHooks = {}): Promise<void> {
  const post = (m: FromWorker) => port.postMessage(m);
  try {
    let core: EngineCore | undefined;
    core = await createEngineCore(
      options,
      (events) => post({ type: 'events', json: JSON.stringify(events) }),
      (record) => {
        post({ type: 'step', record });
        if (core) hooks.afterStep?.(core, record);
      },
    );
    const engine = core;
    port.on('message', (m: ToWorker) => {
      if (m.type === 'submit') engine.scheduler.submit(m.request);
      else if (m.type === 'cancel') engine.scheduler.cancel(m.id);
      else if (m.type === 'stop') engine.scheduler.stop();
    });
    hooks.loaded?.(engine);
    post({ type: 'ready', info: engine.info });
    await engine.scheduler.run();
    await engine.release();
    port.close();
  } catch (err) {
    post({ type: 'fatal', message: (err as Error).message, option: err instanceof EngineOptionError ? err.option : undefined });
    port.close();
  }
}
