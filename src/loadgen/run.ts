/**
 * A benchmark run: probe the server, warm it up, then each load point in turn; the result is the JSON
 * report (see BenchResult), from which the terminal table and the HTML report are rendered.
 */
import { HOURS_PER_MONTH } from '../meter/cost-math.ts';
import { aggregate, type PointStats } from './aggregate.ts';
import { makePool, normalizeBaseUrl, requestJson, sendStreaming, type Target } from './client.ts';
import { type BenchPricing, type InputShareSpec, pointCost, type PointCost } from './cost.ts';
import { httpSender, type LoadBounds, type LoadProgress, runLoadPoint } from './load.ts';
import { type BenchTokenizer, type DatasetEntry, type LengthSpec, localTokenizer, PromptSource, serverTokenizer, type SharedPrefixSpec } from './prompts.ts';
import type { LoadPointSpec, RequestRecord } from './types.ts';

export interface BenchConfig {
  url: string;
  /** What reports call this server (default: its host:port). */
  name?: string;
  apiKey?: string;
  /** Undefined: the first model of GET /v1/models. */
  model?: string;
  /** Undefined: chat when the dataset has messages, else completions. */
  endpoint?: 'completions' | 'chat';
  points: LoadPointSpec[];
  bounds: LoadBounds;
  warmup: number;
  input: LengthSpec;
  output: LengthSpec;
  dataset?: DatasetEntry[];
  datasetFile?: string;
  /** N prompt prefixes of L tokens, each reused by many requests (synthetic prompts only). */
  sharedPrefix?: SharedPrefixSpec;
  tokenizerDir?: string;
  promptFormat: 'auto' | 'ids' | 'text';
  /** ignore_eos + min_tokens: auto sends them for synthetic prompts unless the server refuses them. */
  exactOutput: 'auto' | 'on' | 'off';
  pricing: BenchPricing;
  inputShare: InputShareSpec;
  apiModels: string[];
  percentiles: number[];
  timeoutMs: number;
  seed: number;
  /** Keep every request's record in the result. */
  detailed: boolean;
}

export interface PointResult {
  mode: LoadPointSpec['mode'];
  /** Concurrency or requests per second; 'inf' for all at once. */
  value: number | 'inf';
  label: string;
  started_at: string;
  stats: PointStats;
  cost: PointCost;
  /**
   * The bench's own CPU (user + system, this process) while the point ran, per 1,000 output tokens
   * received: on a small machine the load generator takes CPU from the server it measures.
   */
  client: {
    cpu_s: number;
    cpu_s_per_1k_tokens: number | null;
    /** Connections opened, requests sent on a kept-alive one, and whether the server kept them (see http1.ts). */
    connections: { opened: number; reused: number; closed_by_server: number; kept_alive: boolean };
  };
  records?: RequestRecord[];
}

export interface BenchResult {
  tool: 'tally bench';
  started_at: string;
  finished_at: string;
  target: { url: string; name: string; model: string; endpoint: 'completions' | 'chat'; api_key: boolean };
  server: {
    models: string[] | null;
    tokenizer: BenchTokenizer['source'] | null;
    prompt_format: 'ids' | 'text' | 'dataset';
    exact_output: boolean;
    include_usage: boolean;
    /** How output tokens are known: the server's usage, the bench's tokenizer over the text, or text chunks. */
    output_tokens_from: 'usage' | 'tokenizer' | 'chunks';
    reports_cost: boolean;
    probe: { ok: boolean; attempts: number; error?: string };
  };
  config: {
    points: { mode: string; value: number | 'inf' }[];
    requests: number | null;
    duration_s: number | null;
    max_concurrency: number | null;
    warmup: number;
    input_len: LengthSpec | null;
    output_len: LengthSpec;
    dataset: string | null;
    shared_prefix: SharedPrefixSpec | null;
    percentiles: number[];
    timeout_s: number;
    seed: number;
    input_cost_share: string;
    api_models: string[];
  };
  pricing: { device: string; usd_per_device_hour: number; devices: number; source: string | null; hours_per_month: number };
  notes: string[];
  /** Probe and warm-up requests (not in any load point, but metered by the server). */
  unmeasured: PointStats;
  points: PointResult[];
  /** Every request the run sent: probe, warm-up and load points; comparable with the server's own totals. */
  totals: PointStats;
  totals_cost: PointCost;
}

export interface BenchHooks {
  onPointStart?: (label: string, index: number, count: number) => void;
  onProgress?: (label: string, p: LoadProgress) => void;
  onPointEnd?: (point: PointResult) => void;
}

export const pointLabel = (p: LoadPointSpec) => (p.mode === 'concurrency' ? `c=${p.value}` : Number.isFinite(p.value) ? `r=${p.value}/s` : 'r=inf');

/** Prompts built per load point when only --duration bounds it (they cycle if the point sends more). */
const DURATION_POOL = 256;

/** A prepared run: probed and warmed up, its load points run one at a time (so that runs can interleave). */
export interface BenchSession {
  readonly points: number;
  runPoint(index: number): Promise<PointResult>;
  /** The result over the points run so far. */
  result(): BenchResult;
}

export async function runBench(config: BenchConfig, hooks: BenchHooks = {}): Promise<BenchResult> {
  const session = await prepareBench(config, hooks);
  for (let i = 0; i < session.points; i++) await session.runPoint(i);
  return session.result();
}

export async function prepareBench(config: BenchConfig, hooks: BenchHooks = {}): Promise<BenchSession> {
  const startedAt = new Date();
  const runStart = performance.now();
  const notes: string[] = [];
  const baseUrl = normalizeBaseUrl(config.url);
  const target: Target = { baseUrl, apiKey: config.apiKey, timeoutMs: config.timeoutMs };
  const unmeasured: RequestRecord[] = [];

  // 1. Models.
  const listed = await requestJson(target, 'GET', '/v1/models');
  const data = (listed.json as { data?: { id?: unknown }[] } | undefined)?.data;
  const models = listed.status === 200 && Array.isArray(data) ? data.map((m) => String(m.id)) : null;
  if (!models) notes.push(`GET /v1/models failed (${listed.error ?? `HTTP ${listed.status}`}).`);
  let model = config.model;
  if (model === undefined) {
    if (!models || models.length === 0) throw new Error('--model is needed: GET /v1/models did not list a model');
    model = models[0];
    notes.push(`Model "${model}", the first of GET /v1/models.`);
  } else if (models && !models.includes(model)) {
    notes.push(`GET /v1/models does not list "${model}" (it lists ${models.join(', ') || 'nothing'}).`);
  }
  const endpoint = config.endpoint ?? (config.dataset?.some((e) => e.messages) ? 'chat' : 'completions');
  if (endpoint === 'completions' && config.dataset?.some((e) => e.messages)) throw new Error('the dataset has "messages" lines: use --endpoint chat');

  // 2. Tokenizer.
  let tokenizer: BenchTokenizer | undefined;
  if (config.tokenizerDir) tokenizer = localTokenizer(config.tokenizerDir);
  else if (!config.dataset) {
    tokenizer = await serverTokenizer(target, model);
    if (!tokenizer) notes.push('The server has no /tokenize and no --tokenizer was given: synthetic prompt lengths are approximate (about 4 characters a token); token counts come from the server\'s usage.');
  }
  let format: 'ids' | 'text' = config.promptFormat === 'text' || endpoint === 'chat' || !tokenizer ? 'text' : 'ids';
  if (config.promptFormat === 'ids' && format !== 'ids') notes.push(`--prompt-format ids needs /v1/completions and a tokenizer; sending text.`);
  let exact = config.exactOutput === 'on' || (config.exactOutput === 'auto' && !config.dataset);
  let includeUsage = true;

  // 3. Probe: one short request; drop what the server refuses (ignore_eos/min_tokens, token-id prompts, stream_options).
  const probeSource = (f: 'ids' | 'text', e: boolean, u: boolean) =>
    new PromptSource({ model: model!, endpoint, format: f, tokenizer, exactOutput: e, includeUsage: u, seed: config.seed + 7919, input: { mean: 8, spread: 0, dist: 'uniform' }, output: { mean: 2, spread: 0, dist: 'uniform' }, dataset: config.dataset?.slice(0, 1).map((d) => ({ ...d, max_tokens: 2 })) });
  const probePool = makePool(baseUrl);
  let attempts = 0;
  let probe: RequestRecord | undefined;
  for (;;) {
    attempts++;
    probe = await sendStreaming(target, await probeSource(format, exact, includeUsage).next(), probePool);
    unmeasured.push(probe);
    if (probe.ok || (probe.error?.kind !== 'http_4xx')) break;
    if (exact && config.exactOutput === 'auto') {
      exact = false;
      notes.push(`The server refused ignore_eos/min_tokens (${probe.error.message}); output lengths are at most --output-len.`);
    } else if (format === 'ids' && config.promptFormat === 'auto') {
      format = 'text';
      notes.push(`The server refused a token-id prompt (${probe.error.message}); sending text prompts.`);
    } else if (includeUsage) {
      includeUsage = false;
      notes.push(`The server refused stream_options (${probe.error.message}); output tokens are counted by chunks.`);
    } else break;
  }
  probePool.destroy();
  if (!probe.ok) notes.push(`The probe request failed (${probe.error!.kind}: ${probe.error!.message}); running anyway.`);
  else {
    if (probe.tokensFrom !== 'usage') notes.push(`The server sent no usage in the stream: input tokens are as planned${tokenizer ? '' : ', output tokens counted as text chunks'}.`);
    if (!probe.serverCost) notes.push('The server reports no per-request device-seconds: cost is split between input and output by ' + (config.inputShare.kind === 'fixed' ? `the given share ${config.inputShare.value}.` : 'the client-side time split (Σ TTFT / Σ end-to-end).'));
  }
  if (format === 'text' && !config.dataset && tokenizer && !tokenizer.decode) notes.push('The server has /tokenize but no /detokenize: text prompts are cut at about 4 characters a token, and their lengths are approximate.');
  if (format === 'text' && !config.dataset && endpoint === 'chat') notes.push('Chat prompts: --input-len counts the message text; the chat template adds tokens (input tokens are the server\'s count).');

  const source = new PromptSource({ model, endpoint, format, tokenizer, exactOutput: exact, includeUsage, seed: config.seed, input: config.input, output: config.output, dataset: config.dataset, sharedPrefix: config.sharedPrefix });
  const poolSize = config.bounds.requests ?? DURATION_POOL;

  // 4. Warm-up.
  if (config.warmup > 0) {
    const first = config.points[0];
    const concurrency = Math.max(1, Math.min(config.warmup, first?.mode === 'concurrency' ? first.value : (config.bounds.maxConcurrency ?? 1)));
    const pool = makePool(baseUrl);
    hooks.onPointStart?.('warmup', -1, config.points.length);
    const run = await runLoadPoint({ mode: 'concurrency', value: concurrency }, { requests: config.warmup }, await source.take(config.warmup), httpSender(target, pool), {
      onProgress: (p) => hooks.onProgress?.('warmup', p),
    });
    pool.destroy();
    unmeasured.push(...run.records);
  }

  // 5. Load points.
  const points: PointResult[] = [];
  const all: RequestRecord[] = [...unmeasured];
  // Without usage in the stream, output tokens are the generated text's tokens by the bench's tokenizer.
  const countText = tokenizer !== undefined && (!includeUsage || (probe.ok && probe.tokensFrom !== 'usage'));
  const outputFrom: BenchResult['server']['output_tokens_from'] = probe.ok && probe.tokensFrom === 'usage' ? 'usage' : countText ? 'tokenizer' : 'chunks';
  if (countText) notes.push(`Output tokens are counted by the ${tokenizer!.source === 'local' ? 'local tokenizer' : "server's /tokenize (after each load point)"} over the text received.`);
  const runPoint = async (i: number): Promise<PointResult> => {
    const point = config.points[i];
    const label = pointLabel(point);
    const prompts = await source.take(poolSize);
    const pool = makePool(baseUrl);
    hooks.onPointStart?.(label, i, config.points.length);
    const cpu = process.cpuUsage();
    const run = await runLoadPoint(point, config.bounds, prompts, httpSender(target, pool, countText), {
      seed: config.seed + i,
      onProgress: (p) => hooks.onProgress?.(label, p),
    });
    const used = process.cpuUsage(cpu);
    pool.destroy();
    for (const r of run.records) {
      if (r.text !== undefined && r.ok && r.tokensFrom === 'counted' && r.text.length > 0) {
        r.completionTokens = (await tokenizer!.encode(r.text, false)).length;
        r.tokensFrom = 'tokenizer';
      }
      delete r.text;
    }
    all.push(...run.records);
    const stats = aggregate(run.records, run.endMs - run.startMs, config.percentiles);
    const cpuS = (used.user + used.system) / 1e6;
    const result: PointResult = {
      mode: point.mode,
      value: Number.isFinite(point.value) ? point.value : 'inf',
      label,
      started_at: new Date(run.startedAt).toISOString(),
      stats,
      cost: pointCost(stats, config.pricing, config.inputShare, config.apiModels, run.startedAt),
      client: {
        cpu_s: cpuS,
        cpu_s_per_1k_tokens: stats.tokens.output > 0 ? cpuS / (stats.tokens.output / 1000) : null,
        connections: { opened: pool.opened, reused: pool.reused, closed_by_server: pool.closedByServer, kept_alive: pool.keepAlive },
      },
      ...(config.detailed ? { records: run.records } : {}),
    };
    const a = stats.asked;
    if (a && a.short > 0) {
      notes.push(`${label}: ${a.short} of ${a.requests} requests came back shorter than the output length asked (ignore_eos/min_tokens not honoured): ${a.received} of ${a.output_tokens} output tokens; the figures use the tokens received.`);
    }
    if (stats.retried > 0) {
      notes.push(`${label}: ${stats.retried} requests were sent again on a fresh connection: the server had closed their kept-alive connection before answering. Not errors; their times count from the first send.`);
    }
    if (!pool.keepAlive) {
      notes.push(`${label}: the server closed kept-alive connections without saying so (as llama.cpp's server does after every response), so the bench opened a connection per request (${pool.opened} opened).`);
    }
    points.push(result);
    hooks.onPointEnd?.(result);
    return result;
  };

  const finishResult = (): BenchResult => {
    if (source.inexact > 0) notes.push(`${source.inexact} synthetic prompts could not be built to their exact token length.`);
    const totals = aggregate(all, performance.now() - runStart, config.percentiles);
    const shareText = config.inputShare.kind === 'fixed' ? String(config.inputShare.value) : config.inputShare.kind;
    return {
      tool: 'tally bench',
      started_at: startedAt.toISOString(),
      finished_at: new Date().toISOString(),
      target: { url: baseUrl, name: config.name ?? new URL(baseUrl).host, model: model!, endpoint, api_key: Boolean(config.apiKey) },
      server: {
        models,
        tokenizer: tokenizer?.source ?? null,
        prompt_format: config.dataset ? 'dataset' : format,
        exact_output: exact,
        include_usage: includeUsage,
        output_tokens_from: outputFrom,
        reports_cost: probe.ok && probe.serverCost !== undefined,
        probe: { ok: probe.ok, attempts, ...(probe.error ? { error: `${probe.error.kind}: ${probe.error.message}` } : {}) },
      },
      config: {
        points: config.points.map((p) => ({ mode: p.mode, value: Number.isFinite(p.value) ? p.value : 'inf' })),
        requests: config.bounds.requests ?? null,
        duration_s: config.bounds.durationMs === undefined ? null : config.bounds.durationMs / 1000,
        max_concurrency: config.bounds.maxConcurrency ?? null,
        warmup: config.warmup,
        input_len: config.dataset ? null : config.input,
        output_len: config.output,
        dataset: config.datasetFile ?? null,
        shared_prefix: config.dataset ? null : (config.sharedPrefix ?? null),
        percentiles: config.percentiles,
        timeout_s: config.timeoutMs / 1000,
        seed: config.seed,
        input_cost_share: shareText,
        api_models: config.apiModels,
      },
      pricing: { device: config.pricing.name, usd_per_device_hour: config.pricing.usdPerHour, devices: config.pricing.devices, source: config.pricing.source ?? null, hours_per_month: HOURS_PER_MONTH },
      notes,
      unmeasured: aggregate(unmeasured, 0, config.percentiles),
      points,
      totals,
      totals_cost: pointCost(totals, config.pricing, config.inputShare, config.apiModels, startedAt.getTime()),
    };
  };
  return { points: config.points.length, runPoint, result: finishResult };
}
