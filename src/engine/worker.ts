import { parentPort, workerData } from 'node:worker_threads';
import { createEngine } from './engine.ts';
import type { EngineOptions } from './engine-options.ts';
import type { GenerationRequest, StepRecord } from './scheduler.ts';

/**
 * Faults tests inject: `exit` ends the worker thread with code 1, `throw` raises an uncaught exception in it
 * (both at a step boundary, never during a forward pass), `forward-error` makes the next forward pass fail
 * as an ONNX Runtime error does.
 */
export type WorkerFault = 'exit' | 'throw' | 'forward-error';

export type ToWorker =
  | { type: 'submit'; request: GenerationRequest }
  | { type: 'cancel'; id: string }
  | { type: 'stop' }
  | { type: 'fault'; fault: WorkerFault };
export type FromWorker =
  | { type: 'ready'; info: import('./engine.ts').EngineInfo }
  /** JSON of RequestEvent[]: a string crosses threads as one copy, many small objects clone slowly. */
  | { type: 'events'; json: string }
  | { type: 'step'; record: StepRecord }
  | { type: 'fatal'; message: string };

const port = parentPort!;
const post = (m: FromWorker) => port.postMessage(m);

let crash: WorkerFault | undefined;
const crashNow = (fault: WorkerFault): void => {
  if (fault === 'exit') process.exit(1);
  // Thrown from a task of its own, so that nothing catches it: the worker dies as on a bug.
  setImmediate(() => {
    throw new Error('injected worker crash');
  });
};

try {
  const engine = await createEngine(
    workerData as EngineOptions,
    (events) => post({ type: 'events', json: JSON.stringify(events) }),
    (record) => {
      post({ type: 'step', record });
      // The end of a step: no forward pass is running.
      if (crash) crashNow(crash);
    },
  );
  port.on('message', (m: ToWorker) => {
    if (m.type === 'submit') engine.scheduler.submit(m.request);
    else if (m.type === 'cancel') engine.scheduler.cancel(m.id);
    else if (m.type === 'stop') engine.scheduler.stop();
    else if (m.type === 'fault') {
      if (m.fault === 'forward-error') return engine.scheduler.injectForwardError('injected ONNX Runtime error');
      const { running, waiting } = engine.scheduler.counts();
      // Idle, no forward pass can be running; else at the end of the current step.
      if (running === 0 && waiting === 0) crashNow(m.fault);
      else crash = m.fault;
    }
  });
  post({ type: 'ready', info: engine.info });
  await engine.scheduler.run();
  await engine.release();
  port.close();
} catch (err) {
  post({ type: 'fatal', message: (err as Error).message });
  port.close();
}
