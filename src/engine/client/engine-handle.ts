import type { EventEmitter } from 'node:events';
import type { EngineInfo, GenerationRequest, RequestEvent, StepRecord } from '../protocol.ts';

/**
 * The main thread's handle on the engine, which runs in worker threads: one worker (EngineClient) or one per
 * device (EnginePool). The server sees only this.
 */
export interface EngineHandle extends EventEmitter<{ step: [StepRecord]; restart: [string] }> {
  readonly info: EngineInfo;
  /** Worker restarts since start. */
  readonly restarts: number;
  readonly inFlight: number;
  /** false while a worker is restarting and cannot take requests. */
  readonly available: boolean;
  submit(request: GenerationRequest, listener: (event: RequestEvent) => void): void;
  cancel(id: string): void;
  cancelAll(): void;
  close(): Promise<void>;
}
