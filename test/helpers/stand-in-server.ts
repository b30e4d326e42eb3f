/**
 * A stand-in OpenAI-compatible server with known, fixed timings, for testing `tally bench`: on
 * 127.0.0.1:0 it streams POST /v1/completions and /v1/chat/completions as SSE, the first token
 * `ttftMs` after the request arrives and one more every `itlMs` (scheduled from the arrival, so timer
 * lateness does not accumulate), max_tokens tokens in all, usage in a last chunk when asked. Modes
 * make a request misbehave: refuse it (reset the connection), answer HTML, 429 or 500, drop the
 * connection mid-stream, send an error event or a non-JSON event, or never answer.
 *
 * Other options model how real servers frame and end a stream: close the connection after every
 * response without saying so (llama.cpp's server), or with `Connection: close`, answer HTTP/1.0 (the
 * body ends when the connection does), send a `Content-Length` body instead of chunks, put SSE comments
 * between events, or stop before max_tokens whatever ignore_eos/min_tokens ask.
 */
import http from 'node:http';
import https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';

export type StandInMode = 'ok' | 'html' | '429' | '500' | 'drop' | 'error-event' | 'garbage' | 'hang' | 'reset';

export interface StandInOptions {
  ttftMs?: number;
  itlMs?: number;
  model?: string;
  /**
   * Behaviour of each generation request, by arrival order (0-based), body, and whether its connection
   * carried a request before (`reused`); default 'ok'.
   */
  mode?: StandInMode | ((index: number, body: Record<string, unknown>, connection: { reused: boolean }) => StandInMode);
  /**
   * After a streamed response: 'keep-alive' (default) keeps the connection; 'close' closes it without a
   * `Connection: close` header, as llama.cpp's server does; 'close-header' says `Connection: close` and
   * closes; 'http10' answers HTTP/1.0 with no length, the body ending when the connection closes.
   */
  connection?: 'keep-alive' | 'close' | 'close-header' | 'http10';
  /** 'content-length': the whole stream's length up front, no chunked encoding (events still come one by one). */
  framing?: 'chunked' | 'content-length';
  /** An SSE comment line (`: keep-alive`) before every event, and one more between tokens. */
  comments?: boolean;
  /** Stop after this many tokens (finish_reason "stop"), ignoring ignore_eos and min_tokens. */
  stopAfter?: number;
  /** Serve HTTPS with this key and certificate (PEM). */
  tls?: { key: string; cert: string };
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
  const served = new WeakMap<Socket, number>();

  // Never early: a timer can fire up to ~2 ms before its delay by the clock (libuv's loop time lags, whole ms).
  const at = (ms: number, fn: () => void) => {
    const t = setTimeout(() => {
      timers.delete(t);
      if (performance.now() < ms) at(ms, fn);
      else fn();
    }, Math.max(0, Math.ceil(ms - performance.now())));
    timers.add(t);
  };

  const handler = (req: http.IncomingMessage, res: http.ServerResponse) => {
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
      const reused = (served.get(req.socket) ?? 0) > 0;
      served.set(req.socket, (served.get(req.socket) ?? 0) + 1);
      const mode = typeof options.mode === 'function' ? options.mode(index, body, { reused }) : (options.mode ?? 'ok');
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

      // The whole response as timed pieces; the last one ends it (or, for 'drop', the connection is destroyed then).
      const pieces: { at: number; text: string }[] = [];
      const comment = options.comments ? ': keep-alive\n\n' : '';
      if (chat) pieces.push({ at: arrival, text: comment + chunk([{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }]) });
      const emitted = options.stopAfter === undefined ? maxTokens : Math.min(maxTokens, options.stopAfter);
      let dropAt: number | undefined;
      for (let k = 0; k < emitted; k++) {
        const when = arrival + ttft + k * itl;
        if (mode === 'drop' && k === (options.dropAfter ?? 3)) {
          dropAt = when;
          break;
        }
        if (mode === 'error-event' && k === 2) {
          pieces.push({ at: when, text: `data: ${JSON.stringify({ error: { message: 'the engine failed', type: 'server_error' } })}\n\ndata: [DONE]\n\n` });
          break;
        }
        if (mode === 'garbage' && k === 1) {
          pieces.push({ at: when, text: 'data: <<not json>>\n\n' });
          break;
        }
        if (comment && k > 0) pieces.push({ at: when - itl / 2, text: comment });
        const last = k === emitted - 1;
        let text = comment + chunk([choice(` t${k}`, last ? (emitted < maxTokens ? 'stop' : 'length') : null)], includeUsage ? { usage: null } : {});
        if (last) {
          if (includeUsage) {
            const usage: Record<string, unknown> = { prompt_tokens: promptTokens, completion_tokens: emitted, total_tokens: promptTokens + emitted };
            if (options.cost) usage.cost = { device_seconds: { prefill: promptTokens * options.cost.prefillPerToken, decode: emitted * options.cost.decodePerToken }, devices: 1 };
            text += chunk([], { usage });
          }
          text += 'data: [DONE]\n\n';
        }
        pieces.push({ at: when, text });
      }

      const connection = options.connection ?? 'keep-alive';
      const socket = req.socket;
      socket.setNoDelay(true);
      let write: (text: string) => void;
      let end: (text: string) => void;
      let gone: () => boolean;
      if (connection === 'http10') {
        socket.write('HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n');
        write = (t) => socket.write(t);
        end = (t) => socket.end(t);
        gone = () => socket.destroyed || socket.writableEnded;
      } else {
        const headers: Record<string, string | number> = { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' };
        if (connection === 'close-header') headers.connection = 'close';
        if (options.framing === 'content-length') headers['content-length'] = Buffer.byteLength(pieces.map((p) => p.text).join(''));
        res.writeHead(200, headers);
        res.flushHeaders();
        write = (t) => res.write(t);
        end = (t) => res.end(t, () => {
          if (connection === 'close') socket.destroy();
        });
        gone = () => res.destroyed || res.writableEnded;
      }
      // One after another, each at its own time from the arrival: a late timer delays, never reorders.
      const sendFrom = (i: number): void => {
        if (i === pieces.length) {
          if (dropAt !== undefined) at(dropAt, () => socket.destroy());
          return;
        }
        const send = () => {
          if (gone()) return;
          if (i === pieces.length - 1 && dropAt === undefined) end(pieces[i].text);
          else write(pieces[i].text);
          sendFrom(i + 1);
        };
        if (pieces[i].at <= arrival) send();
        else at(pieces[i].at, send);
      };
      sendFrom(0);
    });
  };
  const server = options.tls ? https.createServer(options.tls, handler) : http.createServer(handler);
  server.on(options.tls ? 'secureConnection' : 'connection', (s) => {
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
    url: `${options.tls ? 'https' : 'http'}://127.0.0.1:${port}`,
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
