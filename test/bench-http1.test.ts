/**
 * The bench's HTTP/1.1 client (src/loadgen/http1.ts) against a raw TCP server that writes each response
 * one byte per write: heads, chunk-size lines and CRLFs split anywhere; chunked, Content-Length and
 * close-delimited bodies; an interim 100 response; keep-alive reuse and when a connection is not kept.
 */
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { ConnectionPool, type ResponseHead } from '../src/loadgen/http1.ts';

const servers: net.Server[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await new Promise<void>((r) => s.close(() => r()));
});

/** A server that answers every request on a connection with `responses[i]`, byte by byte; `close` ends the connection after it. */
async function rawServer(responses: { bytes: string; close?: boolean }[]): Promise<{ url: string; connections: () => number }> {
  let index = 0;
  let connections = 0;
  const server = net.createServer((socket) => {
    connections++;
    let pending = '';
    socket.on('data', async (d) => {
      pending += d.toString('latin1');
      const end = pending.indexOf('\r\n\r\n');
      if (end < 0) return;
      const length = Number(/content-length: (\d+)/i.exec(pending.slice(0, end))?.[1] ?? 0);
      if (pending.length < end + 4 + length) return;
      pending = '';
      const r = responses[index++ % responses.length];
      for (const ch of r.bytes) {
        socket.write(ch, 'latin1');
        await new Promise((res) => setImmediate(res));
      }
      if (r.close) socket.end();
    });
    socket.on('error', () => undefined);
  });
  servers.push(server);
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return { url: `http://127.0.0.1:${(server.address() as net.AddressInfo).port}`, connections: () => connections };
}

function get(pool: ConnectionPool): Promise<{ head?: ResponseHead; body: string; error?: string }> {
  return new Promise((resolve) => {
    let head: ResponseHead | undefined;
    const parts: Buffer[] = [];
    pool.request('/x', 'POST', { 'content-type': 'application/json' }, '{"a":1}', {
      onHead: (h) => (head = h),
      onBody: (d) => parts.push(Buffer.from(d)),
      onEnd: () => resolve({ head, body: Buffer.concat(parts).toString('utf8') }),
      onError: (err) => resolve({ head, body: Buffer.concat(parts).toString('utf8'), error: err.message }),
    });
  });
}

const sse = 'data: {"choices":[{"text":" é"}]}\n\ndata: [DONE]\n\n';
const chunked = (body: string) => {
  const b = Buffer.from(body);
  const half = Math.floor(b.length / 2);
  return `${b.subarray(0, half).length.toString(16)}\r\n${b.subarray(0, half).toString('latin1')}\r\n${(b.length - half).toString(16)};ext=1\r\n${b.subarray(half).toString('latin1')}\r\n0\r\n\r\n`;
};

describe('http1 client', () => {
  it('reads chunked, Content-Length and close-delimited bodies split byte by byte, after a 100 response', async () => {
    const len = Buffer.byteLength(sse);
    const { url, connections } = await rawServer([
      { bytes: `HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n${chunked(sse)}` },
      { bytes: `HTTP/1.1 200 OK\r\nContent-Length: ${len}\r\nX-A: 1\r\nx-a: 2\r\n\r\n${Buffer.from(sse).toString('latin1')}` },
      { bytes: `HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\n${Buffer.from(sse).toString('latin1')}`, close: true },
    ]);
    const pool = new ConnectionPool(url);
    const a = await get(pool);
    expect(a).toMatchObject({ head: { status: 200, headers: { 'content-type': 'text/event-stream' } }, body: sse });
    const b = await get(pool);
    expect(b).toMatchObject({ head: { status: 200, headers: { 'x-a': '1, 2' } }, body: sse });
    // Both on one kept-alive connection so far.
    expect(connections()).toBe(1);
    const c = await get(pool);
    expect(c.error).toBeUndefined();
    expect(c.body).toBe(sse);
    // HTTP/1.0 with no length: the body ended with the connection, which is not kept.
    const d = await get(pool);
    expect(d.body).toBe(sse);
    expect(connections()).toBe(2);
    pool.destroy();
  });

  it('does not keep a connection after Connection: close, and reports a body cut short', async () => {
    const { url, connections } = await rawServer([
      { bytes: 'HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok' },
      { bytes: 'HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort', close: true },
      { bytes: 'garbage\r\n\r\n' },
    ]);
    const pool = new ConnectionPool(url);
    expect(await get(pool)).toMatchObject({ body: 'ok' });
    const cut = await get(pool);
    expect(cut).toMatchObject({ body: 'short', error: 'the connection closed mid-response' });
    expect(connections()).toBe(2);
    const bad = await get(pool);
    expect(bad.error).toContain('not an HTTP/1.x response');
    pool.destroy();
  });
});
