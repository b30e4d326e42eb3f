/**
 * Overload benchmark (loopback only, bounded in time): starts `tally serve` as a child process, measures the
 * rate it sustains with a closed loop at --concurrency, then offers --factor (default 4) times that rate as an
 * open loop and reports what happened: the share answered 429, latency of the admitted requests, whether
 * /health and /metrics kept answering, and the server's peak memory (VmHWM / sampled VmRSS from /proc).
 *
 *   node --import tsx bench/overload.ts [--model DIR|NAME] [--seconds 10] [--concurrency 16] [--max-tokens 64]
 *                                       [--factor 4] [--max-queue 16] [--json]
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';

const { values } = parseArgs({
  options: {
    model: { type: 'string' },
    seconds: { type: 'string', default: '10' },
    concurrency: { type: 'string', default: '16' },
    'max-tokens': { type: 'string', default: '64' },
    factor: { type: 'string', default: '4' },
    'max-queue': { type: 'string', default: '16' },
    threads: { type: 'string' },
    json: { type: 'boolean', default: false },
  },
});
const seconds = Number(values.seconds);
const concurrency = Number(values.concurrency);
const maxTokens = Number(values['max-tokens']);
const factor = Number(values.factor);

const percentile = (xs: number[], p: number) => {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)];
};

/** /proc/<pid>/status memory figures in MiB (Linux); undefined elsewhere. */
function memory(pid: number): { rss: number; hwm: number } | undefined {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => Number(new RegExp(`${key}:\\s+(\\d+)`).exec(status)?.[1] ?? NaN);
    return { rss: kb('VmRSS') / 1024, hwm: kb('VmHWM') / 1024 };
  } catch {
    return undefined;
  }
}

async function startServer(): Promise<{ url: string; pid: number; stop: () => Promise<void> }> {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'tally-overload-'));
  const args = ['bin/tally.js', 'serve', '--port', '0', '--data-dir', dataDir, '--log-level', 'warn',
    '--max-num-seqs', String(concurrency), '--max-queue', String(values['max-queue']), '--kv-cache-gb', '0.5'];
  if (values.model) args.push('--model', values.model);
  if (values.threads) args.push('--threads', values.threads);
  // 'serving' is logged at info; with --log-level warn, poll /health instead.
  const port = await new Promise<number>((resolve) => {
    const probe = http.createServer().listen(0, '127.0.0.1', () => {
      const p = (probe.address() as { port: number }).port;
      probe.close(() => resolve(p));
    });
  });
  args[3] = String(port);
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'inherit', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 120_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error('tally serve exited during start-up');
    try {
      if ((await fetch(`${url}/health`)).ok) break;
    } catch {
      // not listening yet
    }
    if (Date.now() > deadline) throw new Error('tally serve did not start within 120 s');
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url,
    pid: child.pid!,
    stop: async () => {
      child.kill('SIGTERM');
      await exited;
    },
  };
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 1024 });

function request(url: string, body: string): Promise<{ status: number; ms: number; retryAfter?: string }> {
  const t0 = performance.now();
  return new Promise((resolve) => {
    const req = http.request(`${url}/v1/completions`, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      res.resume();
      res.on('end', () => resolve({ status: res.statusCode ?? 0, ms: performance.now() - t0, retryAfter: res.headers['retry-after'] as string | undefined }));
    });
    req.on('error', () => resolve({ status: -1, ms: performance.now() - t0 }));
    req.end(body);
  });
}

async function main(): Promise<void> {
  const server = await startServer();
  const body = JSON.stringify({ prompt: 'Once upon a time', max_tokens: maxTokens, ignore_eos: true, temperature: 0 });
  let peakRss = 0;
  const sampler = setInterval(() => (peakRss = Math.max(peakRss, memory(server.pid)?.rss ?? 0)), 100);

  // Warm-up.
  await Promise.all(Array.from({ length: concurrency }, () => request(server.url, body)));
  const idleRss = memory(server.pid)?.rss ?? NaN;

  // Phase 1: closed loop at `concurrency`: the rate the server sustains.
  const closed: number[] = [];
  let t0 = performance.now();
  const end1 = t0 + seconds * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < end1) {
        const r = await request(server.url, body);
        if (r.status === 200) closed.push(r.ms);
      }
    }),
  );
  const sustained = closed.length / ((performance.now() - t0) / 1000);
  const rssAfterSustained = peakRss;

  // Phase 2: open loop at factor × sustained, for the same time.
  const offered = sustained * factor;
  const results: { status: number; ms: number; retryAfter?: string }[] = [];
  const inFlight: Promise<void>[] = [];
  const probes: number[] = [];
  let probeFailures = 0;
  let probing = true;
  const prober = (async () => {
    while (probing) {
      const p0 = performance.now();
      try {
        const [h, m] = await Promise.all([fetch(`${server.url}/health`), fetch(`${server.url}/metrics`)]);
        await m.text();
        if (!h.ok || !m.ok) probeFailures++;
      } catch {
        probeFailures++;
      }
      probes.push(performance.now() - p0);
      await new Promise((r) => setTimeout(r, 200));
    }
  })();
  t0 = performance.now();
  const total = Math.round(offered * seconds);
  for (let i = 0; i < total; i++) {
    const due = t0 + (i / offered) * 1000;
    const wait = due - performance.now();
    if (wait > 1) await new Promise((r) => setTimeout(r, wait));
    inFlight.push(request(server.url, body).then((r) => void results.push(r)));
  }
  const offerSeconds = (performance.now() - t0) / 1000;
  await Promise.all(inFlight);
  const drainSeconds = (performance.now() - t0) / 1000;
  probing = false;
  await prober;
  clearInterval(sampler);
  const hwm = memory(server.pid)?.hwm ?? NaN;
  await server.stop();
  agent.destroy();

  const admitted = results.filter((r) => r.status === 200);
  const refused = results.filter((r) => r.status === 429);
  const other = results.length - admitted.length - refused.length;
  const report = {
    config: { concurrency, maxTokens, maxQueue: Number(values['max-queue']), seconds, factor, cpus: os.cpus().length },
    sustained: { requestsPerSecond: sustained, p50Ms: percentile(closed, 50), p99Ms: percentile(closed, 99), completed: closed.length },
    overload: {
      offeredPerSecond: offered,
      offeredAchievedPerSecond: results.length / offerSeconds,
      requests: results.length,
      admitted: admitted.length,
      refused429: refused.length,
      other,
      share429: refused.length / results.length,
      admittedPerSecond: admitted.length / drainSeconds,
      admittedP50Ms: percentile(admitted.map((r) => r.ms), 50),
      admittedP99Ms: percentile(admitted.map((r) => r.ms), 99),
      admittedMaxMs: Math.max(...admitted.map((r) => r.ms)),
      refusedP99Ms: percentile(refused.map((r) => r.ms), 99),
      retryAfterPresent: refused.every((r) => Number(r.retryAfter) >= 1),
      healthMetricsProbes: probes.length,
      healthMetricsFailures: probeFailures,
      healthMetricsMaxMs: Math.max(...probes),
    },
    memoryMiB: { idleRss, peakRssSustained: rssAfterSustained, peakRssSampled: peakRss, vmHwm: hwm },
  };
  if (values.json) {
    console.log(JSON.stringify(report, null, 2));
    return;
  }
  const f = (n: number, d = 1) => (Number.isFinite(n) ? n.toFixed(d) : '-');
  const o = report.overload;
  console.log(`tally overload bench — ${os.cpus().length} CPUs, max-num-seqs ${concurrency}, max-queue ${values['max-queue']}, max_tokens ${maxTokens}, ${seconds} s per phase`);
  console.log(`sustained (closed loop, ${concurrency} clients): ${f(sustained)} req/s, p50 ${f(report.sustained.p50Ms, 0)} ms, p99 ${f(report.sustained.p99Ms, 0)} ms`);
  console.log(`overload (open loop at ${factor}× = ${f(offered)} req/s offered, ${f(o.offeredAchievedPerSecond)} achieved): ${o.requests} requests`);
  console.log(`  admitted ${o.admitted} (${f(o.admittedPerSecond)} req/s), 429 ${o.refused429} (${f(100 * o.share429)} %, Retry-After on all: ${o.retryAfterPresent}), other ${o.other}`);
  console.log(`  admitted latency p50 ${f(o.admittedP50Ms, 0)} ms, p99 ${f(o.admittedP99Ms, 0)} ms, max ${f(o.admittedMaxMs, 0)} ms; 429 p99 ${f(o.refusedP99Ms, 0)} ms`);
  console.log(`  /health + /metrics: ${o.healthMetricsProbes} probes, ${o.healthMetricsFailures} failed, slowest ${f(o.healthMetricsMaxMs, 0)} ms`);
  console.log(`memory (server RSS): idle ${f(idleRss, 0)} MiB, peak while sustained ${f(rssAfterSustained, 0)} MiB, peak overall ${f(peakRss, 0)} MiB (VmHWM ${f(hwm, 0)} MiB)`);
}

await main();
