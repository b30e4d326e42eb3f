/** Shapes shared by the benchmark's modules. Times are milliseconds unless a name says otherwise. */

/**
 * Why a request failed:
 *   connection     — no response: refused, reset or unreachable before the status line
 *   timeout        — --timeout passed before the stream ended
 *   http_429       — the server answered 429 (rate limited / overloaded)
 *   http_4xx       — another 4xx status
 *   http_5xx       — a 5xx status
 *   bad_response   — status 200 but not an OpenAI SSE stream (HTML, a non-streamed body, malformed events)
 *   stream_error   — the stream carried an error object
 *   stream_dropped — the connection closed mid-stream, before [DONE] or a finish_reason
 */
export const ERROR_KINDS = ['connection', 'timeout', 'http_429', 'http_4xx', 'http_5xx', 'bad_response', 'stream_error', 'stream_dropped'] as const;
export type ErrorKind = (typeof ERROR_KINDS)[number];

/** Device-seconds a server metered for one request (Tally's usage.cost). */
export interface ServerCost {
  prefill: number;
  decode: number;
  /** The devices the server counted into its device-seconds (usage.cost.devices, else 1). */
  devices: number;
}

/** One request as the client saw it. */
export interface RequestRecord {
  ok: boolean;
  error?: { kind: ErrorKind; message: string; status?: number };
  /** Send time, ms after the load point's start. */
  startMs: number;
  /** Time to the first chunk carrying generated text. */
  ttftMs?: number;
  /** Time to the last chunk carrying generated text. */
  lastTokenMs?: number;
  /** Gaps between successive chunks carrying generated text. */
  itlMs: number[];
  /** Time to the end of the response. */
  e2eMs?: number;
  /** The server's usage.prompt_tokens, else the planned length when the bench built the prompt to it. */
  promptTokens?: number;
  /**
   * The server's usage.completion_tokens, else the generated text's tokens by the bench's tokenizer,
   * else the number of chunks carrying generated text.
   */
  completionTokens?: number;
  tokensFrom: 'usage' | 'tokenizer' | 'counted';
  /** max_tokens when the bench asked for exactly that many (ignore_eos + min_tokens). */
  plannedOutput?: number;
  /** Sends on a fresh connection after a reused one closed before any response byte. */
  retries?: number;
  /** The generated text, kept only until its tokens are counted. */
  text?: string;
  /** The server's usage.prompt_tokens_details.cached_tokens (prefix-cache hits), where it reports them. */
  cachedTokens?: number;
  /** Chunks that carried generated text. */
  contentChunks: number;
  serverCost?: ServerCost;
}

/** What the bench sends for one request. */
export interface RequestSpec {
  endpoint: 'completions' | 'chat';
  body: Record<string, unknown>;
  /** Prompt tokens when the bench built the prompt to an exact length. */
  plannedInput?: number;
  plannedOutput?: number;
}

export type LoadMode = 'concurrency' | 'rate';

export interface LoadPointSpec {
  mode: LoadMode;
  /** Concurrency, or requests per second (Infinity: all at once). */
  value: number;
}
