import http from 'node:http';
import { describe, expect, it } from 'vitest';
import { type ResponseEnd, ResponseReader, streamLoad } from '../bench/http-load.ts';

const sse = (events: string[]) => events.map((e) => `data: ${e}\n\n`);
const chunked = (parts: string[]) =>
  parts.map((p) => `${Buffer.byteLength(p).toString(16)}\r\n${p}\r\n`).join('') + '0\r\n\r\n';

const streamed = (events: string[]) =>
  'HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n' + chunked(sse(events));
const fixed = (status: number, body: string) =>
  `HTTP/1.1 ${status} Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;

function read(bytes: Buffer, split: (n: number) => number[]): ResponseEnd[] {
  const ends: ResponseEnd[] = [];
  const reader = new ResponseReader((e) => ends.push(e));
  let at = 0;
  for (const n of split(bytes.length)) {
    reader.push(bytes.subarray(at, at + n));
    at += n;
  }
  expect(at).toBe(bytes.length);
  return ends;
}

describe('the benchmark load generator', () => {
  const usage = '{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":17,"total_tokens":20}}';
  const stream = streamed(['{"choices":[{"text":"Once"}]}', '{"choices":[{"text":" upon – é"}]}', usage, '[DONE]']);
  const error = fixed(429, '{"error":{"message":"overloaded"}}');
  const bytes = Buffer.from(stream + error + stream);
  const expected = (ends: ResponseEnd[]) => {
    expect(ends.map((e) => e.status)).toEqual([200, 429, 200]);
    expect(ends[0].tail).toContain(usage);
    expect(ends[0].tail.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(ends[1].tail).toBe('{"error":{"message":"overloaded"}}');
    expect(ends[2].tail).toBe(ends[0].tail);
  };

  it('reads back-to-back chunked and Content-Length responses whole', () => {
    expected(read(bytes, (n) => [n]));
  });

  it('reads them split at every byte', () => {
    expected(read(bytes, (n) => Array(n).fill(1)));
  });

  it('reads them split at random places', () => {
    let seed = 7;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    for (let trial = 0; trial < 50; trial++) {
      expected(read(bytes, (n) => {
        const sizes: number[] = [];
        for (let left = n; left > 0;) {
          const k = Math.min(left, 1 + Math.floor(rand() * 40));
          sizes.push(k);
          left -= k;
        }
        return sizes;
      }));
    }
  });

  it('keeps only the end of a long stream', () => {
    const many = Array.from({ length: 2000 }, (_, i) => `{"choices":[{"text":"token ${i}"}]}`);
    const [end] = read(Buffer.from(streamed([...many, usage, '[DONE]'])), (n) => [n]);
    expect(end.tail.length).toBeLessThan(4096 + 200);
    expect(end.tail).toContain(usage);
    expect(end.tail).not.toContain('token 1000');
  });

  it('counts tokens over a real HTTP server, and a refused request as an error', async () => {
    let served = 0;
    const server = http.createServer((req, res) => {
      req.resume();
      req.on('end', () => {
        if (served++ === 2) {
          res.writeHead(429, { 'content-type': 'application/json' }).end('{"error":{"message":"overloaded"}}');
          return;
        }
        res.writeHead(200, { 'content-type': 'text/event-stream' });
        let i = 0;
        const tick = () => {
          if (i < 5) {
            res.write(`data: {"choices":[{"text":"t${i++}"}]}\n\n`);
            setImmediate(tick);
          } else {
            res.end('data: {"choices":[],"usage":{"completion_tokens":5}}\n\ndata: [DONE]\n\n');
          }
        };
        tick();
      });
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const { port } = server.address() as { port: number };
    try {
      const result = await streamLoad(`http://127.0.0.1:${port}`, () => ({ prompt: 'x' }), 2, 6);
      expect(result.errors).toBe(1);
      expect(result.outputTokens).toBe(25);
    } finally {
      server.close();
    }
  });
});
