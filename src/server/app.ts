/**
 * The OpenAI-compatible HTTP API as an express app: routes, body parsing, authentication, request logs and the
 * error handler that turns every failure into OpenAI's error body. It is handed a running engine (start.ts
 * starts one); respond.ts answers the generation routes.
 */
import { randomUUID } from 'node:crypto';
import express, { type Express, type NextFunction, type Request, type Response } from 'express';
import { KeyStore } from './api-keys.ts';
import { ANONYMOUS, authenticate } from './auth.ts';
import { chatHandler } from './chat.ts';
import { ChatTemplate } from './chat-template.ts';
import { completionsHandler } from './completions.ts';
import { API_LIMIT_DEFAULTS, type RequestLocals, type ServerContext, ServerLifecycle, type ServerState } from './context.ts';
import { ApiError, badRequest, fromBodyParser, serverError } from './errors.ts';
import { TokenText } from './logprobs.ts';
import { makeSchemas } from './schemas.ts';
import { checkCapacity } from './respond.ts';
import { TenantLimiter } from './tenant-limits.ts';
import { precisionOf } from '../model/quant.ts';
import { detokenizeHandler, tokenizeHandler } from './tokenize.ts';
import { parserForTemplate } from './tool-calls.ts';

export { ServerLifecycle, type ServerContext, type ServerLimits } from './context.ts';
/** Deeper JSON bodies are refused (templates and validators recurse). */
const MAX_JSON_DEPTH = 64;

const GENERATION_PATHS = new Set(['/v1/completions', '/v1/chat/completions']);

/** Known routes and their methods, for 405 with Allow. */
const ROUTES: Record<string, string> = {
  '/health': 'GET',
  '/v1/models': 'GET',
  '/v1/models/:model': 'GET',
  '/v1/completions': 'POST',
  '/v1/chat/completions': 'POST',
  '/tokenize': 'POST',
  '/detokenize': 'POST',
};

/** express.json's verify hook: the raw body must be valid UTF-8 (the parser would replace bad bytes silently). */
function verifyUtf8(_req: unknown, _res: unknown, buf: Buffer): void {
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(buf);
  } catch {
    throw Object.assign(new Error('invalid UTF-8'), { status: 400, type: 'encoding.invalid_utf8' });
  }
}

/**
 * What is wrong with the shape of a parsed body, if anything: nesting deeper than `depthLimit` or an array
 * longer than `arrayLimit` (more than any valid field can hold; validating it would cost the main thread).
 */
function shapeProblem(value: unknown, depthLimit: number, arrayLimit: number): string | undefined {
  const stack: [object, number][] = typeof value === 'object' && value !== null ? [[value, 1]] : [];
  while (stack.length > 0) {
    const [v, depth] = stack.pop()!;
    if (depth > depthLimit) return `The JSON body nests deeper than ${depthLimit} levels.`;
    const children = Array.isArray(v) ? v : Object.values(v);
    if (Array.isArray(v) && v.length > arrayLimit) return `The JSON body holds an array of ${v.length} elements; at most ${arrayLimit} are accepted.`;
    for (const child of children) if (typeof child === 'object' && child !== null) stack.push([child, depth + 1]);
  }
  return undefined;
}

/** Request id, arrival time, and one log line per request when it ends. */
function requestLog(ctx: ServerContext) {
  return (req: Request, res: Response, next: NextFunction): void => {
    const locals = res.locals as RequestLocals;
    locals.requestId = randomUUID().replaceAll('-', '');
    locals.arrivalMs = Date.now();
    locals.tenant = ANONYMOUS;
    res.set('x-request-id', locals.requestId);
    const { method, path } = req;
    res.once('close', () => {
      const line = {
        requestId: locals.requestId,
        method,
        path,
        status: res.statusCode,
        tenant: locals.tenant,
        promptTokens: locals.promptTokens,
        completionTokens: locals.completionTokens,
        latencyMs: Date.now() - locals.arrivalMs,
        ...(res.writableFinished ? {} : { aborted: true }),
      };
      if (res.statusCode >= 500) ctx.logger.warn(line, 'request');
      else ctx.logger.info(line, 'request');
    });
    next();
  };
}

/** The model's chat template; one that does not parse is logged, and chat then answers 400. */
function loadChatTemplate(ctx: ServerContext): ChatTemplate | undefined {
  try {
    return ChatTemplate.fromFolder(ctx.folder, ctx.tokenizer);
  } catch (err) {
    ctx.logger.error({ err }, 'the chat template in tokenizer_config.json does not parse; chat completions are off');
    return undefined;
  }
}

/** More characters than any prompt that fits the context can have (see ServerLimits.maxPromptChars). */
function defaultMaxPromptChars(ctx: ServerContext): number {
  let longest = 1;
  for (let id = 0; id < ctx.tokenizer.vocabSize; id++) longest = Math.max(longest, ctx.tokenizer.idToToken(id)?.length ?? 0);
  return ctx.engine.info.limits.maxModelLen * longest * 4;
}

export function createApp(context: ServerContext): Express {
  const limits = { ...API_LIMIT_DEFAULTS, ...context.limits };
  limits.maxLogprobs = Math.min(limits.maxLogprobs, API_LIMIT_DEFAULTS.maxLogprobs);
  const ctx = { ...context, limits: { ...limits, maxPromptChars: limits.maxPromptChars ?? defaultMaxPromptChars(context) } };
  const keys = ctx.keys ?? new KeyStore(ctx.apiKeys);
  const chatTemplate = loadChatTemplate(ctx);
  const state: ServerState = {
    ctx,
    schemas: makeSchemas(ctx.limits),
    chatTemplate,
    toolCallParser: ctx.toolCallParser ?? parserForTemplate(chatTemplate?.source),
    tokenText: new TokenText(ctx.tokenizer),
    created: Math.floor(Date.now() / 1000),
    lifecycle: ctx.lifecycle ?? new ServerLifecycle(),
    limiter: ctx.tenantLimiter ?? new TenantLimiter((tenant) => keys.policy(tenant)),
  };
  const app = express();
  app.disable('x-powered-by');
  app.set('etag', false);

  app.use(requestLog(ctx));
  app.get('/health', (_req, res) => {
    if (state.lifecycle.draining) res.status(503).json({ status: 'draining' });
    else res.json({ status: 'ok' });
  });
  app.use(['/v1', '/tokenize', '/detokenize'], authenticate(keys));
  // Under overload, refuse generations before reading and tokenizing their bodies.
  app.use((req, _res, next) => {
    if (req.method === 'POST' && GENERATION_PATHS.has(req.path)) checkCapacity(state, 1);
    next();
  });
  app.use(express.json({ limit: ctx.limits.maxBodyBytes, type: () => true, verify: verifyUtf8 }));
  const { maxModelLen } = ctx.engine.info.limits;
  const arrayLimit = Math.max(2 * maxModelLen, 2 * (ctx.engine.info.limits.maxNumSeqs + ctx.limits.maxQueue), 4096);
  app.use((req, _res, next) => {
    const problem = shapeProblem(req.body, MAX_JSON_DEPTH, arrayLimit);
    if (problem) throw badRequest(problem, null, 'invalid_body');
    next();
  });

  const model = () => ({
    id: ctx.modelName,
    object: 'model',
    created: state.created,
    owned_by: 'tally',
    root: ctx.modelName,
    max_model_len: ctx.engine.info.limits.maxModelLen,
    precision: precisionOf(ctx.folder.config),
  });
  app.get('/v1/models', (_req, res) => {
    res.json({ object: 'list', data: [model()] });
  });
  app.get('/v1/models/:model', (req, res) => {
    if (req.params.model !== ctx.modelName) {
      throw new ApiError(404, `The model \`${req.params.model}\` does not exist.`, 'invalid_request_error', 'model', 'model_not_found');
    }
    res.json(model());
  });
  app.post('/v1/completions', completionsHandler(state));
  app.post('/v1/chat/completions', chatHandler(state));
  app.post('/tokenize', tokenizeHandler(state));
  app.post('/detokenize', detokenizeHandler(state));
  for (const [path, allow] of Object.entries(ROUTES)) {
    app.all(path, (req, res) => {
      res.set('Allow', allow);
      throw new ApiError(405, `Method ${req.method} is not allowed on ${req.path}; use ${allow}.`, 'invalid_request_error', null, 'method_not_allowed');
    });
  }

  ctx.mount?.(app);

  app.use((req: Request) => {
    throw new ApiError(404, `Invalid URL (${req.method} ${req.path})`, 'invalid_request_error', null, 'unknown_url');
  });
  app.use((err: unknown, req: Request, res: Response, _next: NextFunction) => {
    const locals = res.locals as RequestLocals;
    let error = err instanceof ApiError ? err : fromBodyParser(err as Record<string, never>);
    if (!error) {
      ctx.logger.error({ err, requestId: locals.requestId, path: req.path }, 'unhandled error');
      error = serverError('The server had an error while processing your request.');
    }
    if (!locals.submitted && GENERATION_PATHS.has(req.path)) {
      try {
        ctx.meter.requestRejected(ctx.modelName, locals.tenant ?? ANONYMOUS, error.status);
      } catch (meterErr) {
        ctx.logger.error({ err: meterErr }, 'the meter failed to count a rejection');
      }
    }
    if (res.headersSent) {
      // Mid-stream: an SSE error event, else nothing more can be said.
      if (String(res.getHeader('content-type')).startsWith('text/event-stream') && !res.writableEnded) {
        res.write(`data: ${JSON.stringify(error.body())}\n\ndata: [DONE]\n\n`);
        res.end();
      } else if (!res.writableEnded) {
        res.destroy();
      }
      return;
    }
    res.status(error.status).set(error.headers).json(error.body());
  });
  return app;
}
