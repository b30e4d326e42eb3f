/**
 * A stand-in OpenAI-compatible server with known, fixed timings, for testing `tally bench`: on
 * 127.0.0.1:0 it streams POST /v1/completions and /v1/chat/completions as SSE, the first token
 * `ttftMs` after the request arrives and one more every `itlMs` (scheduled from the arrival, so timer
 * lateness does not accumulate), max_tokens tokens in all, usage in a last chunk when asked. Modes
 * make a request misbehave: refuse it (reset the connection), answer HTML, 429 or 500, drop the
 * connection mid-stream, send an error event or a non-JSON event, or never answer.
 */
import http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';

export type StandInMode = 'ok' | 'html' | '429' | '500' | 'drop' | 'error-event' | 'garbage' | 'hang' | 'reset';

export interface StandInOptions {
  ttftMs?: number;
  itlMs?: number;
  model?: string;
  /** Behaviour of each generation request, by arrival order (0-based) and body; default 'ok'. */
  mode?: StandInMode | ((index: number, body: Record<string, unknown>) => StandInMode);
  /** 'drop': content chunks sent before the connection is destroyed (default 3). */
  dropAfter?: number;
  /** Serve /tokenize (one token per whitespace-separated word; default true). */
  tokenize?: boolean;
  /** Answer 400 to a request carrying any of these fields (as OpenAI does to vLLM extensions). */
  rejectParams?: string[];
  /** Answer 400 to a prompt of token ids. */
  rejectIdPrompts?: boolean;
  /** Honour stream_options.include_usage (default true; false: never send usage). */
  usage?: boolean;
  /** Report Tally-like usage.cost with device-seconds per prompt and per completion token. */
  cost?: { prefillPerToken: number; decodePerToken: number };
}

export interface StandInRequest {
  path: string;
  body: Record<string, unknown>;
  mode: StandInMode;
}

export interface StandIn {
  url: string;
  /** Generation requests, in arrival order. */
  requests: StandInRequest[];
  close(): Promise<void>;
}

const wordId = (w: string) => [...w].reduce((a, c) => (a * 31 + c.charCodeAt(0)) % 997, 7);

function json(res: http.ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

export async function startStandIn(options: StandInOptions = {}): Promise<StandIn> {
  const ttft = options.ttftMs ?? 50;
  const itl = options.itlMs ?? 10;
  const model = options.model ?? 'stand-in';
  const requests: StandInRequest[] = [];
  const sockets = new Set<Socket>();
  const timers = new Set<NodeJS.Timeout>();
  let generations = 0;

  // Never early: a timer can fire up to ~2 ms before its delay by the clock (libuv's loop time lags, whole ms).
  const at = (ms: number, fn: () => void) => {
    const t = setTimeout(() => {
      timers.delete(t);
      if (performance.now() < ms) at(ms, fn);
      else fn();
    }, Math.max(0, Math.ceil(ms - performance.now())));
    timers.add(t);
  };

  const server = http.createServer((req, res) => {
    let raw = '';
    req.setEncoding('utf8');
    req.on('data', (c: string) => (raw += c));
    req.on('end', () => {
      const arrival = performance.now();
      let body: Record<string, unknown> = {};
      try {
        body = raw ? (JSON.parse(raw) as Record<string, unknown>) : {};
      } catch {
        return json(res, 400, { error: { message: 'bad JSON', type: 'invalid_request_error' } });
      }
      const path = req.url ?? '';
      if (req.method === 'GET' && path === '/v1/models') return json(res, 200, { object: 'list', data: [{ id: model, object: 'model' }] });
      if (req.method === 'POST' && path === '/tokenize' && options.tokenize !== false) {
        const text = typeof body.prompt === 'string' ? body.prompt : '';
        const tokens = text.split(/\s+/).filter(Boolean).map(wordId);
        return json(res, 200, { tokens, count: tokens.length });
      }
      const chat = path === '/v1/chat/completions';
      if (req.method !== 'POST' || (path !== '/v1/completions' && !chat)) return json(res, 404, { error: { message: 'not found' } });

      const refused = options.rejectParams?.find((p) => p in body);
      if (refused) return json(res, 400, { error: { message: `Unrecognized request argument supplied: ${refused}`, type: 'invalid_request_error' } });
      if (options.rejectIdPrompts && Array.isArray(body.prompt)) return json(res, 400, { error: { message: 'prompt must be a string', type: 'invalid_request_error' } });
      const index = generations++;
      const mode = typeof options.mode === 'function' ? options.mode(index, body) : (options.mode ?? 'ok');
      requests.push({ path, body, mode });
      switch (mode) {
        case 'reset':
          req.socket.destroy();
          return;
        case 'hang':
          return;
        case 'html':
          res.writeHead(200, { 'content-type': 'text/html' });
          res.end('<!doctype html><html><body><h1>Welcome to nginx!</h1></body></html>');
          return;
        case '429':
          res.setHeader('retry-after', '1');
          return json(res, 429, { error: { message: 'Rate limit reached', type: 'rate_limit_exceeded' } });
        case '500':
          return json(res, 500, { error: { message: 'internal error', type: 'server_error' } });
      }

      const prompt = body.prompt;
      const promptTokens = Array.isArray(prompt) ? prompt.length : typeof prompt === 'string' ? prompt.split(/\s+/).filter(Boolean).length : JSON.stringify(body.messages ?? '').length;
      const maxTokens = typeof body.max_tokens === 'number' ? body.max_tokens : 16;
      const includeUsage = options.usage !== false && (body.stream_options as { include_usage?: boolean } | undefined)?.include_usage === true;
      const id = `cmpl-${index}`;
      const created = Math.floor(Date.now() / 1000);
      const chunk = (choices: unknown[], extra: Record<string, unknown> = {}) =>
        `data: ${JSON.stringify({ id, object: chat ? 'chat.completion.chunk' : 'text_completion', created, model, choices, ...extra })}\n\n`;
      const choice = (text: string, finish: string | null) => (chat ? { index: 0, delta: { content: text }, finish_reason: finish } : { index: 0, text, finish_reason: finish });

      res.socket?.setNoDelay(true);
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      res.flushHeaders();
      if (chat) res.write(chunk([{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }]));
      for (let k = 0; k < maxTokens; k++) {
        at(arrival + ttft + k * itl, () => {
          if (res.destroyed) return;
          if (mode === 'drop' && k === (options.dropAfter ?? 3)) {
            res.socket?.destroy();
            return;
          }
          if (mode === 'error-event' && k === 2) {
            res.end(`data: ${JSON.stringify({ error: { message: 'the engine failed', type: 'server_error' } })}\n\ndata: [DONE]\n\n`);
            return;
          }
          if (mode === 'garbage' && k === 1) {
            res.end('data: <<not json>>\n\n');
            return;
          }
          if (res.writableEnded) return;
          const last = k === maxTokens - 1;
          res.write(chunk([choice(` t${k}`, last ? 'length' : null)], includeUsage ? { usage: null } : {}));
          if (!last) return;
          if (includeUsage) {
            const usage: Record<string, unknown> = { prompt_tokens: promptTokens, completion_tokens: maxTokens, total_tokens: promptTokens + maxTokens };
            if (options.cost) usage.cost = { device_seconds: { prefill: promptTokens * options.cost.prefillPerToken, decode: maxTokens * options.cost.decodePerToken }, devices: 1 };
            res.write(chunk([], { usage }));
          }
          res.end('data: [DONE]\n\n');
        });
      }
    });
  });
  server.on('connection', (s) => {
    s.setNoDelay(true);
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    requests,
    async close() {
      for (const t of timers) clearTimeout(t);
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** A loopback URL on which nothing listens (a port bound and released). */
export async function refusedUrl(): Promise<string> {
  const server = http.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return `http://127.0.0.1:${port}`;
}
