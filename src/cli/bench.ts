/** `tally bench`: load an OpenAI-compatible server, measure latency and throughput, and price the tokens. */
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { parseDuration } from '../meter/cost-report.ts';
import { DEFAULT_API_MODELS, DEVICE_PRESETS, resolveDevicePrice } from '../meter/prices.ts';
import type { InputShareSpec } from '../loadgen/cost.ts';
import { parseSharedPrefix, readDataset, type DatasetEntry, type SharedPrefixSpec } from '../loadgen/prompts.ts';
import { compareReports, runCompare } from '../loadgen/compare.ts';
import { ProgressBar, renderCompareTable, renderTable } from '../loadgen/report-text.ts';
import { renderCompareHtml, renderHtml } from '../loadgen/report-html.ts';
import type { LoadProgress } from '../loadgen/load.ts';
import { type BenchConfig, runBench } from '../loadgen/run.ts';
import type { LoadPointSpec } from '../loadgen/types.ts';

export const BENCH_HELP = `tally bench — throughput, latency and cost of any OpenAI-compatible server (Tally, vLLM, llama.cpp, TGI, hosted APIs)

Target
  --url URL                    the server's root (a trailing /v1 is fine)                          (required)
                               repeat it to compare servers side by side: the same workload against
                               each, interleaved load point by load point, one table and one report
  --name NAME                  what the reports call the server (default host:port)
  --model NAME                 model id (default: the first of GET /v1/models)
  --api-key KEY                bearer key (default $OPENAI_API_KEY)
                               --name, --model, --api-key, --device-price and --devices take one value
                               for every --url, or one per --url in the same order
  --endpoint completions|chat  default completions; chat for a dataset with "messages"

Load (each value is one load point; both lists may be given)
  --concurrency 1,8,32         closed loop: N clients, each sending its next request when one ends
  --rate 1,2,4                 open loop: Poisson arrivals at R requests/s ("inf": all at once)
  --max-concurrency N          rate mode: at most N requests in flight (arrivals wait for a slot)
  --requests N                 requests per load point (default 100 when --duration is not given)
  --duration 60s               per load point: stop sending after this long (s, m, h; a bare number is s);
                               with --requests too, whichever comes first. Requests in flight finish.
  --warmup N                   requests before the first load point, not measured (default 2)
  --timeout SECONDS            per request (default 600)
  --seed N                     prompts, lengths and arrivals (default 0)

Prompts
  --input-len N                synthetic prompt tokens (default 128)
  --input-len-spread F         lengths vary by ±F of N (default 0: fixed)
  --output-len N               max_tokens (default 128)
  --output-len-spread F        likewise for output
  --length-dist uniform|normal uniform in [N(1-F), N(1+F)] (default) or normal with σ = F·N
  --shared-prefix N:L          N prompt prefixes of L tokens (a long system prompt), each request one of them
                               followed by its --input-len tokens; the report gives the prefix-cache hit rate
                               (cached prompt tokens over prompt tokens, from usage.prompt_tokens_details)
  --dataset FILE               JSONL: {"prompt": "..."} or {"messages": [...]}, optional "max_tokens"
  --tokenizer DIR              the model's tokenizer.json folder, for exact synthetic lengths
                               (default: the server's /tokenize when it has one)
  --prompt-format auto|ids|text  auto: token-id prompts when a tokenizer is known and the server takes them
  --ignore-eos auto|on|off     send ignore_eos + min_tokens so outputs are exactly max_tokens long
                               (auto: for synthetic prompts, unless the server refuses them)

Cost
  --device-price USD|PRESET    USD per device-hour, or one of ${Object.keys(DEVICE_PRESETS).join(', ')}
                               (default: cpu-2core)
  --devices N                  devices the server runs on (default 1)
  --input-cost-share auto|ttft|F  how the devices' cost splits between input and output tokens:
                               auto (default): the server's prefill vs decode device-seconds where it reports
                               them (Tally's usage.cost), else ttft; ttft: Σ TTFT / Σ end-to-end over requests;
                               F: a fixed fraction 0..1
  --api-models a:b,c:d         API models to compare (genai-prices "provider:model"; default ${DEFAULT_API_MODELS.length} models)

Output
  --percentiles 50,90,99       latency percentiles (linear interpolation, numpy's default)
  --json FILE                  the full result
  --html FILE                  a self-contained report with plots
  --detailed                   keep every request's timings in the JSON
  --progress | --no-progress   progress bar on stderr (default: when stderr is a terminal)

Compare saved reports
  tally bench compare A.json B.json [--json FILE] [--html FILE]
                               put --json reports side by side (ratios over the first)

Exit status: 0 when some measured request completed, 1 when none did (the report still lists the errors), 2 for bad options.`;

export interface BenchIo {
  out: (text: string) => void;
  err: { write(text: string): unknown; isTTY?: boolean };
}

const stdio: BenchIo = { out: (t) => process.stdout.write(t), err: process.stderr };

class UsageError extends Error {}

function list(value: string | undefined, flag: string, parse: (s: string) => number, check: (n: number) => boolean): number[] | undefined {
  if (value === undefined) return undefined;
  const items = value.split(',').map((s) => s.trim()).filter(Boolean);
  const out = items.map((s) => {
    const n = parse(s);
    if (!check(n)) throw new UsageError(`${flag}: "${s}" is not valid`);
    return n;
  });
  if (out.length === 0) throw new UsageError(`${flag} needs at least one value`);
  return out;
}

function num(value: string | undefined, flag: string, check: (n: number) => boolean, what: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || !check(n)) throw new UsageError(`${flag} must be ${what} (got "${value}")`);
  return n;
}

const positiveInt = (n: number) => Number.isInteger(n) && n > 0;

function choice<T extends string>(value: string | undefined, flag: string, options: readonly T[], fallback: T): T {
  if (value === undefined) return fallback;
  if (!options.includes(value as T)) throw new UsageError(`${flag} must be one of ${options.join(', ')} (got "${value}")`);
  return value as T;
}

/** Options → BenchConfig plus output settings; throws UsageError on bad options. */
export function parseBenchArgs(argv: string[], env: NodeJS.ProcessEnv = process.env) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    strict: true,
    options: {
      url: { type: 'string', multiple: true },
      name: { type: 'string', multiple: true },
      model: { type: 'string', multiple: true },
      'api-key': { type: 'string', multiple: true },
      endpoint: { type: 'string' },
      concurrency: { type: 'string' },
      rate: { type: 'string' },
      'max-concurrency': { type: 'string' },
      requests: { type: 'string' },
      duration: { type: 'string' },
      warmup: { type: 'string' },
      timeout: { type: 'string' },
      seed: { type: 'string' },
      'input-len': { type: 'string' },
      'input-len-spread': { type: 'string' },
      'output-len': { type: 'string' },
      'output-len-spread': { type: 'string' },
      'length-dist': { type: 'string' },
      dataset: { type: 'string' },
      'shared-prefix': { type: 'string' },
      tokenizer: { type: 'string' },
      'prompt-format': { type: 'string' },
      'ignore-eos': { type: 'string' },
      'device-price': { type: 'string', multiple: true },
      devices: { type: 'string', multiple: true },
      'input-cost-share': { type: 'string' },
      'api-models': { type: 'string' },
      percentiles: { type: 'string' },
      json: { type: 'string' },
      html: { type: 'string' },
      detailed: { type: 'boolean' },
      progress: { type: 'boolean' },
      'no-progress': { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) return { help: true as const };
  if (positionals.length > 0) throw new UsageError(`unexpected argument "${positionals[0]}"`);
  const urls = values.url ?? [];
  if (urls.length === 0) throw new UsageError('--url is required');
  for (const url of urls) {
    try {
      const u = new URL(url);
      if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error();
    } catch {
      throw new UsageError(`--url must be an http(s) URL (got "${url}")`);
    }
  }
  /** One value for every --url, or one per --url. */
  const perUrl = (flag: string, given: string[] | undefined): (string | undefined)[] => {
    if (given === undefined || given.length === 0) return urls.map(() => undefined);
    if (given.length === 1) return urls.map(() => given[0]);
    if (given.length !== urls.length) throw new UsageError(`${flag} was given ${given.length} times for ${urls.length} --url: give it once, or once per --url`);
    return given;
  };

  const concurrency = list(values.concurrency, '--concurrency', Number, positiveInt);
  const rate = list(values.rate, '--rate', (s) => (s.toLowerCase() === 'inf' ? Infinity : Number(s)), (n) => n > 0 && !Number.isNaN(n));
  const points: LoadPointSpec[] = [
    ...(concurrency ?? []).map((value) => ({ mode: 'concurrency' as const, value })),
    ...(rate ?? []).map((value) => ({ mode: 'rate' as const, value })),
  ];
  if (points.length === 0) points.push({ mode: 'concurrency', value: 1 });

  let durationMs: number | undefined;
  if (values.duration !== undefined) {
    const bare = Number(values.duration);
    durationMs = values.duration.trim() !== '' && Number.isFinite(bare) && bare > 0 ? bare * 1000 : parseDuration(values.duration);
    if (durationMs === undefined) throw new UsageError(`--duration takes a duration like 60s, 5m or 30 (got "${values.duration}")`);
  }
  let requests = num(values.requests, '--requests', positiveInt, 'a positive integer');
  if (requests === undefined && durationMs === undefined) requests = 100;
  if (requests === undefined && points.some((p) => p.value === Infinity)) throw new UsageError('--rate inf needs --requests');

  const spread = (v: string | undefined, flag: string) => num(v, flag, (n) => n >= 0 && n < 1, 'a fraction in [0, 1)') ?? 0;
  const dist = choice(values['length-dist'], '--length-dist', ['uniform', 'normal'] as const, 'uniform');
  const input = { mean: num(values['input-len'], '--input-len', positiveInt, 'a positive integer') ?? 128, spread: spread(values['input-len-spread'], '--input-len-spread'), dist };
  const output = { mean: num(values['output-len'], '--output-len', positiveInt, 'a positive integer') ?? 128, spread: spread(values['output-len-spread'], '--output-len-spread'), dist };

  let dataset: DatasetEntry[] | undefined;
  if (values.dataset !== undefined) {
    try {
      dataset = readDataset(values.dataset);
    } catch (err) {
      throw new UsageError(`--dataset: ${(err as Error).message}`);
    }
  }
  let sharedPrefix: SharedPrefixSpec | undefined;
  if (values['shared-prefix'] !== undefined) {
    if (dataset) throw new UsageError('--shared-prefix builds synthetic prompts: leave out --dataset');
    try {
      sharedPrefix = parseSharedPrefix(values['shared-prefix']);
    } catch (err) {
      throw new UsageError((err as Error).message);
    }
  }
  const endpoint = values.endpoint === undefined ? undefined : choice(values.endpoint, '--endpoint', ['completions', 'chat'] as const, 'completions');
  if (endpoint === 'completions' && dataset?.some((e) => e.messages)) throw new UsageError('the dataset has "messages" lines: use --endpoint chat (or leave --endpoint out)');

  const prices = perUrl('--device-price', values['device-price']).map((v) => {
    try {
      return resolveDevicePrice(v);
    } catch (err) {
      throw new UsageError((err as Error).message);
    }
  });
  const deviceCounts = perUrl('--devices', values.devices).map((v) => num(v, '--devices', positiveInt, 'a positive integer') ?? 1);
  const names = perUrl('--name', values.name);
  const models = perUrl('--model', values.model);
  const keys = perUrl('--api-key', values['api-key']);
  let inputShare: InputShareSpec = { kind: 'auto' };
  const share = values['input-cost-share'];
  if (share === 'ttft') inputShare = { kind: 'ttft' };
  else if (share !== undefined && share !== 'auto') inputShare = { kind: 'fixed', value: num(share, '--input-cost-share', (n) => n >= 0 && n <= 1, 'auto, ttft or a fraction in [0, 1]')! };

  const percentiles = list(values.percentiles, '--percentiles', Number, (n) => n >= 0 && n <= 100) ?? [50, 90, 99];
  percentiles.sort((a, b) => a - b);
  const apiModels = values['api-models'] === undefined ? DEFAULT_API_MODELS : values['api-models'].split(',').map((s) => s.trim()).filter(Boolean);

  const shared = {
    endpoint,
    points,
    bounds: { requests, durationMs, maxConcurrency: num(values['max-concurrency'], '--max-concurrency', positiveInt, 'a positive integer') },
    warmup: num(values.warmup, '--warmup', (n) => Number.isInteger(n) && n >= 0, 'a non-negative integer') ?? 2,
    input,
    output,
    dataset,
    datasetFile: values.dataset,
    sharedPrefix,
    tokenizerDir: values.tokenizer,
    promptFormat: choice(values['prompt-format'], '--prompt-format', ['auto', 'ids', 'text'] as const, 'auto'),
    exactOutput: choice(values['ignore-eos'], '--ignore-eos', ['auto', 'on', 'off'] as const, 'auto'),
    inputShare,
    apiModels,
    percentiles,
    timeoutMs: (num(values.timeout, '--timeout', (n) => n > 0, 'a positive number of seconds') ?? 600) * 1000,
    seed: num(values.seed, '--seed', Number.isInteger, 'an integer') ?? 0,
    detailed: values.detailed ?? false,
  };
  const configs: BenchConfig[] = urls.map((url, i) => ({
    ...shared,
    url,
    name: names[i],
    apiKey: keys[i] ?? env.OPENAI_API_KEY,
    model: models[i],
    pricing: { name: prices[i].name, usdPerHour: prices[i].usdPerHour, devices: deviceCounts[i], source: prices[i].source },
  }));
  const config = configs[0];
  const progress = values['no-progress'] ? false : values.progress ? true : undefined;
  return { help: false as const, config, configs, json: values.json, html: values.html, progress, defaultPrice: values['device-price'] === undefined };
}

function write(file: string, text: string): void {
  const dir = dirname(file);
  if (dir && dir !== '.') mkdirSync(dir, { recursive: true });
  writeFileSync(file, text);
}

/** `tally bench compare A.json B.json [--json FILE] [--html FILE]`. */
async function runCompareCommand(argv: string[], io: BenchIo): Promise<number> {
  let values;
  let files: string[];
  try {
    const parsed = parseArgs({ args: argv, allowPositionals: true, strict: true, options: { json: { type: 'string' }, html: { type: 'string' }, help: { type: 'boolean', short: 'h' } } });
    values = parsed.values;
    files = parsed.positionals;
    if (values.help) {
      io.out(`${BENCH_HELP}\n`);
      return 0;
    }
    if (files.length === 0) throw new UsageError('compare needs the --json reports to compare');
  } catch (err) {
    io.err.write(`tally bench compare: ${(err as Error).message}\n`);
    return 2;
  }
  let cmp;
  try {
    cmp = compareReports(files);
  } catch (err) {
    io.err.write(`tally bench compare: ${(err as Error).message}\n`);
    return 2;
  }
  io.out(renderCompareTable(cmp));
  try {
    if (values.json) write(values.json, `${JSON.stringify(cmp, null, 2)}\n`);
    if (values.html) write(values.html, renderCompareHtml(cmp));
  } catch (err) {
    io.err.write(`tally bench compare: ${(err as Error).message}\n`);
    return 1;
  }
  return 0;
}

/** `tally bench`; returns the exit code. */
export async function runBenchCommand(argv: string[], io: BenchIo = stdio): Promise<number> {
  if (argv[0] === 'compare') return runCompareCommand(argv.slice(1), io);
  let parsed;
  try {
    parsed = parseBenchArgs(argv);
  } catch (err) {
    io.err.write(`tally bench: ${(err as Error).message}\n\nRun \`tally bench --help\` for the options.\n`);
    return 2;
  }
  if (parsed.help) {
    io.out(`${BENCH_HELP}\n`);
    return 0;
  }
  const { config, configs } = parsed;
  const showProgress = parsed.progress ?? Boolean(io.err.isTTY);
  const bar = showProgress ? new ProgressBar(io.err, config.bounds) : undefined;
  const onProgress = (label: string, p: LoadProgress) => bar?.update(p, label === 'warmup' ? config.warmup : config.bounds.requests);
  const priceNote = (pricing: BenchConfig['pricing']) => `No --device-price: priced at the ${pricing.name} preset, ${pricing.usdPerHour} USD/hour.`;
  let text: string;
  let json: unknown;
  let html: () => string;
  let completed: boolean;
  try {
    if (configs.length > 1) {
      const cmp = await runCompare(configs, {
        onPointStart: (server, label, i, count) => bar?.start(`${server} ${label}`, i, count),
        onProgress,
      });
      if (parsed.defaultPrice) for (const r of cmp.runs) r.notes.push(priceNote(config.pricing));
      text = renderCompareTable(cmp);
      json = cmp;
      html = () => renderCompareHtml(cmp);
      completed = cmp.runs.every((r) => r.points.some((p) => p.stats.requests.completed > 0));
    } else {
      const result = await runBench(config, { onPointStart: (label, i, count) => bar?.start(label, i, count), onProgress });
      if (parsed.defaultPrice) result.notes.push(priceNote(config.pricing));
      text = renderTable(result);
      json = result;
      html = () => renderHtml(result);
      completed = result.points.some((p) => p.stats.requests.completed > 0);
    }
  } catch (err) {
    bar?.finish();
    io.err.write(`tally bench: ${(err as Error).message}\n`);
    return 1;
  } finally {
    bar?.finish();
  }
  io.out(text);
  try {
    if (parsed.json) write(parsed.json, `${JSON.stringify(json, null, 2)}\n`);
    if (parsed.html) write(parsed.html, html());
  } catch (err) {
    io.err.write(`tally bench: ${(err as Error).message}\n`);
    return 1;
  }
  return completed ? 0 : 1;
}
