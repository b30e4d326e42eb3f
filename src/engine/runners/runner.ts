import type { KvCacheDtype, RunnerKind } from '../protocol.ts';

/** One row of a forward pass: a sequence and the new tokens appended at its cached length. */
export interface ForwardRow {
  seq: number;
  tokens: number[];
}

/** The largest logits of a row, largest first (ties: lower id first). */
export interface TopLogits {
  ids: number[];
  values: number[];
}

export interface ForwardResult {
  /** Last-token logits of each row, in the order given. */
  logits: Float32Array[];
  /** Wall time of the forward pass, seconds, measured once the device has finished it. */
  runSeconds: number;
}

/**
 * Runs forward passes over a batch of sequences and keeps their KV cache, wherever that lives. The scheduler
 * drives it; loading (sessions, devices) is load.ts's business.
 */
export interface ModelRunner {
  readonly kind: RunnerKind;
  readonly vocabSize: number;
  open(seq: number): void;
  close(seq: number): void;
  cachedLength(seq: number): number;
  forward(rows: ForwardRow[]): Promise<ForwardResult>;
  /** The most top logits per row forwardTop returns (0: the runner has no forwardTop). */
  readonly topLogits: number;
  /**
   * As forward, but returns only each row's `k` largest logits (no copy of the full rows); k defaults to, and is
   * at most, topLogits. Graphs before version 8 return topLogits whatever k.
   */
  forwardTop?(rows: ForwardRow[], k?: number): Promise<{ top: TopLogits[]; runSeconds: number }>;
  /** Bytes of KV-cache memory held now. */
  kvBytes(): number;
  /** 4 for a float32 cache, 2 for float16. */
  readonly kvElementBytes: number;
  release(): Promise<void>;
}

/** The element type of a runner's KV cache. */
export function kvCacheDtypeOf(runner: ModelRunner): KvCacheDtype {
  return runner.kvElementBytes === 2 ? 'float16' : 'float32';
}
