/**
 * What crosses the boundary between the main thread (server, client/) and the engine worker (core/, runners/):
 * requests, the events that answer them, per-step records for the meter, the engine's description and the
 * options the worker starts with. Everything here is plain data (structured-clone safe; EngineOptionError travels
 * as its message and option) and this module imports
 * nothing, so either side, the meter and telemetry can depend on it without reaching into the engine.
 */

/** The most top logprobs the sampler returns per token. */
export const MAX_TOP_LOGPROBS = 20;

export interface SamplingParams {
  /** 0 = greedy (argmax). */
  temperature: number;
  /** 1 = off. */
  topP: number;
  /** 0 or -1 = off. */
  topK: number;
  /** 0 = off (vLLM semantics: drop tokens with prob < minP * maxProb). */
  minP: number;
  /** 1 = off (vLLM/HF semantics: over prompt AND generated tokens; logit > 0 → /p, else *p). */
  repetitionPenalty: number;
  /** 0 = off (OpenAI semantics: over generated tokens only, subtracted once if count > 0). */
  presencePenalty: number;
  /** 0 = off (subtracts count * penalty, generated tokens only). */
  frequencyPenalty: number;
  /** Same seed + same logits sequence ⇒ same tokens; no seed ⇒ a random seed. */
  seed?: number;
  /** undefined = none; 0 = the chosen token's logprob only; N ≤ MAX_TOP_LOGPROBS = also the top N. */
  logprobs?: number;
}

/**
 * A grammar node of a constrained output (structured output, forced tool calls), in a flat array so that
 * references (recursive schemas) are indices. `literal` is raw text (alternatives), not JSON-quoted.
 */
export type GrammarNode =
  | { kind: 'any' }
  | { kind: 'literal'; values: string[] }
  | { kind: 'string'; minLength: number; maxLength: number | null }
  | { kind: 'number'; integer: boolean }
  /** Declared properties in this order (required ones always written); with no properties, `additional` (a node) is the schema of free keys' values. */
  | { kind: 'object'; properties: { name: string; value: number; required: boolean }[]; additional: number | null }
  | { kind: 'array'; items: number; minItems: number; maxItems: number | null }
  | { kind: 'anyOf'; options: number[] }
  | { kind: 'seq'; items: number[] };

/** What a constrained request's output must be: the text of `nodes[root]`, closed within max_tokens. */
export interface OutputConstraint {
  nodes: GrammarNode[];
  root: number;
}

export interface GenerationRequest {
  id: string;
  promptIds: number[];
  maxTokens: number;
  minTokens: number;
  ignoreEos: boolean;
  stop: string[];
  stopTokenIds: number[];
  sampling: SamplingParams;
  /** Only tokens that keep the output a prefix of this grammar are sampled; it ends when the grammar closes. */
  constraint?: OutputConstraint;
}

export type FinishReason = 'stop' | 'length' | 'cancelled' | 'error';

export interface GeneratedToken {
  id: number;
  logprob?: number;
  topLogprobs?: { token: number; logprob: number }[];
}

export interface RequestCost {
  prefillSeconds: number;
  decodeSeconds: number;
}

export interface RequestEvent {
  id: string;
  tokens: GeneratedToken[];
  text: string;
  finish?: FinishReason;
  /** The stop string or token id that ended it. */
  stoppedBy?: string | number;
  error?: string;
  promptTokens?: number;
  completionTokens?: number;
  cost?: RequestCost;
  /** Prompt tokens whose keys and values came from the prefix cache (not computed), on the final event. */
  cachedTokens?: number;
  /** Seconds from admission to the first token, set on the event that carries it. */
  queueSeconds?: number;
}

export interface StepRecord {
  /** performance.timeOrigin-based start and end of the step, ms. */
  startMs: number;
  endMs: number;
  /** Summed forward-pass wall time of the step, seconds. */
  busySeconds: number;
  prefillSeconds: number;
  decodeSeconds: number;
  prefillTokens: number;
  decodeTokens: number;
  /** Prompt tokens of the requests admitted in this step, and how many of them the prefix cache held. */
  admittedPromptTokens?: number;
  admittedCachedTokens?: number;
  running: number;
  waiting: number;
  kvUsedTokens: number;
  kvCapacityTokens: number;
  kvBytes: number;
  /** Set by an EnginePool: which device ran the step. */
  device?: string;
}

export interface SchedulerLimits {
  maxNumSeqs: number;
  maxNumBatchedTokens: number;
  maxModelLen: number;
  /** Total tokens (prompt + max new tokens) that admitted requests may reserve in the KV cache. */
  kvCapacityTokens: number;
}

export type KvCacheDtype = 'float32' | 'float16';

/**
 * slot: a Tally graph with attention inside it; paged: a Tally graph cut at attention (native attention), driven
 * from JavaScript; native: the same, each forward pass run whole in native code (native/ort); gqa: the whole model
 * on ONNX Runtime's GroupQueryAttention with its KV cache where the session runs (native/ort; the CUDA path);
 * plain: an Optimum export.
 */
export type RunnerKind = 'slot' | 'paged' | 'native' | 'gqa' | 'plain';

/**
 * Who drives a forward pass: native code through ONNX Runtime's C API, or JavaScript through onnxruntime-node on
 * the CPU; gqa: the GroupQueryAttention graph through the C API, its KV cache in the session's (device) memory.
 */
export type RunnerChoice = 'native' | 'js' | 'gqa';

export type DeviceSpec = { kind: 'cpu' } | { kind: 'cuda'; index: number } | { kind: 'auto' };

/** Where a Tally graph's attention runs on the CPU: native/attention over a paged cache, or inside the graph. */
export type AttentionMode = 'native' | 'onnx';

/** The engine's own defaults (the configuration's flags start from these). */
export const ENGINE_DEFAULTS = { maxNumSeqs: 64, maxNumBatchedTokens: 2048, kvCacheBytes: 4 * 2 ** 30 } as const;

/** What the engine worker is started with. */
export interface EngineOptions {
  modelDir: string;
  device: DeviceSpec;
  /** Intra-op threads; undefined: chosen from the model's size. */
  threads?: number;
  /** Let intra-op threads busy-wait between operators (default false). */
  spinWait?: boolean;
  /** undefined: native when the addon is built and the graph allows it. */
  attention?: AttentionMode;
  /** undefined: float16 with native attention, else the graph's own type. */
  kvCacheDtype?: KvCacheDtype;
  /** undefined: native where its addon is built and the graph allows it, else js. */
  runner?: RunnerChoice;
  /** The ONNX Runtime library the native runner opens; undefined: TALLY_ORT_LIBRARY, else onnxruntime-node's. */
  ortLibrary?: string;
  maxNumSeqs: number;
  maxNumBatchedTokens: number;
  /** undefined: the model's max_position_embeddings. */
  maxModelLen?: number;
  /** KV capacity in tokens; undefined: what fits in kvCacheBytes. */
  kvCacheTokens?: number;
  kvCacheBytes: number;
  /** Automatic prefix caching on the paged KV cache; undefined: on. */
  prefixCache?: boolean;
}

export interface EngineInfo {
  model: string;
  modelDir: string;
  device: string;
  deviceNote?: string;
  runner: RunnerKind;
  /** Intra-op threads on the CPU. */
  threads: number;
  kvCacheDtype: KvCacheDtype;
  /** Whether prompts reuse cached prefixes (the paged runner with prefix caching on). */
  prefixCache: boolean;
  limits: SchedulerLimits;
  eosIds: number[];
  vocabSize: number;
}

export type ToWorker =
  | { type: 'submit'; request: GenerationRequest }
  | { type: 'cancel'; id: string }
  | { type: 'stop' };

/**
 * An engine option that cannot work with this model or machine. The message does not name how the option was
 * given: the configuration layer, which knows its flag or variable, says that.
 */
export class EngineOptionError extends Error {
  constructor(readonly option: keyof EngineOptions, message: string) {
    super(message);
    this.name = 'EngineOptionError';
  }
}

export type FromWorker =
  | { type: 'ready'; info: EngineInfo }
  /** JSON of RequestEvent[]: a string crosses threads as one copy, many small objects clone slowly. */
  | { type: 'events'; json: string }
  | { type: 'step'; record: StepRecord }
  | { type: 'fatal'; message: string; option?: keyof EngineOptions };
