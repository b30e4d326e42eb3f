import { parseArgs } from 'node:util';

const CONVERT_HELP = `tally convert — write a model folder in the onnx-community layout

  tally convert CHECKPOINT OUT_DIR      GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K), llama2.c checkpoint,
                                        or a Hugging Face checkpoint folder (config.json + safetensors: Llama,
                                        Mistral, Qwen2/2.5, Qwen3)
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

/** `tally convert`: returns the exit code. */
export async function runConvertCommand(argv: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: { tokenizer: { type: 'string' }, 'chat-template': { type: 'string' }, format: { type: 'string' }, dtype: { type: 'string' }, random: { type: 'boolean' }, like: { type: 'string' }, seed: { type: 'string' }, set: { type: 'string', multiple: true }, quant: { type: 'string' }, 'block-size': { type: 'string' }, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
  } catch (err) {
    console.error(`${(err as Error).message}\n\n${CONVERT_HELP}`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    console.log(CONVERT_HELP);
    return 0;
  }
  const format = values.format ?? 'tally';
  if (format !== 'tally' && format !== 'hf') return usage('--format must be tally or hf');
  const dtypes: Record<string, 'float32' | 'float16'> = { fp32: 'float32', float32: 'float32', fp16: 'float16', float16: 'float16' };
  const dtype = dtypes[values.dtype ?? 'fp32'];
  if (!dtype) return usage('--dtype must be fp32 or fp16');
  const quant = values.quant as 'int8' | 'int4' | 'none' | undefined;
  if (quant !== undefined && !['int8', 'int4', 'none'].includes(quant)) return usage('--quant must be int8, int4 or none');
  const quantBlockSize = values['block-size'] === undefined ? undefined : Number(values['block-size']);
  if (quantBlockSize !== undefined && !Number.isInteger(quantBlockSize)) return usage(`--block-size must be an integer (got "${values['block-size']}")`);
  const seed = values.seed === undefined ? 0 : Number(values.seed);
  if (!Number.isInteger(seed)) return usage(`--seed must be an integer (got "${values.seed}")`);
  const { convertCheckpoint, convertRandomLike } = await import('../model/convert.ts');
  const started = Date.now();
  if (values.random) {
    if (!values.like || positionals.length !== 1) return usage('usage: tally convert --random --like DIR OUT_DIR');
    const overrides: Record<string, unknown> = {};
    for (const kv of values.set ?? []) {
      const at = kv.indexOf('=');
      if (at < 0) return usage(`--set takes key=value (got "${kv}")`);
      const raw = kv.slice(at + 1);
      overrides[kv.slice(0, at)] = raw === 'true' ? true : raw === 'false' ? false : Number.isFinite(Number(raw)) ? Number(raw) : raw;
    }
    convertRandomLike(values.like, positionals[0], { seed, overrides, chatTemplate: values['chat-template'], interface: format, dtype, quant, quantBlockSize });
  } else {
    if (positionals.length !== 2) return usage('usage: tally convert CHECKPOINT OUT_DIR');
    convertCheckpoint(positionals[0], positionals[1], { tokenizer: values.tokenizer, chatTemplate: values['chat-template'], interface: format, dtype, quant, quantBlockSize });
  }
  console.log(`wrote ${positionals[positionals.length - 1]} in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return 0;
}

function usage(message: string): number {
  console.error(`tally convert: ${message}`);
  return 2;
}
