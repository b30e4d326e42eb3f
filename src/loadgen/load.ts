/**
 * Load generation: a closed loop at fixed concurrency (each of C clients sends its next request when
 * the previous one ends), or an open loop of Poisson arrivals at a rate (exponential gaps, seeded),
 * optionally capped at a maximum concurrency (an arrival then waits for a free slot, as vLLM's
 * --max-concurrency does). A point stops issuing when --requests have been sent or --duration has
 * passed, whichever comes first, and then waits for the requests in flight.
 */
import { exponentialGap, seededRandom } from './stats.ts';
import { sendStreaming, type Target } from './client.ts';
import type { ConnectionPool } from './http1.ts';
import type { LoadPointSpec, RequestRecord, RequestSpec } from './types.ts';

export interface LoadBounds {
  requests?: number;
  durationMs?: number;
  /** Rate mode: at most this many requests in flight. */
  maxConcurrency?: number;
}

export interface LoadProgress {
  sent: number;
  done: number;
  failed: number;
  elapsedMs: number;
}

export interface LoadPointRun {
  records: RequestRecord[];
  /** performance.now() at the start and at the end of the last request. */
  startMs: number;
  endMs: number;
  /** Wall-clock start, ms since epoch. */
  startedAt: number;
}

export type Sender = (spec: RequestSpec, originMs: number) => Promise<RequestRecord>;

export function httpSender(target: Target, pool: ConnectionPool, keepText = false): Sender {
  return (spec, originMs) => sendStreaming(target, spec, pool, { originMs, keepText });
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, Math.max(0, ms)));

export async function runLoadPoint(
  point: LoadPointSpec,
  bounds: LoadBounds,
  prompts: RequestSpec[],
  send: Sender,
  options: { seed?: number; onProgress?: (p: LoadProgress) => void } = {},
): Promise<LoadPointRun> {
  if (prompts.length === 0) throw new Error('no prompts');
  if (bounds.requests === undefined && bounds.durationMs === undefined) throw new Error('a load point needs --requests or --duration');
  const records: RequestRecord[] = [];
  const startedAt = Date.now();
  const start = performance.now();
  let sent = 0;
  let done = 0;
  let failed = 0;
  let last = start;
  const progress = () => options.onProgress?.({ sent, done, failed, elapsedMs: performance.now() - start });
  const mayIssue = () => (bounds.requests === undefined || sent < bounds.requests) && (bounds.durationMs === undefined || performance.now() - start < bounds.durationMs);
  const issue = async () => {
    const spec = prompts[sent % prompts.length];
    sent++;
    progress();
    const record = await send(spec, start);
    records.push(record);
    done++;
    if (!record.ok) failed++;
    last = Math.max(last, performance.now());
    progress();
  };

  if (point.mode === 'concurrency') {
    const worker = async () => {
      while (mayIssue()) await issue();
    };
    await Promise.all(Array.from({ length: point.value }, worker));
  } else {
    const rand = seededRandom(options.seed ?? 0);
    const cap = bounds.maxConcurrency ?? Infinity;
    const inFlight = new Set<Promise<void>>();
    let nextAt = start;
    while (true) {
      if (Number.isFinite(point.value)) {
        nextAt += exponentialGap(rand(), point.value) * 1000;
        if (bounds.durationMs !== undefined && nextAt - start >= bounds.durationMs) break;
        await sleep(nextAt - performance.now());
      }
      while (inFlight.size >= cap) await Promise.race(inFlight);
      if (!mayIssue()) break;
      const p: Promise<void> = issue().finally(() => inFlight.delete(p));
      inFlight.add(p);
    }
    await Promise.all(inFlight);
  }
  records.sort((a, b) => a.startMs - b.startMs);
  return { records, startMs: start, endMs: last, startedAt };
}
