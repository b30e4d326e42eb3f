import { parentPort, workerData } from 'node:worker_threads';
import { createEngine } from './engine.ts';
import type { EngineOptions } from './engine-options.ts';
import type { GenerationRequest, RequestEvent, StepRecord } from './scheduler.ts';

export type ToWorker = { type: 'submit'; request: GenerationRequest } | { type: 'cancel'; id: string } | { type: 'stop' };
export type FromWorker =
  | { type: 'ready'; info: import('./engine.ts').EngineInfo }
  | { type: 'events'; events: RequestEvent[] }
  | { type: 'step'; record: StepRecord }
  | { type: 'fatal'; message: string };

const port = parentPort!;
const post = (m: FromWorker) => port.postMessage(m);

try {
  const engine = await createEngine(
    workerData as EngineOptions,
    (events) => post({ type: 'events', events }),
    (record) => post({ type: 'step', record }),
  );
  port.on('message', (m: ToWorker) => {
    if (m.type === 'submit') engine.scheduler.submit(m.request);
    else if (m.type === 'cancel') engine.scheduler.cancel(m.id);
    else if (m.type === 'stop') engine.scheduler.stop();
  });
  post({ type: 'ready', info: engine.info });
  await engine.scheduler.run();
  await engine.release();
  port.close();
} catch (err) {
  post({ type: 'fatal', message: (err as Error).message });
  port.close();
}
