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

/** What opening a sequence on a prompt would take from a prefix cache now. */
export interface PrefixPlan {
  /** Positions of the prompt whose keys and values would be reused (at most its length − 1). */
  cachedTokens: number;
  /** Positions in the pages it would share (its own pages hold the rest, a copied page included). */
  sharedTokens: number;
  /** Of those, positions in pages that no sequence holds now (cached, evictable until taken). */
  revivedTokens: number;
}

/**
 * Automatic prefix caching over a paged KV cache (PageTable implements it). For KV admission a page counts once:
 * while the sequence that wrote it runs, in that sequence's own worst case; after, while others hold it, in
 * inheritedTokens(); while no one holds it, as free.
 */
export interface PrefixCache {
  plan(prompt: readonly number[]): PrefixPlan;
  /**
   * Right after open(seq): takes the cached pages of the prompt's prefix, as plan() said, and returns the
   * positions they hold (the sequence's cached length now; the caller runs the prompt from there).
   */
  attach(seq: number, prompt: readonly number[]): number;
  /** Positions in pages that open sequences hold and none of them wrote. */
  inheritedTokens(): number;
  /** Positions held by open sequences, a shared page counted once. */
  heldTokens(): number;
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
  /**
   * Rows of different lengths in one pass cost only their own tokens (no padding to the longest): the scheduler
   * runs decode rows and prompt chunks as one pass. Runners without it pad every row to the longest.
   */
  readonly packedRows?: boolean;
  /** Present where the runner reuses cached prompt prefixes (the paged runner, unless turned off). */
  readonly prefixCache?: PrefixCache;
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
