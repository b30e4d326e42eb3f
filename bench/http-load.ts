import http from 'node:http';

export interface StreamLoadResult {
  outputTokens: number;
  seconds: number;
  tokensPerSecond: number;
  errors: number;
}

/**
 * Closed-loop streaming load over HTTP: `concurrency` clients each send POST /v1/completions with
 * stream=true and re-send when the stream ends, until `requests` have completed. Tokens are counted
 * from the final usage chunk (stream_options.include_usage).
 */
export async function streamLoad(
  baseUrl: string,
  body: (i: number) => Record<string, unknown>,
  concurrency: number,
  requests: number,
): Promise<StreamLoadResult> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency });
  const url = new URL('/v1/completions', baseUrl);
  let started = 0;
  let outputTokens = 0;
  let errors = 0;
  const one = (i: number) =>
    new Promise<void>((resolve) => {
      const payload = JSON.stringify({ ...body(i), stream: true, stream_options: { include_usage: true } });
      const req = http.request(url, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) } }, (res) => {
        let tail = '';
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          tail = (tail + chunk).slice(-4096);
        });
        res.on('end', () => {
          const m = /"completion_tokens":(\d+)/.exec(tail);
          if (res.statusCode !== 200 || !m) errors++;
          else outputTokens += Number(m[1]);
          resolve();
        });
      });
      req.on('error', () => {
        errors++;
        resolve();
      });
      req.end(payload);
    });
  const t0 = performance.now();
  const client = async () => {
    while (started < requests) await one(started++);
  };
  await Promise.all(Array.from({ length: concurrency }, client));
  const seconds = (performance.now() - t0) / 1000;
  agent.destroy();
  return { outputTokens, seconds, tokensPerSecond: outputTokens / seconds, errors };
}
