import { parseArgs, type ParseArgsConfig } from 'node:util';

const USAGE = `tally — OpenAI-compatible inference on ONNX Runtime, with the cost of every token

Usage:
  tally serve   [--model NAME|DIR|FILE] [--port 8000] [--host 127.0.0.1] [--device cpu|cuda[:N]|auto] ...
  tally convert CHECKPOINT OUT_DIR [--tokenizer FILE] [--chat-template FILE] [--format tally|hf] [--dtype fp32|fp16] [--quant int8|int4|none]
  tally convert --random --like DIR OUT_DIR [--seed N] [--set key=value ...] [--chat-template FILE] [--dtype fp32|fp16] [--quant int8|int4]
  tally bench   --url URL --model NAME [--concurrency 1,8,32 | --rate 1,2,4] ...
  tally keys    add NAME [--rpm N] [--tpm N] [--budget-usd X] | list | revoke NAME  [--file FILE]
  tally cost    [--data-dir DIR] [--by tenant|model|day] [--since 24h|2026-11-01] [--format table|json]

Run \`tally <command> --help\` for a command's options.`;

function parse<T extends ParseArgsConfig['options']>(argv: string[], options: T, help: string) {
  try {
    const parsed = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
    if ((parsed.values as Record<string, unknown>).help) {
      console.log(help);
      process.exit(0);
    }
    return parsed;
  } catch (err) {
    console.error(`${(err as Error).message}\n\n${help}`);
    process.exit(2);
  }
}

/** A flag's value mapped through `options`; exits with the choices when it is not one of them. */
function choice<T extends Record<string, string | undefined>>(value: string | undefined, flag: string, options: T): T[keyof T] | undefined {
  if (value === undefined) return undefined;
  if (!(value in options)) {
    console.error(`${flag} must be one of ${Object.keys(options).join(', ')} (got "${value}")`);
    process.exit(2);
  }
  return options[value as keyof T];
}

function number(value: string | undefined, flag: string): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (!Number.isFinite(n)) {
    console.error(`${flag} must be a number (got "${value}")`);
    process.exit(2);
  }
  return n;
}

const SERVE_HELP = `tally serve — serve a model over an OpenAI-compatible HTTP API

  --model NAME|DIR|FILE        model folder, GGUF / llama2.c file (converted once into models/.cache), or a
                               name looked up in models/ then ../shared/models/ (default: stories260K)
  --served-model-name NAME     the model id clients use (default: the folder's name)
  --host HOST                  default 127.0.0.1
  --port PORT                  default $PORT or 8000
  --device cpu|cuda[:N]|auto   default cpu
  --devices LIST               one engine worker per device, e.g. 0,1 (with --device cuda) or cpu,cpu;
                               requests go to the worker with the fewest outstanding tokens
  --threads N                  intra-op threads per worker, ONNX Runtime's and native attention's (default:
                               one per core; one for models under ~5 MFLOP per token, such as stories260K)
  --spin-wait                  let those threads busy-wait for work between operators (ONNX Runtime's
                               default; Tally's is off: spinning threads take cores from its own threads,
                               and with native attention each layer's session spins its own pool)
  --max-num-seqs N             sequences decoded together (default 64)
  --max-num-batched-tokens N   tokens per engine step, decode + prefill chunks (default 2048)
  --max-model-len N            context limit (default: the model's)
  --kv-cache-tokens N          KV capacity in tokens (default: what fits in --kv-cache-gb)
  --kv-cache-gb GB             KV memory budget (default 4)
  --kv-cache-dtype auto|fp16|fp32
                               KV cache elements. auto: float16 with native attention on the CPU (half the
                               memory and the bytes each step reads, as llama.cpp's server), else the graph's
                               type; fp32 keeps float32 there
  --attention native|onnx      where a Tally graph's attention runs on the CPU: native/attention over a
                               paged cache (default when that addon is built) or inside the ONNX graph
  --max-queue N                waiting requests before 429 (default 256)
  --request-timeout SECONDS    default 600
  --api-key [NAME:]KEY         require this bearer key (repeatable; also TALLY_API_KEYS=name:key,...)
  --api-keys-file FILE         hashed keys with per-key rpm / tpm / budget_usd, made by \`tally keys\`
                               (also TALLY_API_KEYS_FILE); re-read when it changes
  --idle-timeout SECONDS       a request must arrive, and a streaming client must read, within this (default 60)
  --shutdown-grace SECONDS     SIGTERM waits this long for requests in flight, then cancels them (default 30)
  --max-body-bytes N           larger request bodies get 413 (default 4194304)
  --max-connections N          default 1024
  --device-price USD_PER_HOUR  price of one device, or a preset name (default: cpu preset)
  --power-price USD_PER_KWH    electricity price, used where power is measured
  --data-dir DIR               ledger location (default $TALLY_DATA_DIR or ./.tally)
  --log-level LEVEL            default info
  --no-meter                   no cost meter, ledger or cost metrics (to measure the meter's overhead)`;

async function serve(argv: string[]): Promise<void> {
  const { values } = parse(
    argv,
    {
      model: { type: 'string' },
      'served-model-name': { type: 'string' },
      host: { type: 'string' },
      port: { type: 'string' },
      device: { type: 'string' },
      devices: { type: 'string' },
      threads: { type: 'string' },
      'spin-wait': { type: 'boolean' },
      'max-num-seqs': { type: 'string' },
      'max-num-batched-tokens': { type: 'string' },
      'max-model-len': { type: 'string' },
      'kv-cache-tokens': { type: 'string' },
      'kv-cache-gb': { type: 'string' },
      'kv-cache-dtype': { type: 'string' },
      attention: { type: 'string' },
      'max-queue': { type: 'string' },
      'request-timeout': { type: 'string' },
      'api-key': { type: 'string', multiple: true },
      'api-keys-file': { type: 'string' },
      'idle-timeout': { type: 'string' },
      'shutdown-grace': { type: 'string' },
      'max-body-bytes': { type: 'string' },
      'max-connections': { type: 'string' },
      'device-price': { type: 'string' },
      'power-price': { type: 'string' },
      'data-dir': { type: 'string' },
      'log-level': { type: 'string' },
      'no-meter': { type: 'boolean' },
    },
    SERVE_HELP,
  );
  const { runServer } = await import('./server/start.ts');
  await runServer({
    model: values.model,
    servedModelName: values['served-model-name'],
    host: values.host ?? '127.0.0.1',
    port: number(values.port ?? process.env.PORT, '--port') ?? 8000,
    device: values.device ?? 'cpu',
    devices: values.devices,
    threads: number(values.threads, '--threads'),
    spinWait: values['spin-wait'],
    maxNumSeqs: number(values['max-num-seqs'], '--max-num-seqs'),
    maxNumBatchedTokens: number(values['max-num-batched-tokens'], '--max-num-batched-tokens'),
    maxModelLen: number(values['max-model-len'], '--max-model-len'),
    kvCacheTokens: number(values['kv-cache-tokens'], '--kv-cache-tokens'),
    kvCacheGb: number(values['kv-cache-gb'], '--kv-cache-gb'),
    kvCacheDtype: choice(values['kv-cache-dtype'], '--kv-cache-dtype', { auto: undefined, fp16: 'float16', float16: 'float16', fp32: 'float32', float32: 'float32' } as const),
    attention: choice(values.attention, '--attention', { native: 'native', onnx: 'onnx' } as const),
    maxQueue: number(values['max-queue'], '--max-queue'),
    requestTimeoutSeconds: number(values['request-timeout'], '--request-timeout'),
    apiKeys: values['api-key'],
    apiKeysFile: values['api-keys-file'],
    idleTimeoutSeconds: number(values['idle-timeout'], '--idle-timeout'),
    shutdownGraceSeconds: number(values['shutdown-grace'], '--shutdown-grace'),
    maxBodyBytes: number(values['max-body-bytes'], '--max-body-bytes'),
    maxConnections: number(values['max-connections'], '--max-connections'),
    devicePrice: values['device-price'],
    powerPrice: number(values['power-price'], '--power-price'),
    dataDir: values['data-dir'] ?? process.env.TALLY_DATA_DIR ?? '.tally',
    logLevel: values['log-level'] ?? 'info',
    meter: !values['no-meter'],
  });
}

const CONVERT_HELP = `tally convert — write a model folder in the onnx-community layout

  tally convert CHECKPOINT OUT_DIR      GGUF (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) or llama2.c checkpoint (Llama family)
    --tokenizer FILE                    llama2.c checkpoints: tokenizer.model or tokenizer.bin (default: beside it)
    --chat-template FILE                a Jinja chat template to store in tokenizer_config.json
    --format tally|hf                   tally (default): KV cache in slots, only new positions returned;
                                        hf: the onnx-community interface (past_key_values / present)
    --dtype fp32|fp16                   weights, activations and KV cache (default fp32); fp16 is for CUDA
                                        (attention scores, softmax and logits stay fp32)
    --quant int8|int4|none              linear layers as ONNX Runtime MatMulNBits blocks (the output head and the
                                        embedding 8-bit, norms --dtype). Default: a quantised GGUF keeps its
                                        precision (Q4_0/Q8_0 blocks as they are); none widens it to --dtype
    --block-size N                      quantisation block (16-256, default 64; GGUF blocks stay 32)
  tally convert --random --like DIR OUT_DIR
                                        random weights of DIR's config.json architecture with DIR's tokenizer
    --seed N                            default 0
    --set key=value                     change a config.json field (repeatable), e.g. num_hidden_layers=2`;

async function convert(argv: string[]): Promise<void> {
  const { values, positionals } = parse(
    argv,
    {
      tokenizer: { type: 'string' },
      'chat-template': { type: 'string' },
      format: { type: 'string' },
      dtype: { type: 'string' },
      random: { type: 'boolean' },
      like: { type: 'string' },
      seed: { type: 'string' },
      set: { type: 'string', multiple: true },
      quant: { type: 'string' },
      'block-size': { type: 'string' },
    },
    CONVERT_HELP,
  );
  const format = (values.format ?? 'tally') as 'tally' | 'hf';
  if (format !== 'tally' && format !== 'hf') throw new Error('--format must be tally or hf');
  const dtypes: Record<string, 'float32' | 'float16'> = { fp32: 'float32', float32: 'float32', fp16: 'float16', float16: 'float16' };
  const dtype = dtypes[values.dtype ?? 'fp32'];
  if (!dtype) throw new Error('--dtype must be fp32 or fp16');
  const quant = values.quant as 'int8' | 'int4' | 'none' | undefined;
  if (quant !== undefined && !['int8', 'int4', 'none'].includes(quant)) throw new Error('--quant must be int8, int4 or none');
  const quantBlockSize = number(values['block-size'], '--block-size');
  const { convertCheckpoint, convertRandomLike } = await import('./model/convert.ts');
  const started = Date.now();
  if (values.random) {
    if (!values.like || positionals.length !== 1) throw new Error('usage: tally convert --random --like DIR OUT_DIR');
    const overrides: Record<string, unknown> = {};
    for (const kv of values.set ?? []) {
      const at = kv.indexOf('=');
      if (at < 0) throw new Error(`--set takes key=value (got "${kv}")`);
      const raw = kv.slice(at + 1);
      overrides[kv.slice(0, at)] = raw === 'true' ? true : raw === 'false' ? false : Number.isFinite(Number(raw)) ? Number(raw) : raw;
    }
    convertRandomLike(values.like, positionals[0], { seed: number(values.seed, '--seed') ?? 0, overrides, chatTemplate: values['chat-template'], interface: format, dtype, quant, quantBlockSize });
  } else {
    if (positionals.length !== 2) throw new Error('usage: tally convert CHECKPOINT OUT_DIR');
    convertCheckpoint(positionals[0], positionals[1], { tokenizer: values.tokenizer, chatTemplate: values['chat-template'], interface: format, dtype, quant, quantBlockSize });
  }
  console.log(`wrote ${positionals[positionals.length - 1]} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

async function main(): Promise<void> {
  const [command, ...rest] = process.argv.slice(2);
  switch (command) {
    case 'serve':
      return serve(rest);
    case 'convert':
      return convert(rest);
    case 'bench': {
      const { runBenchCommand } = await import('./bench/bench-cli.ts');
      process.exitCode = await runBenchCommand(rest);
      return;
    }
    case 'keys': {
      const { runKeysCommand } = await import('./server/keys-cli.ts');
      process.exitCode = await runKeysCommand(rest);
      return;
    }
    case 'cost': {
      const { runCostCommand } = await import('./meter/cost-cli.ts');
      process.exitCode = await runCostCommand(rest);
      return;
    }
    case undefined:
    case '--help':
    case '-h':
    case 'help':
      console.log(USAGE);
      return;
    default:
      console.error(`unknown command "${command}"\n\n${USAGE}`);
      process.exitCode = 2;
  }
}

main().catch((err: Error) => {
  console.error(`tally: ${err.message}`);
  process.exitCode = 1;
});
