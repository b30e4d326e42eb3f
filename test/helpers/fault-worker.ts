/**
 * The engine worker with faults that tests inject, over a BroadcastChannel (production code carries none of
 * this): `exit` ends the worker thread with code 1 and `throw` raises an uncaught exception in it (both at a
 * step boundary, never during a forward pass); `forward-error` makes the next forward pass fail as an ONNX
 * Runtime error does.
 */
import { BroadcastChannel, parentPort, workerData } from 'node:worker_threads';
import { serveEngine } from '../../src/engine/core/worker.ts';
import type { EngineCore } from '../../src/engine/core/engine-core.ts';
import type { EngineOptions } from '../../src/engine/protocol.ts';

export type WorkerFault = 'exit' | 'throw' | 'forward-error';

export const FAULT_CHANNEL = 'tally-test-engine-faults';

const crashNow = (fault: WorkerFault): void => {
  if (fault === 'exit') process.exit(1);
  // Thrown from a task of its own, so that nothing catches it: the worker dies as on a bug.
  setImmediate(() => {
    throw new Error('injected worker crash');
  });
};

function failNextForward(core: EngineCore): void {
  const { runner } = core;
  const real = { forward: runner.forward.bind(runner), forwardTop: runner.forwardTop?.bind(runner) };
  const restore = () => {
    runner.forward = real.forward;
    if (real.forwardTop) runner.forwardTop = real.forwardTop;
  };
  const fail = async (): Promise<never> => {
    restore();
    throw new Error('injected ONNX Runtime error');
  };
  runner.forward = fail;
  if (real.forwardTop) runner.forwardTop = fail;
}

if (parentPort) {
  let pending: WorkerFault | undefined;
  const channel = new BroadcastChannel(FAULT_CHANNEL);
  channel.unref();
  await serveEngine(parentPort, workerData as EngineOptions, {
    loaded(core) {
      channel.onmessage = (m) => {
        const fault = (m as { data: WorkerFault }).data;
        if (fault === 'forward-error') return failNextForward(core);
        const { running, waiting } = core.scheduler.counts();
        // Idle, no forward pass can be running; else at the end of the current step.
        if (running === 0 && waiting === 0) crashNow(fault);
        else pending = fault;
      };
    },
    afterStep() {
      if (pending) crashNow(pending);
    },
  });
  channel.close();
}
