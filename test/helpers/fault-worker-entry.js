// An engine worker that tests can break on purpose (see fault-worker.ts); production runs engine/core/worker-entry.js.
import { register } from 'tsx/esm/api';

register();
await import('./fault-worker.ts');
