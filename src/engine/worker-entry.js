// Worker threads on Node 20 do not apply the parent's --import loaders to their entry module, so the
// engine worker registers tsx itself before loading its TypeScript.
import { register } from 'tsx/esm/api';

register();
await import('./worker.ts');
