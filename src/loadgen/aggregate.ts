/**
 * A load point's figures from its request records: a pure function, exactly testable.
 *
 *   duration      first send → end of the last request
 *   throughput    completed requests, and their prompt / completion tokens, per second of the duration
 *   ttft          per completed request: send → first chunk with generated text
 *   tpot          per completed request with ≥ 2 output tokens: (last text chunk − first) / (tokens − 1)
 *   itl           all gaps between successive text chunks of completed requests, pooled
 *   e2e           per completed request: send → end of the response
 *   hit rate      cached prompt tokens over the prompt tokens of the completed requests that report them
 * Failed requests count in `requests.failed` and `errors` only. Token figures are always the tokens
 * received (usage, else counted); `asked` compares them with what exact-length requests asked for.
 */
import { summarize, type Summary } from './stats.ts';
import { ERROR_KINDS, type ErrorKind, type RequestRecord } from './types.ts';

export interface ErrorSample {
  kind: ErrorKind;
  message: string;
  count: number;
}

export interface PointStats {
  duration_s: number;
  requests: { sent: number; completed: number; failed: number };
  errors: Record<ErrorKind, number>;
  /** Distinct error messages, most frequent first (at most 8). */
  error_samples: ErrorSample[];
  tokens: {
    input: number;
    output: number;
    /** Completed requests whose counts came from the server's usage (the rest were counted by chunks). */
    from_usage: number;
    /** Completed requests with no known prompt length (no usage, no planned length); their input counts 0. */
    input_unknown: number;
    /** Prompt tokens the server took from its prefix cache, and their share of the prompt tokens of the requests
     * that report them (usage.prompt_tokens_details.cached_tokens); null where none does. */
    cached_input: number;
    prefix_cache_hit_rate: number | null;
  };
  throughput: { requests_per_s: number; input_tokens_per_s: number; output_tokens_per_s: number; total_tokens_per_s: number };
  latency_ms: { ttft: Summary; tpot: Summary; itl: Summary; e2e: Summary };
  /**
   * Engine-seconds the server metered (device-seconds over its device count), when every completed
   * request reported them; null otherwise.
   */
  server: { prefill_s: number; decode_s: number } | null;
  /**
   * Completed requests that asked for an exact output length (ignore_eos + min_tokens): how many tokens
   * they asked for and received, and how many came back shorter (a server that ignores those fields).
   */
  asked: { requests: number; output_tokens: number; received: number; short: number } | null;
  /** Requests sent again on a fresh connection after the server closed a reused one before answering. */
  retried: number;
  /** Sums over completed requests, for splitting cost by time when the server reports nothing. */
  client_split: { ttft_ms: number; e2e_ms: number };
}

export function aggregate(records: readonly RequestRecord[], durationMs: number, percentiles: readonly number[]): PointStats {
  const ok = records.filter((r) => r.ok);
  const errors = Object.fromEntries(ERROR_KINDS.map((k) => [k, 0])) as Record<ErrorKind, number>;
  const samples = new Map<string, ErrorSample>();
  for (const r of records) {
    if (r.ok || !r.error) continue;
    errors[r.error.kind]++;
    const key = `${r.error.kind}\u0000${r.error.message}`;
    const s = samples.get(key);
    if (s) s.count++;
    else samples.set(key, { kind: r.error.kind, message: r.error.message, count: 1 });
  }
  let input = 0;
  let output = 0;
  let fromUsage = 0;
  let inputUnknown = 0;
  let cached = 0;
  let cacheReported = 0;
  let ttftSum = 0;
  let e2eSum = 0;
  const ttft: number[] = [];
  const tpot: number[] = [];
  const itl: number[] = [];
  const e2e: number[] = [];
  let serverOk = ok.length > 0;
  let prefill = 0;
  let decode = 0;
  const asked = { requests: 0, output_tokens: 0, received: 0, short: 0 };
  let retried = 0;
  for (const r of records) if (r.retries) retried++;
  for (const r of ok) {
    if (r.promptTokens === undefined) inputUnknown++;
    input += r.promptTokens ?? 0;
    const out = r.completionTokens ?? 0;
    output += out;
    if (r.tokensFrom === 'usage') fromUsage++;
    if (r.plannedOutput !== undefined) {
      asked.requests++;
      asked.output_tokens += r.plannedOutput;
      asked.received += out;
      if (out < r.plannedOutput) asked.short++;
    }
    if (r.cachedTokens !== undefined) {
      cached += r.cachedTokens;
      cacheReported += r.promptTokens ?? 0;
    }
    if (r.ttftMs !== undefined) {
      ttft.push(r.ttftMs);
      ttftSum += r.ttftMs;
    }
    if (r.ttftMs !== undefined && r.lastTokenMs !== undefined && out > 1) tpot.push((r.lastTokenMs - r.ttftMs) / (out - 1));
    itl.push(...r.itlMs);
    if (r.e2eMs !== undefined) {
      e2e.push(r.e2eMs);
      e2eSum += r.e2eMs;
    }
    if (r.serverCost) {
      prefill += r.serverCost.prefill / r.serverCost.devices;
      decode += r.serverCost.decode / r.serverCost.devices;
    } else serverOk = false;
  }
  const seconds = Math.max(0, durationMs) / 1000;
  const rate = (n: number) => (seconds > 0 ? n / seconds : 0);
  return {
    duration_s: seconds,
    requests: { sent: records.length, completed: ok.length, failed: records.length - ok.length },
    errors,
    error_samples: [...samples.values()].sort((a, b) => b.count - a.count).slice(0, 8),
    tokens: { input, output, from_usage: fromUsage, input_unknown: inputUnknown, cached_input: cached, prefix_cache_hit_rate: cacheReported > 0 ? cached / cacheReported : null },
    throughput: { requests_per_s: rate(ok.length), input_tokens_per_s: rate(input), output_tokens_per_s: rate(output), total_tokens_per_s: rate(input + output) },
    latency_ms: {
      ttft: summarize(ttft, percentiles),
      tpot: summarize(tpot, percentiles),
      itl: summarize(itl, percentiles),
      e2e: summarize(e2e, percentiles),
    },
    server: serverOk ? { prefill_s: prefill, decode_s: decode } : null,
    asked: asked.requests > 0 ? asked : null,
    retried,
    client_split: { ttft_ms: ttftSum, e2e_ms: e2eSum },
  };
}
