/**
 * One streamed request to an OpenAI-compatible server, timed from the client's side. Every way a
 * request can go wrong ends as a RequestRecord with an error kind; nothing here throws.
 */
import http from 'node:http';
import https from 'node:https';
import { StringDecoder } from 'node:string_decoder';
import { ConnectionPool } from './http1.ts';
import type { ErrorKind, RequestRecord, RequestSpec, ServerCost } from './types.ts';
import { cachedTokensOf } from './usage.ts';

export interface Target {
  /** The server's root, e.g. http://127.0.0.1:8000 (a trailing /v1 is dropped by normalizeBaseUrl). */
  baseUrl: string;
  apiKey?: string;
  timeoutMs: number;
}

/** "http://host:8000/v1/" → "http://host:8000". */
export function normalizeBaseUrl(url: string): string {
  const u = new URL(url);
  let path = u.pathname.replace(/\/+$/, '');
  if (path.endsWith('/v1')) path = path.slice(0, -3);
  return `${u.protocol}//${u.host}${path}`;
}

export const ENDPOINT_PATHS = { completions: '/v1/completions', chat: '/v1/chat/completions' } as const;

/** Keep-alive connections to a target, one pool per load point so that connections of one do not carry over. */
export function makePool(baseUrl: string): ConnectionPool {
  return new ConnectionPool(new URL(baseUrl).origin);
}

const SNIPPET = 200;
const snippet = (text: string) => {
  const one = text.replace(/\s+/g, ' ').trim();
  return one.length > SNIPPET ? `${one.slice(0, SNIPPET)}…` : one;
};

function statusKind(status: number): ErrorKind {
  if (status === 429) return 'http_429';
  return status >= 500 ? 'http_5xx' : 'http_4xx';
}

function errorMessage(body: string): string {
  return snippet(rawErrorMessage(body));
}

function rawErrorMessage(body: string): string {
  try {
    const parsed = JSON.parse(body) as { error?: { message?: string } | string; message?: string; detail?: unknown };
    if (typeof parsed.error === 'string') return parsed.error;
    if (parsed.error?.message) return parsed.error.message;
    if (typeof parsed.message === 'string') return parsed.message;
    if (parsed.detail !== undefined) return typeof parsed.detail === 'string' ? parsed.detail : JSON.stringify(parsed.detail);
  } catch {
    // not JSON
  }
  return snippet(body);
}

function serverCost(usage: Record<string, unknown>): ServerCost | undefined {
  const cost = usage.cost as { device_seconds?: { prefill?: unknown; decode?: unknown }; devices?: unknown } | undefined;
  const ds = cost?.device_seconds;
  if (!ds || typeof ds.prefill !== 'number' || typeof ds.decode !== 'number') return undefined;
  return { prefill: ds.prefill, decode: ds.decode, devices: typeof cost.devices === 'number' && cost.devices > 0 ? cost.devices : 1 };
}

/** Text a streamed choice carries: completions' `text`, chat's `delta.content` (or reasoning). */
function chunkText(choice: Record<string, unknown>): string {
  if (typeof choice.text === 'string') return choice.text;
  const delta = choice.delta as Record<string, unknown> | undefined;
  if (!delta) return '';
  let text = '';
  if (typeof delta.content === 'string') text += delta.content;
  if (typeof delta.reasoning_content === 'string') text += delta.reasoning_content;
  return text;
}

export interface SendOptions {
  now?: () => number;
  /** performance.now() of the load point's start, which record.startMs counts from. */
  originMs?: number;
  /** Keep the generated text in record.text (to count its tokens when the server sends no usage). */
  keepText?: boolean;
}

/**
 * Sends `spec` with stream=true and times it: TTFT is the first chunk carrying generated text, the
 * inter-token latencies are the gaps between such chunks (a chunk holding several tokens is one gap, as
 * in vLLM's benchmark_serving), and end-to-end runs to the end of the response.
 *
 * A request written on a reused keep-alive connection that fails before a single response byte came
 * back is sent once more on a fresh connection, as Go's net/http and urllib3 do: the server closed
 * that connection while it sat idle (llama.cpp's server closes after every streamed response without
 * saying so), so the request never reached its handler. Its times still count from the first send.
 * A response that carried [DONE] or a finish_reason is complete even if the connection then closes
 * without the chunked terminator.
 */
export function sendStreaming(target: Target, spec: RequestSpec, pool: ConnectionPool, options: SendOptions = {}): Promise<RequestRecord> {
  const now = options.now ?? (() => performance.now());
  return new Promise((resolve) => {
    const url = new URL(`${target.baseUrl}${ENDPOINT_PATHS[spec.endpoint]}`);
    const payload = JSON.stringify({ ...spec.body, stream: true });
    const headers: Record<string, string | number> = {
      'content-type': 'application/json',
      accept: 'text/event-stream',
      'content-length': Buffer.byteLength(payload),
    };
    if (target.apiKey) headers.authorization = `Bearer ${target.apiKey}`;

    const t0 = now();
    const record: RequestRecord = { ok: false, startMs: t0 - (options.originMs ?? 0), itlMs: [], tokensFrom: 'counted', contentChunks: 0 };
    if (spec.plannedOutput !== undefined) record.plannedOutput = spec.plannedOutput;
    if (options.keepText) record.text = '';
    let settled = false;
    let timedOut = false;
    let lastContent: number | undefined;
    let usage: Record<string, unknown> | undefined;
    let sawDone = false;
    let sawFinish = false;
    let events = 0;
    let buffer = '';
    let raw = '';
    let contentType = '';
    let abort: () => void = () => undefined;

    const finish = (error?: { kind: ErrorKind; message: string; status?: number }) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      const end = now();
      if (error) {
        record.error = error;
        record.ok = false;
        if (record.ttftMs !== undefined) record.e2eMs = end - t0;
      } else {
        record.ok = true;
        record.e2eMs = end - t0;
      }
      if (usage) {
        if (typeof usage.prompt_tokens === 'number') record.promptTokens = usage.prompt_tokens;
        if (typeof usage.completion_tokens === 'number') {
          record.completionTokens = usage.completion_tokens;
          record.tokensFrom = 'usage';
        }
        record.serverCost = serverCost(usage);
        record.cachedTokens = cachedTokensOf(usage);
      }
      record.promptTokens ??= spec.plannedInput;
      if (record.completionTokens === undefined) record.completionTokens = record.contentChunks;
      resolve(record);
    };

    const onEvent = (data: string, at: number): ErrorKind | undefined => {
      if (data === '[DONE]') {
        sawDone = true;
        return undefined;
      }
      let parsed: Record<string, unknown>;
      try {
        parsed = JSON.parse(data) as Record<string, unknown>;
      } catch {
        finish({ kind: 'bad_response', message: `an SSE event is not JSON: ${snippet(data)}` });
        return 'bad_response';
      }
      if (typeof parsed !== 'object' || parsed === null) {
        finish({ kind: 'bad_response', message: `an SSE event is not a JSON object: ${snippet(data)}` });
        return 'bad_response';
      }
      events++;
      if (parsed.error !== undefined && parsed.error !== null) {
        finish({ kind: 'stream_error', message: errorMessage(data) });
        return 'stream_error';
      }
      if (parsed.usage && typeof parsed.usage === 'object') usage = parsed.usage as Record<string, unknown>;
      const choices = parsed.choices;
      if (Array.isArray(choices) && choices.length > 0) {
        const choice = choices[0] as Record<string, unknown>;
        const text = chunkText(choice);
        if (text.length > 0) {
          record.contentChunks++;
          if (record.text !== undefined) record.text += text;
          if (lastContent === undefined) record.ttftMs = at - t0;
          else record.itlMs.push(at - lastContent);
          lastContent = at;
          record.lastTokenMs = at - t0;
        }
        if (choice.finish_reason != null) sawFinish = true;
      } else if (choices !== undefined && !Array.isArray(choices)) {
        finish({ kind: 'bad_response', message: `"choices" is not an array: ${snippet(data)}` });
        return 'bad_response';
      }
      return undefined;
    };

    /** Parses complete SSE events out of the buffer (events end with a blank line; comment lines are skipped). */
    const drain = (at: number, final: boolean) => {
      for (;;) {
        let end = buffer.indexOf('\n\n');
        let sep = 2;
        if (end < 0 || buffer.indexOf('\r') >= 0) {
          const m = /\r?\n\r?\n/.exec(buffer);
          end = m ? m.index : -1;
          sep = m ? m[0].length : 0;
        }
        let block: string;
        if (end >= 0) {
          block = buffer.slice(0, end);
          buffer = buffer.slice(end + sep);
        } else if (final && buffer.trim() !== '') {
          block = buffer;
          buffer = '';
        } else return;
        if (block.startsWith('data: ') && block.indexOf('\n') < 0) {
          if (onEvent(block.slice(6), at)) return;
          continue;
        }
        const data: string[] = [];
        for (const line of block.split(/\r?\n/)) {
          if (line.startsWith('data:')) data.push(line.slice(line.startsWith('data: ') ? 6 : 5));
        }
        if (data.length > 0 && onEvent(data.join('\n'), at)) return;
      }
    };

    const ended = () => {
      if (settled) return;
      drain(now(), true);
      if (settled) return;
      if (events === 0 && !sawDone) {
        finish({ kind: 'bad_response', message: `not an SSE stream of JSON events (content-type ${contentType || 'none'}): ${snippet(raw)}` });
      } else if (!sawDone && !sawFinish) {
        finish({ kind: 'stream_dropped', message: 'the stream ended before [DONE] or a finish_reason' });
      } else {
        finish();
      }
    };

    const path = `${url.pathname}${url.search}`;
    const send = (fresh: boolean) => {
      let status = 0;
      let errorBody = '';
      const decoder = new StringDecoder('utf8');
      const statusError = () => finish({ kind: statusKind(status), status, message: `HTTP ${status}: ${errorMessage(errorBody)}` });
      abort = pool.request(path, 'POST', headers, payload, {
        onHead: (head) => {
          status = head.status;
          contentType = head.headers['content-type'] ?? '';
        },
        onBody: (data) => {
          if (settled) return;
          if (status !== 200) {
            if (errorBody.length < 8192) errorBody += decoder.write(data);
            return;
          }
          const at = now();
          const chunk = decoder.write(data);
          if (raw.length < SNIPPET) raw += chunk;
          buffer += chunk;
          drain(at, false);
        },
        onEnd: () => {
          if (settled) return;
          if (status !== 200) return statusError();
          buffer += decoder.end();
          ended();
        },
        onError: (err, info) => {
          if (settled) return;
          if (timedOut) return finish({ kind: 'timeout', message: `no end of stream after ${target.timeoutMs} ms` });
          if (info.silent && info.reused && !fresh) {
            record.retries = (record.retries ?? 0) + 1;
            return send(true);
          }
          if (status !== 0 && status !== 200) return statusError();
          if (status === 200 && (sawDone || sawFinish)) return ended();
          if (status === 200) return finish({ kind: 'stream_dropped', message: `the connection closed mid-stream after ${record.contentChunks} content chunks` });
          finish({ kind: 'connection', message: `${err.code ?? 'error'}: ${err.message}${fresh ? ' (on a fresh connection, after the reused one was closed)' : ''}` });
        },
      }, fresh);
    };
    const timer = setTimeout(() => {
      timedOut = true;
      abort();
    }, target.timeoutMs);
    send(false);
  });
}

/** A JSON request (probes, /tokenize, /v1/models): the parsed body and status, or an error message. */
export async function requestJson(target: Target, method: 'GET' | 'POST', path: string, body?: unknown, timeoutMs = 10_000): Promise<{ status: number; json?: unknown; error?: string }> {
  return new Promise((resolve) => {
    const url = new URL(`${target.baseUrl}${path}`);
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const headers: Record<string, string | number> = { accept: 'application/json' };
    if (payload !== undefined) {
      headers['content-type'] = 'application/json';
      headers['content-length'] = Buffer.byteLength(payload);
    }
    if (target.apiKey) headers.authorization = `Bearer ${target.apiKey}`;
    const client = target.baseUrl.startsWith('https:') ? https : http;
    let done = false;
    const settle = (v: { status: number; json?: unknown; error?: string }) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      resolve(v);
    };
    const req = client.request(url, { method, headers, agent: false }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        if (text.length < 4 << 20) text += c;
      });
      res.on('end', () => {
        const status = res.statusCode ?? 0;
        try {
          settle({ status, json: JSON.parse(text), ...(status >= 400 ? { error: `HTTP ${status}: ${errorMessage(text)}` } : {}) });
        } catch {
          settle({ status, error: `HTTP ${status}, not JSON: ${snippet(text)}` });
        }
      });
      res.on('error', (err) => settle({ status: res.statusCode ?? 0, error: err.message }));
    });
    req.on('error', (err: NodeJS.ErrnoException) => settle({ status: 0, error: `${err.code ?? 'error'}: ${err.message}` }));
    const timer = setTimeout(() => req.destroy(new Error(`timed out after ${timeoutMs} ms`)), timeoutMs);
    req.end(payload);
  });
}
