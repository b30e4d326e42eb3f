// The engine worker's entry module. Worker threads on Node 20 do not apply the parent's --import loaders to
// their entry module, so it registers tsx itself before loading the TypeScript.
import { parentPort, workerData } from 'node:worker_threads';
import { register } from 'tsx/esm/api';

register();
const { serveEngine } = await import('./worker.ts');
await serveEngine(parentPort, workerData);
