import type { Express } from 'express';
import { MAX_TOP_LOGPROBS } from '../engine/protocol.ts';
import type { Logger } from 'pino';
import type { EngineHandle } from '../engine/client/engine-handle.ts';
import type { ModelFolder } from '../model/folder.ts';
import type { TextTokenizer } from '../model/tokenizer.ts';
import type { RequestMeter } from '../meter/types.ts';
import type { ChatTemplate } from './chat-template.ts';
import type { TokenText } from './logprobs.ts';
import type { Schemas } from './schemas.ts';
import type { ToolCallParserName } from './tool-calls.ts';
import type { KeyStore } from './api-keys.ts';
import type { TenantLimiter } from './tenant-limits.ts';

export interface ServerLimits {
  /** Choices that may wait beyond the engine's maxNumSeqs before requests get 429. */
  maxQueue: number;
  /** A generation running longer is cancelled and answered 504 (or ended with an SSE error); 0 = no limit. */
  requestTimeoutMs: number;
  maxBodyBytes: number;
  /**
   * A stream whose client stops reading: events that the socket does not take are held up to streamBufferBytes;
   * past it, or when the socket takes nothing for this long, the generation is cancelled and the connection closed.
   */
  streamStallTimeoutMs: number;
  /** Default max_tokens when a request gives none (completions: 16, chat: the rest of the context). */
  maxTokensDefault?: number;
  /** Default: API_LIMIT_DEFAULTS (also for the three below). */
  maxN?: number;
  maxStop?: number;
  /** At most MAX_TOP_LOGPROBS (the sampler's limit). */
  maxLogprobs?: number;
  streamBufferBytes?: number;
  /**
   * Longer prompts (characters, each string of a request) are refused before they are tokenized, which
   * runs on the main thread. Default: maxModelLen × the longest vocabulary piece × 4, more than any prompt
   * that fits the context can have.
   */
  maxPromptChars?: number;
}

/** Limits of the API that no flag sets. */
export const API_LIMIT_DEFAULTS = { maxN: 16, maxStop: 16, maxLogprobs: MAX_TOP_LOGPROBS, streamBufferBytes: 256 * 1024 };

export type ResolvedLimits = ServerLimits & typeof API_LIMIT_DEFAULTS & { maxPromptChars: number };

export interface ServerContext {
  engine: EngineHandle;
  tokenizer: TextTokenizer;
  folder: ModelFolder;
  /** The served model id (the folder name by default). */
  modelName: string;
  meter: RequestMeter;
  logger: Logger;
  /** Plain keys, key → tenant name; undefined or empty (and no `keys`): authentication off. */
  apiKeys?: Map<string, string>;
  /** Hashed keys with tenant limits (a keys file); when given, `apiKeys` is ignored. */
  keys?: KeyStore;
  /** Per-tenant rate limits and budgets; default: from `keys`' policies, spend counted from zero. */
  tenantLimiter?: TenantLimiter;
  limits: ServerLimits;
  /** How tool calls are read from the output; undefined: chosen from the chat template. */
  toolCallParser?: ToolCallParserName;
  /** The server's drain switch (see ServerLifecycle); default: a new one, never draining. */
  lifecycle?: ServerLifecycle;
  /** Mounts more routes (metrics, cost, dashboard) after the API's and before the 404 handler. */
  mount?: (app: Express) => void;
}

/** While draining, /health answers 503 and new generations are refused. */
export class ServerLifecycle {
  draining = false;
}

/** What the route handlers share. */
export interface ServerState {
  ctx: ServerContext & { limits: ResolvedLimits };
  schemas: Schemas;
  chatTemplate?: ChatTemplate;
  toolCallParser: ToolCallParserName;
  tokenText: TokenText;
  /** Unix seconds when the app was created (the model's `created`). */
  created: number;
  lifecycle: ServerLifecycle;
  limiter: TenantLimiter;
}

/** Per-request values kept on res.locals for the log line and the meter. */
export interface RequestLocals {
  requestId: string;
  /** Date.now() when the request arrived. */
  arrivalMs: number;
  tenant: string;
  promptTokens?: number;
  completionTokens?: number;
  /** Set once the request reached the engine; errors before that count as rejections. */
  submitted?: boolean;
}
