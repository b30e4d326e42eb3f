/**
 * `tally serve`'s configuration: every option once, with its flag, environment variable, default, validation and
 * help line. The CLI parses flags and the environment into one ServeConfig here; `tally serve --help` is written
 * from the same table, and everything below the CLI receives the validated object.
 */
import { z } from 'zod';
import { type AttentionMode, type DeviceSpec, ENGINE_DEFAULTS, EngineOptionError, type EngineOptions, type KvCacheDtype, type RunnerChoice } from '../engine/protocol.ts';
import { TOOL_CALL_PARSERS } from '../server/tool-calls.ts';

const GIB = 2 ** 30;

const int = (min: number) => z.coerce.number().int().min(min);
const positive = z.coerce.number().positive();
const nonNegative = z.coerce.number().min(0);

/** cpu, auto, cuda, cuda:N. */
export function parseDevice(value: string): DeviceSpec {
  if (value === 'cpu') return { kind: 'cpu' };
  if (value === 'auto') return { kind: 'auto' };
  const m = /^cuda(?::(\d+))?$/.exec(value);
  if (m) return { kind: 'cuda', index: m[1] ? Number(m[1]) : 0 };
  throw new Error(`must be cpu, cuda, cuda:N or auto (got "${value}")`);
}

const device = z.string().transform((value, ctx) => {
  try {
    parseDevice(value);
  } catch (err) {
    ctx.addIssue({ code: 'custom', message: (err as Error).message });
  }
  return value;
});

const kvCacheDtype = z.enum(['auto', 'fp16', 'float16', 'fp32', 'float32']).transform((v): KvCacheDtype | undefined => (v === 'auto' ? undefined : v.endsWith('16') ? 'float16' : 'float32'));

interface Option {
  flag: string;
  /** Placeholder in --help; none for a switch. */
  arg?: string;
  env?: string;
  /** Parses the flag's (or variable's) text; a switch gets true. */
  schema: z.ZodType;
  /** Used when neither the flag nor the variable is given. */
  default?: unknown;
  /** The default as --help says it, where the value alone does not say it. */
  defaultText?: string;
  multiple?: boolean;
  help: string;
}

/** The options, in --help's order. Keys are ServeConfig's. */
export const SERVE_OPTIONS = {
  model: { flag: 'model', arg: 'NAME|DIR|FILE|ORG/NAME', schema: z.string(), defaultText: 'stories260K', help: 'model folder, Hugging Face checkpoint folder, GGUF / llama2.c file (converted once into models/.cache), a name looked up in models/ then ../shared/models/, or a hub repository ORG/NAME[@REVISION] (pulled when missing; HF_ENDPOINT, HF_TOKEN, HF_HOME)' },
  servedModelName: { flag: 'served-model-name', arg: 'NAME', schema: z.string(), defaultText: "the folder's name", help: 'the model id clients use' },
  host: { flag: 'host', arg: 'HOST', schema: z.string(), default: '127.0.0.1', help: 'address to listen on' },
  port: { flag: 'port', arg: 'PORT', env: 'PORT', schema: int(0).max(65535), default: 8000, help: 'TCP port (0: any free port)' },
  device: { flag: 'device', arg: 'cpu|cuda[:N]|auto', schema: device, default: 'cpu', help: 'where the model runs' },
  devices: { flag: 'devices', arg: 'LIST', schema: z.string(), help: 'one engine worker per device, e.g. 0,1 (with --device cuda) or cpu,cpu; requests go to the worker with the fewest outstanding tokens' },
  threads: { flag: 'threads', arg: 'N', schema: int(1), defaultText: 'one per core; one for models under ~5 MFLOP per token, such as stories260K', help: "intra-op threads per worker, ONNX Runtime's and native attention's" },
  spinWait: {
    flag: 'spin-wait',
    schema: z.boolean(),
    default: false,
    help: "let those threads busy-wait for work between operators instead of sleeping: on the native runner's one shared pool, ~15-20% off a batch-1 decode pass, but attention then runs on one thread and batches slow down (batch 32 at 1,000 tokens each: ~20% slower; bench/spin.ts); other runners' pools are one per session, so every layer's would spin",
  },
  maxNumSeqs: { flag: 'max-num-seqs', arg: 'N', schema: int(1), default: ENGINE_DEFAULTS.maxNumSeqs, help: 'sequences decoded together' },
  maxNumBatchedTokens: { flag: 'max-num-batched-tokens', arg: 'N', schema: int(1), default: ENGINE_DEFAULTS.maxNumBatchedTokens, help: 'tokens per engine step, decode + prefill chunks' },
  maxModelLen: { flag: 'max-model-len', arg: 'N', schema: int(2), defaultText: "the model's", help: 'context limit' },
  kvCacheTokens: { flag: 'kv-cache-tokens', arg: 'N', schema: int(2), defaultText: 'what fits in --kv-cache-gb', help: 'KV capacity in tokens' },
  kvCacheGb: { flag: 'kv-cache-gb', arg: 'GB', schema: positive, default: ENGINE_DEFAULTS.kvCacheBytes / GIB, help: 'KV memory budget' },
  kvCacheDtype: { flag: 'kv-cache-dtype', arg: 'auto|fp16|fp32', schema: kvCacheDtype, defaultText: 'auto', help: "KV cache elements. auto: float16 with native attention on the CPU (half the memory and the bytes each step reads, as llama.cpp's server), else the graph's type; fp32 keeps float32 there" },
  runner: { flag: 'runner', arg: 'native|js|gqa', schema: z.enum(['native', 'js', 'gqa']), defaultText: 'native where its addon is built', help: 'who drives a forward pass: native code through the ONNX Runtime C API (native/ort; the whole pass off the event loop) or JavaScript through onnxruntime-node, on the CPU; gqa: the whole model on ONNX Runtime\'s GroupQueryAttention through the C API, its KV cache in the device\'s memory (a slot of --max-model-len positions per sequence; the CUDA path, not yet run on a GPU)' },
  ortLibrary: { flag: 'ort-library', arg: 'PATH', env: 'TALLY_ORT_LIBRARY', schema: z.string().min(1), defaultText: "onnxruntime-node's libonnxruntime.so.1", help: 'the ONNX Runtime shared library the native runner opens (e.g. the libonnxruntime.so of a GPU build)' },
  attention: { flag: 'attention', arg: 'native|onnx', schema: z.enum(['native', 'onnx']), defaultText: 'native when that addon is built', help: "where a Tally graph's attention runs on the CPU: native/attention over a paged cache or inside the ONNX graph" },
  noPrefixCache: { flag: 'no-prefix-cache', schema: z.boolean(), default: false, help: "don't reuse the keys and values of prompt prefixes that earlier requests computed (automatic prefix caching, on the paged cache of native attention)" },
  maxQueue: { flag: 'max-queue', arg: 'N', schema: int(0), default: 256, help: 'waiting requests before 429' },
  requestTimeoutSeconds: { flag: 'request-timeout', arg: 'SECONDS', schema: nonNegative, default: 600, help: 'a generation running longer is cancelled (504); 0: no limit' },
  apiKeys: { flag: 'api-key', arg: '[NAME:]KEY', env: 'TALLY_API_KEYS', schema: z.string(), multiple: true, help: 'require this bearer key (repeatable; the variable takes name:key,...)' },
  apiKeysFile: { flag: 'api-keys-file', arg: 'FILE', env: 'TALLY_API_KEYS_FILE', schema: z.string().min(1), help: 'hashed keys with per-key rpm / tpm / budget_usd, made by `tally keys`; re-read when it changes' },
  idleTimeoutSeconds: { flag: 'idle-timeout', arg: 'SECONDS', schema: positive, default: 60, help: 'a request must arrive, and a streaming client must read, within this' },
  shutdownGraceSeconds: { flag: 'shutdown-grace', arg: 'SECONDS', schema: nonNegative, default: 30, help: 'SIGTERM waits this long for requests in flight, then cancels them' },
  maxBodyBytes: { flag: 'max-body-bytes', arg: 'N', schema: int(1), default: 4 * 2 ** 20, help: 'larger request bodies get 413' },
  maxConnections: { flag: 'max-connections', arg: 'N', schema: int(1), default: 1024, help: 'connections beyond this are refused' },
  devicePrice: { flag: 'device-price', arg: 'USD_PER_HOUR|PRESET', schema: z.string(), defaultText: 'the cpu preset', help: 'price of one device per hour, or a preset name' },
  powerPrice: { flag: 'power-price', arg: 'USD_PER_KWH', schema: nonNegative, help: 'electricity price, used where power is measured' },
  dataDir: { flag: 'data-dir', arg: 'DIR', env: 'TALLY_DATA_DIR', schema: z.string().min(1), default: '.tally', help: 'ledger location' },
  logLevel: { flag: 'log-level', arg: 'LEVEL', schema: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']), default: 'info', help: 'fatal, error, warn, info, debug, trace or silent' },
  logFormat: { flag: 'log-format', arg: 'pretty|json', schema: z.enum(['pretty', 'json']), defaultText: 'pretty on a terminal, else json', help: 'log lines for people or for a log collector' },
  toolCallParser: { flag: 'tool-call-parser', arg: TOOL_CALL_PARSERS.join('|'), schema: z.enum(TOOL_CALL_PARSERS), defaultText: "the chat template's format (hermes when it names none)", help: 'how tool calls are read from the output and forced: <tool_call>{...}</tool_call>, a Llama 3 JSON call, or [TOOL_CALLS][...]' },
  noMeter: { flag: 'no-meter', schema: z.boolean(), default: false, help: "no cost meter, ledger or cost metrics (to measure the meter's overhead)" },
} satisfies Record<string, Option>;

type Options = typeof SERVE_OPTIONS;
type ValueOf<K extends keyof Options> = Options[K] extends { multiple: true } ? z.output<Options[K]['schema']>[] : z.output<Options[K]['schema']>;
type WithDefault = { [K in keyof Options]: Options[K] extends { default: unknown } ? K : never }[keyof Options];

/** The validated configuration of `tally serve`. */
export type ServeConfig = { [K in WithDefault]: ValueOf<K> } & { [K in Exclude<keyof Options, WithDefault>]?: ValueOf<K> };

/** An option given a value it cannot take; the message names the flag. */
export class ConfigError extends Error {}

const entries = Object.entries(SERVE_OPTIONS) as [keyof Options, Option][];

function parseValue(option: Option, raw: unknown, source: string): unknown {
  const parsed = option.schema.safeParse(raw);
  if (!parsed.success) throw new ConfigError(`${source} ${raw === true ? '' : `"${String(raw)}"`}: ${parsed.error.issues.map((i) => i.message).join('; ')}`.replace('  ', ' '));
  return parsed.data;
}

/**
 * Flags (as node:util parseArgs gives them, keyed by flag name) over environment variables over defaults;
 * `overrides` (keyed by ServeConfig's names) over all, for programs and tests that start a server in-process.
 */
export function resolveServeConfig(flags: Record<string, unknown> = {}, env: NodeJS.ProcessEnv = {}, overrides: Partial<ServeConfig> = {}): ServeConfig {
  const config: Record<string, unknown> = {};
  for (const [key, option] of entries) {
    if (key in overrides && (overrides as Record<string, unknown>)[key] !== undefined) {
      config[key] = (overrides as Record<string, unknown>)[key];
      continue;
    }
    const flag = flags[option.flag];
    const fromEnv = option.env ? env[option.env] : undefined;
    if (flag !== undefined) {
      config[key] = option.multiple ? (flag as unknown[]).map((v) => parseValue(option, v, `--${option.flag}`)) : parseValue(option, flag, `--${option.flag}`);
    } else if (fromEnv !== undefined && fromEnv !== '') {
      config[key] = option.multiple ? fromEnv.split(',').map((v) => parseValue(option, v.trim(), option.env!)) : parseValue(option, fromEnv, option.env!);
    } else if (option.default !== undefined) {
      config[key] = option.default;
    }
  }
  return config as ServeConfig;
}

/** parseArgs' option table for `tally serve`. */
export function serveArgOptions(): Record<string, { type: 'string' | 'boolean'; multiple?: boolean }> {
  return Object.fromEntries(entries.map(([, o]) => [o.flag, { type: o.arg ? 'string' : 'boolean', ...(o.multiple ? { multiple: true } : {}) }]));
}

/** `tally serve --help`, from the option table. */
export function serveHelp(width = 110): string {
  const lines = ['tally serve — serve a model over an OpenAI-compatible HTTP API', ''];
  const left = (o: Option) => `  --${o.flag}${o.arg ? ` ${o.arg}` : ''}`;
  const col = Math.max(...entries.map(([, o]) => left(o).length)) + 2;
  for (const [, o] of entries) {
    const defaults = o.defaultText ?? (o.default !== undefined && o.default !== false ? String(o.default) : undefined);
    const text = `${o.help}${defaults !== undefined ? ` (default: ${defaults})` : ''}${o.env ? ` [$${o.env}]` : ''}`;
    const words = text.split(' ');
    let line = left(o).padEnd(col);
    let first = true;
    for (const word of words) {
      if (line.length + word.length + 1 > width && line.trim().length > 0 && !(first && line.length <= col)) {
        lines.push(line.trimEnd());
        line = ' '.repeat(col);
      }
      line += `${word} `;
      first = false;
    }
    lines.push(line.trimEnd());
  }
  return lines.join('\n');
}

/**
 * `--devices`: one engine worker per entry, each a device (`cuda:1`, `cpu`) or a bare index of --device's kind
 * (`--device cuda --devices 0,1`); for the CPU, N entries are N CPU workers.
 */
export function deviceList(config: Pick<ServeConfig, 'device' | 'devices'>): DeviceSpec[] {
  const base = parseDevice(config.device);
  if (!config.devices) return [base];
  return config.devices.split(',').map((item) => {
    const entry = item.trim();
    try {
      if (/^\d+$/.test(entry)) return base.kind === 'cuda' || base.kind === 'auto' ? parseDevice(`cuda:${entry}`) : base;
      return parseDevice(entry);
    } catch (err) {
      throw new ConfigError(`--devices "${entry}": ${(err as Error).message}`);
    }
  });
}

/** What the engine worker is started with, for one device. */
export function engineOptionsOf(config: ServeConfig, modelDir: string, device: DeviceSpec): EngineOptions {
  return {
    modelDir,
    device,
    threads: config.threads,
    spinWait: config.spinWait,
    attention: config.attention as AttentionMode | undefined,
    kvCacheDtype: config.kvCacheDtype,
    runner: config.runner as RunnerChoice | undefined,
    ortLibrary: config.ortLibrary,
    maxNumSeqs: config.maxNumSeqs,
    maxNumBatchedTokens: config.maxNumBatchedTokens,
    maxModelLen: config.maxModelLen,
    kvCacheTokens: config.kvCacheTokens,
    kvCacheBytes: config.kvCacheGb * GIB,
    prefixCache: !config.noPrefixCache,
  };
}

/** Where the ledger and keys live unless --data-dir says otherwise. */
export function defaultDataDir(env: NodeJS.ProcessEnv): string {
  return env[SERVE_OPTIONS.dataDir.env] || SERVE_OPTIONS.dataDir.default;
}

const ENGINE_TO_CONFIG: Partial<Record<keyof EngineOptions, keyof Options>> = {
  device: 'device',
  threads: 'threads',
  spinWait: 'spinWait',
  attention: 'attention',
  kvCacheDtype: 'kvCacheDtype',
  runner: 'runner',
  ortLibrary: 'ortLibrary',
  maxNumSeqs: 'maxNumSeqs',
  maxNumBatchedTokens: 'maxNumBatchedTokens',
  maxModelLen: 'maxModelLen',
  kvCacheTokens: 'kvCacheTokens',
  kvCacheBytes: 'kvCacheGb',
};

/** An engine error about one of its options, said with the flag that sets it. */
export function explainEngineError(err: unknown): Error {
  if (!(err instanceof EngineOptionError)) return err as Error;
  const key = ENGINE_TO_CONFIG[err.option];
  return new ConfigError(key ? `--${SERVE_OPTIONS[key].flag} ${err.message}` : err.message);
}
