/**
 * Overload, client faults (slow readers, half-open connections, timeouts) and engine faults, against the
 * real server (startServer: engine worker, meter, ledger) on 127.0.0.1.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import express from 'express';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Ledger } from '../src/meter/ledger.ts';
import { SseStream } from '../src/server/sse.ts';
import { type RunningServer } from '../src/server/start.ts';
import { storiesModel } from './helpers/models.ts';
import { FAULT_WORKER, injectFault, startServerWith } from './helpers/server.ts';
import type { ServeConfig } from '../src/config/serve-config.ts';

interface Started {
  s: RunningServer;
  logs: Record<string, unknown>[];
  dataDir: string;
}

async function start(opts: Partial<ServeConfig> = {}): Promise<Started> {
  const logs: Record<string, unknown>[] = [];
  const logger = pino({ level: 'info' }, { write: (line: string) => void logs.push(JSON.parse(line)) });
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-rel-'));
  const s = await startServerWith(
    { model: storiesModel(), host: '127.0.0.1', port: 0, device: 'cpu', dataDir, logLevel: 'info', maxNumSeqs: 8, kvCacheGb: 0.25, threads: 1, ...opts },
    logger,
    FAULT_WORKER,
  );
  return { s, logs, dataDir };
}

async function post(url: string, body: unknown, init: RequestInit = {}): Promise<{ status: number; headers: Headers; text: string; json: () => any }> {
  const r = await fetch(`${url}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), ...init });
  const text = await r.text();
  return { status: r.status, headers: r.headers, text, json: () => JSON.parse(text) };
}

const until = async (cond: () => boolean, ms: number): Promise<boolean> => {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 10));
  }
  return true;
};

function expectOpenAIError(status: number, text: string, want: number | ((s: number) => boolean), code?: string): void {
  if (typeof want === 'number') expect(status, text).toBe(want);
  else expect(want(status), `${status} ${text}`).toBe(true);
  const body = JSON.parse(text);
  expect(Object.keys(body)).toEqual(['error']);
  expect(Object.keys(body.error).sort()).toEqual(['code', 'message', 'param', 'type']);
  if (code) expect(body.error.code).toBe(code);
}

/** A raw TCP client: what it received, and when the server closed it. */
function rawClient(port: number) {
  const socket = net.connect(port, '127.0.0.1');
  let received = '';
  let closedAt: number | undefined;
  socket.on('data', (d) => (received += d.toString('latin1')));
  socket.on('error', () => {});
  const closed = new Promise<void>((resolve) => socket.on('close', () => ((closedAt = Date.now()), resolve())));
  return { socket, closed, received: () => received, closedAt: () => closedAt };
}

const LONG = { prompt: 'Once upon a time', max_tokens: 300, ignore_eos: true, temperature: 0 };

describe('overload', () => {
  let srv: Started;
  beforeAll(async () => {
    srv = await start({ maxNumSeqs: 4, maxQueue: 4 });
  });
  afterAll(() => srv?.s.shutdown(1));

  it('admits up to capacity, refuses the rest with 429 + Retry-After, and /health and /metrics keep answering', async () => {
    const { s } = srv;
    const capacity = s.engine.info.limits.maxNumSeqs + 4;
    let peakInFlight = 0;
    const sampler = setInterval(() => (peakInFlight = Math.max(peakInFlight, s.engine.inFlight)), 5);
    const probes: number[] = [];
    let probing = true;
    const prober = (async () => {
      while (probing) {
        const t0 = performance.now();
        const [h, m] = await Promise.all([fetch(`${s.url}/health`), fetch(`${s.url}/metrics`)]);
        expect(h.status).toBe(200);
        expect(m.status).toBe(200);
        await m.text();
        probes.push(performance.now() - t0);
        await new Promise((r) => setTimeout(r, 20));
      }
    })();
    // 4× the capacity at once, then more while those run.
    const t0 = performance.now();
    const wave = (n: number) => Array.from({ length: n }, () => post(s.url, LONG).then((r) => ({ ...r, ms: performance.now() - t0 })));
    const first = wave(capacity * 4);
    await new Promise((r) => setTimeout(r, 100));
    const results = await Promise.all([...first, ...wave(capacity * 2)]);
    probing = false;
    await prober;
    clearInterval(sampler);

    const ok = results.filter((r) => r.status === 200);
    const refused = results.filter((r) => r.status === 429);
    expect(ok.length + refused.length).toBe(results.length);
    expect(ok.length).toBeGreaterThanOrEqual(capacity);
    expect(refused.length).toBeGreaterThan(results.length / 2);
    for (const r of refused) {
      expectOpenAIError(r.status, r.text, 429, 'server_overloaded');
      expect(Number(r.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    }
    for (const r of ok) expect(r.json().usage.completion_tokens).toBe(300);
    expect(peakInFlight).toBeLessThanOrEqual(capacity);
    // Health and metrics answered throughout, promptly.
    expect(probes.length).toBeGreaterThan(3);
    const sorted = [...probes].sort((a, b) => a - b);
    expect(sorted[Math.floor(sorted.length / 2)], probes.map(Math.round).join(' ')).toBeLessThan(300);
    expect(sorted.at(-1), probes.map(Math.round).join(' ')).toBeLessThan(2000);
  });
});

describe('client faults and timeouts', () => {
  let srv: Started;
  beforeAll(async () => {
    srv = await start({ idleTimeoutSeconds: 1, maxNumSeqs: 16 });
  });
  afterAll(() => srv?.s.shutdown(1));

  it('a streaming client that never reads: bounded buffer, cancelled after the stall timeout, connection closed', async () => {
    const { s, logs, dataDir } = srv;
    const { port } = new URL(s.url);
    const c = rawClient(Number(port));
    const body = JSON.stringify({ prompt: ['Once upon a time', 'The dog', 'A cat', 'Tom went'], n: 4, max_tokens: 2000, ignore_eos: true, logprobs: 20, stream: true });
    c.socket.write(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    // Read the response headers, then stop reading for good.
    await until(() => c.received().includes('\r\n\r\n'), 5000);
    c.socket.pause();
    const requestId = /x-request-id: (\w+)/i.exec(c.received())![1];
    const rssBefore = process.memoryUsage().rss;
    const stalled = () => logs.find((l) => l.msg === 'stream stalled: cancelling' && l.requestId === requestId);
    expect(await until(() => stalled() !== undefined, 20_000), JSON.stringify(logs.slice(-5))).toBe(true);
    // Held at most the 256 KiB bound plus the last event and the socket's own buffer.
    expect(stalled()!.bufferedBytes as number).toBeLessThan(256 * 1024 + 64 * 1024);
    expect(process.memoryUsage().rss - rssBefore).toBeLessThan(200 * 2 ** 20);
    // The server closed the connection: reading again, the client sees the end at once.
    c.socket.resume();
    await c.closed;
    expect(await until(() => s.engine.inFlight === 0, 3000)).toBe(true);
    const ledger = new Ledger(dataDir, { readonly: true });
    const row = ledger.get(`cmpl-${requestId}`);
    ledger.close();
    expect(row?.status).toBe('cancelled');
    expect(row!.completionTokens).toBeLessThan(16 * 2000);
  });

  it('closes connections whose headers or body never finish (408), and idle sockets', async () => {
    const { port } = new URL(srv.s.url);
    const headers = rawClient(Number(port));
    headers.socket.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\n');
    const body = rawClient(Number(port));
    body.socket.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt":');
    // Keeps trickling bytes: activity, but the request never completes.
    const trickle = rawClient(Number(port));
    trickle.socket.write('POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n');
    const drip = setInterval(() => trickle.socket.write(' '), 200);
    const silent = rawClient(Number(port));
    const t0 = Date.now();
    await Promise.all([headers.closed, body.closed, trickle.closed, silent.closed]);
    clearInterval(drip);
    for (const c of [headers, body, trickle, silent]) expect(c.closedAt()! - t0).toBeLessThan(6000);
    expect(body.received()).toMatch(/^HTTP\/1\.1 408/);
    expect(trickle.received()).toMatch(/^HTTP\/1\.1 408/);
  });

  it('a generation longer than the idle timeout still completes (whole and streamed)', async () => {
    // 16 sequences of 2000 tokens: about twice the idle timeout on this machine's fastest runs.
    const body = { prompt: 'Once upon a time', max_tokens: 2000, n: 8, ignore_eos: true };
    const t0 = Date.now();
    const [whole, streamed] = await Promise.all([post(srv.s.url, body), post(srv.s.url, { ...body, stream: true })]);
    expect(whole.status).toBe(200);
    expect(whole.json().usage.completion_tokens).toBe(16000);
    expect(streamed.text.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(Date.now() - t0).toBeGreaterThan(1000);
  });
});

describe('SseStream backpressure', () => {
  /** A response whose socket takes the first write and then nothing until drain(). */
  function fakeResponse() {
    const res = new EventEmitter() as EventEmitter & Record<string, unknown>;
    const written: string[] = [];
    let full = false;
    Object.assign(res, {
      writableEnded: false,
      destroyed: false,
      writableLength: 0,
      write(chunk: string) {
        written.push(chunk);
        const ok = !full;
        full = true;
        return ok;
      },
      end(chunk: string) {
        written.push(chunk);
        res.writableEnded = true;
      },
      destroy() {
        res.destroyed = true;
        res.emit('close');
      },
    });
    return { res, written, drain: () => ((full = false), res.emit('drain')) };
  }

  it('queues while the socket is full, writes the queue on drain, and stalls past the timeout or the bound', async () => {
    const stalls: string[] = [];
    const a = fakeResponse();
    const sse = new SseStream(a.res as never, { maxBufferedBytes: 1000, stallTimeoutMs: 100, onStall: (why) => stalls.push(why) });
    sse.send({ n: 1 });
    sse.send({ n: 2 });
    sse.send({ n: 3 });
    // The second write is taken but says the socket is full; the third waits.
    expect(a.written).toEqual(['data: {"n":1}\n\n', 'data: {"n":2}\n\n']);
    a.drain();
    expect(a.written.slice(2)).toEqual(['data: {"n":3}\n\n']);
    sse.send({ n: 4 });
    sse.end();
    expect(a.res.writableEnded).toBe(false);
    a.drain();
    expect(a.written.slice(-2)).toEqual(['data: {"n":4}\n\n', 'data: [DONE]\n\n']);
    expect(a.res.writableEnded).toBe(true);
    expect(stalls).toEqual([]);

    // Never drains: the stall timer fires.
    const b = fakeResponse();
    const never = new SseStream(b.res as never, { maxBufferedBytes: 1000, stallTimeoutMs: 100, onStall: (why) => stalls.push(why) });
    never.send({ n: 1 });
    never.send({ n: 2 });
    await new Promise((r) => setTimeout(r, 200));
    expect(stalls).toEqual(['the client read nothing for 100 ms']);

    // Past the bound, at once.
    const c = fakeResponse();
    const big = new SseStream(c.res as never, { maxBufferedBytes: 1000, stallTimeoutMs: 60_000, onStall: (why) => stalls.push(why) });
    for (let i = 0; i < 50; i++) big.send({ text: 'x'.repeat(50) });
    expect(stalls[1]).toContain('more than 1000 bytes');
    expect(big.bufferedBytes).toBe(0);
    c.res.emit('close');
  });
});

describe('SseStream over a real socket', () => {
  // ~10 MB: more than the loopback socket buffers on both sides hold, so the writer has to wait for the reader.
  const events = Array.from({ length: 2000 }, (_, i) => ({ i, text: `${i} `.repeat(1000) + "— é 🙂" }));
  const expected = events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join('') + 'data: [DONE]\n\n';

  /** A server whose one route streams `events` at once and records how its response was written. */
  async function sseServer() {
    const seen: { resWrites: number; peak: number }[] = [];
    const app = express();
    app.get('/sse', (_req, res) => {
      const record = { resWrites: 0, peak: 0 };
      seen.push(record);
      const write = res.write.bind(res);
      res.write = ((...args: Parameters<typeof res.write>) => (record.resWrites++, write(...args))) as typeof res.write;
      const sse = new SseStream(res, { maxBufferedBytes: 64 * 2 ** 20, stallTimeoutMs: 10_000, onStall: () => res.destroy() });
      sse.open();
      // Most at once, so that the socket pushes back while the reader waits; the rest over the next ~600 ms, so
      // that writes go on after the socket drains, not only at the end.
      let at = 1500;
      for (const e of events.slice(0, at)) sse.send(e);
      const batch = () => {
        for (const e of events.slice(at, (at += 25))) sse.send(e);
        if (at < events.length) return void setTimeout(batch, 30);
        sse.end();
        record.peak = sse.peakBufferedBytes;
      };
      setTimeout(batch, 30);
    });
    const server = app.listen(0, '127.0.0.1');
    await new Promise((r) => server.once('listening', r));
    return { port: (server.address() as net.AddressInfo).port, seen, close: () => new Promise((r) => server.close(r)) };
  }

  it('a reader that stops, then reads again, gets every event of a chunked stream intact and in order', async () => {
    const srv = await sseServer();
    try {
      const body = await new Promise<string>((resolve, reject) => {
        http.get({ port: srv.port, path: '/sse', agent: false }, (res) => {
          expect(res.headers['transfer-encoding']).toBe('chunked');
          res.pause();
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve(Buffer.concat(chunks).toString()));
          setTimeout(() => res.resume(), 300);
        }).on('error', reject);
      });
      expect(body).toBe(expected);
      // The socket pushed back (events waited) and the events went around res.write: only res.end used it.
      expect(srv.seen[0].peak).toBeGreaterThan(100_000);
      expect(srv.seen[0].resWrites).toBe(0);
    } finally {
      await srv.close();
    }
  });

  it('an HTTP/1.0 client (no chunked encoding) gets the same events through res.write', async () => {
    const srv = await sseServer();
    try {
      const c = rawClient(srv.port);
      c.socket.write('GET /sse HTTP/1.0\r\nHost: x\r\n\r\n');
      await c.closed;
      const [head, ...rest] = Buffer.from(c.received(), 'latin1').toString().split('\r\n\r\n');
      expect(head).not.toMatch(/transfer-encoding/i);
      expect(rest.join('\r\n\r\n')).toBe(expected);
      expect(srv.seen[0].resWrites).toBeGreaterThan(0);
    } finally {
      await srv.close();
    }
  });
});

describe('engine faults', () => {
  it('an ONNX Runtime error fails the requests in its forward pass with 500 and the server goes on; a model that does not load stops start-up', async () => {
    const srv = await start();
    try {
      const { s } = srv;
      // As long as the context allows: the native runner writes stories260K's tokens in well under a millisecond each.
      const longest = { ...LONG, max_tokens: 500 };
      const pending = [post(s.url, longest), post(s.url, { ...longest, stream: true })];
      await until(() => s.engine.inFlight === 2, 2000);
      // Both admitted (at the next step boundary), both still generating.
      await new Promise((r) => setTimeout(r, 10));
      injectFault('forward-error');
      const [whole, streamed] = await Promise.all(pending);
      expectOpenAIError(whole.status, whole.text, 500);
      expect(whole.json().error.message).toContain('injected ONNX Runtime error');
      expect(streamed.status).toBe(200);
      expect(streamed.text).toContain('injected ONNX Runtime error');
      const after = await post(s.url, { prompt: 'Once upon a time', max_tokens: 5 });
      expect(after.status).toBe(200);
      expect(s.engine.restarts).toBe(0);
    } finally {
      await srv.s.shutdown(1);
    }

    // A model folder whose graph is garbage.
    const broken = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-broken-'));
    fs.cpSync(storiesModel(), broken, { recursive: true });
    fs.writeFileSync(path.join(broken, 'onnx', 'model.onnx'), Buffer.from('not an onnx graph'));
    await expect(start({ model: broken })).rejects.toThrow(new RegExp(`could not load the model in ${broken}`));
  });
});
