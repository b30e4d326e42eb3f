import fs from 'node:fs';
import path from 'node:path';
import { writeModelFolder } from './folder.ts';
import { hfWeightShapes } from './gguf.ts';
import { buildLlamaGraph, type GraphInterface, type ModelDtype } from './llama-graph.ts';
import { type QuantChoice, quantOptions, withPrecision } from './precision.ts';
import { readSafetensorsHeader, readTensorF32, type SafetensorsFile } from './safetensors.ts';
import type { LlamaConfig, Tensor32, WeightSource } from './types.ts';

/** Hugging Face architectures Tally converts, by config.json's model_type. */
const ARCHITECTURES: Record<string, string> = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
  qwen3: 'Qwen3ForCausalLM',
};

/** A folder that holds a Hugging Face checkpoint: config.json and safetensors weights. */
export function isHfCheckpointDir(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'config.json')) && fs.statSync(dir).isDirectory() && weightFiles(dir).length > 0;
}

/** model.safetensors, or the shards that model.safetensors.index.json names (never consolidated*.safetensors). */
function weightFiles(dir: string): string[] {
  const index = path.join(dir, 'model.safetensors.index.json');
  if (fs.existsSync(index)) {
    const map = (JSON.parse(fs.readFileSync(index, 'utf8')) as { weight_map?: Record<string, string> }).weight_map;
    if (!map) throw new Error(`${index} has no weight_map`);
    return [...new Set(Object.values(map))].sort();
  }
  return fs.readdirSync(dir).filter((f) => /^model(-\d+-of-\d+)?\.safetensors$/.test(f)).sort();
}

export interface HfCheckpoint {
  dir: string;
  /** config.json with the defaults Tally's engine reads filled in. */
  config: LlamaConfig;
  /** Reads each tensor from its file when asked, as float32; holds none. */
  weights: WeightSource;
  /** The names and shapes the converter will ask for. */
  shapes: Map<string, number[]>;
  /** Each tensor's dtype as stored (F32, F16, BF16). */
  dtypes: Set<string>;
  tokenizerJson: unknown;
  tokenizerConfig: Record<string, unknown>;
  generationConfig: Record<string, unknown>;
}

function readJson(file: string): Record<string, unknown> {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`cannot read ${file}: ${(err as Error).message}`);
  }
}

/** The config a supported checkpoint's tensors must match; throws naming the architecture otherwise. */
export function normalizeHfConfig(raw: Record<string, unknown>, where: string): LlamaConfig {
  const modelType = String(raw.model_type ?? '');
  const arch = (raw.architectures as string[] | undefined)?.[0];
  const expected = ARCHITECTURES[modelType];
  if (!expected || (arch !== undefined && arch !== expected)) {
    const supported = Object.values(ARCHITECTURES).join(', ');
    throw new Error(`${where}: architecture ${arch ?? '(none)'} (model_type "${modelType}") is not supported; Tally converts ${supported}`);
  }
  for (const key of ['hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'vocab_size']) {
    if (typeof raw[key] !== 'number') throw new Error(`${where}: config.json has no ${key}`);
  }
  const config = {
    rms_norm_eps: 1e-6,
    rope_theta: 10000,
    max_position_embeddings: 2048,
    num_key_value_heads: raw.num_attention_heads,
    ...raw,
    tie_word_embeddings: raw.tie_word_embeddings === true,
  } as LlamaConfig;
  if (config.head_dim === null) delete config.head_dim;
  // Sliding-window attention is exact within the window; Tally attends to every position, so it serves up to one window.
  const window = config.sliding_window;
  const slides = modelType === 'mistral' || (modelType.startsWith('qwen') && config.use_sliding_window === true);
  if (slides && typeof window === 'number' && window < config.max_position_embeddings) config.max_position_embeddings = window;
  const scaling = config.rope_scaling as { rope_type?: string; type?: string } | null | undefined;
  const ropeType = scaling?.rope_type ?? scaling?.type;
  if (scaling && ropeType !== 'default' && ropeType !== 'llama3') throw new Error(`${where}: rope_scaling type "${String(ropeType)}" is not supported (llama3 and none are)`);
  return config;
}

/** Opens a checkpoint folder: config, tokenizer files and every tensor's header, checked against the architecture. */
export function readHfCheckpoint(dir: string): HfCheckpoint {
  const where = dir;
  if (!fs.existsSync(path.join(dir, 'config.json'))) throw new Error(`${dir} has no config.json`);
  const config = normalizeHfConfig(readJson(path.join(dir, 'config.json')), where);
  const files = weightFiles(dir);
  if (files.length === 0) throw new Error(`${dir} has no model*.safetensors (Tally reads safetensors checkpoints; convert .bin/.pth ones with transformers first)`);
  if (!fs.existsSync(path.join(dir, 'tokenizer.json'))) throw new Error(`${dir} has no tokenizer.json (Tally needs the tokenizers-library file, as transformers' fast tokenizers save it)`);

  const located = new Map<string, SafetensorsFile>();
  const dtypes = new Set<string>();
  for (const f of files) {
    const file = path.join(dir, f);
    if (!fs.existsSync(file)) throw new Error(`${dir}: ${f} is missing (model.safetensors.index.json names it)`);
    const st = readSafetensorsHeader(file);
    for (const [name, t] of st.tensors) {
      located.set(name, st);
      dtypes.add(t.dtype);
    }
  }
  if (!located.has('lm_head.weight')) config.tie_word_embeddings = true;
  const shapes = hfWeightShapes(config);
  for (const [name, shape] of shapes) {
    const st = located.get(name);
    if (!st) throw new Error(`${dir}: the checkpoint has no tensor ${name}, which ${config.architectures?.[0] ?? config.model_type} needs`);
    const t = st.tensors.get(name)!;
    if (t.shape.join() !== shape.join()) throw new Error(`${dir}: ${name} is [${t.shape}], config.json implies [${shape}]`);
    if (!['F32', 'F16', 'BF16'].includes(t.dtype)) throw new Error(`${dir}: ${name} is ${t.dtype}; Tally converts F32, F16 and BF16 checkpoints`);
  }
  for (const name of located.keys()) {
    if (!shapes.has(name) && !/rotary_emb\.inv_freq$/.test(name) && !(name === 'lm_head.weight' && config.tie_word_embeddings)) {
      throw new Error(`${dir}: unexpected tensor ${name} for ${config.architectures?.[0] ?? config.model_type}`);
    }
  }

  const weights: WeightSource = {
    has: (name) => shapes.has(name),
    get: (name): Tensor32 | undefined => {
      const shape = shapes.get(name);
      return shape && { shape, data: readTensorF32(located.get(name)!, name) };
    },
  };
  const optional = (f: string) => (fs.existsSync(path.join(dir, f)) ? readJson(path.join(dir, f)) : undefined);
  const tokenizerConfig = optional('tokenizer_config.json') ?? {};
  const templateFile = path.join(dir, 'chat_template.jinja');
  if (tokenizerConfig.chat_template === undefined && fs.existsSync(templateFile)) tokenizerConfig.chat_template = fs.readFileSync(templateFile, 'utf8');
  return {
    dir,
    config,
    weights,
    shapes,
    dtypes,
    tokenizerJson: readJson(path.join(dir, 'tokenizer.json')),
    tokenizerConfig,
    generationConfig: optional('generation_config.json') ?? { bos_token_id: config.bos_token_id, eos_token_id: config.eos_token_id, do_sample: false },
  };
}

export interface HfConvertOptions {
  chatTemplate?: string;
  interface?: GraphInterface;
  dtype?: ModelDtype;
  /** Linear layers as MatMulNBits blocks of 8 or 4 bits (default: the checkpoint's own dtype). */
  quant?: QuantChoice;
  quantBlockSize?: number;
}

/** A checkpoint folder → a Tally model folder, reading one tensor at a time from the safetensors files. */
export function convertHfCheckpoint(dir: string, outDir: string, options: HfConvertOptions = {}): void {
  const ckpt = readHfCheckpoint(dir);
  const quant = quantOptions(options.quant, options.quantBlockSize);
  const config: LlamaConfig = withPrecision({ ...ckpt.config, torch_dtype: options.dtype ?? 'float32' }, quant);
  const tokenizerConfig = { ...ckpt.tokenizerConfig };
  if (options.chatTemplate) tokenizerConfig.chat_template = fs.readFileSync(options.chatTemplate, 'utf8');
  writeModelFolder(outDir, {
    config,
    generationConfig: ckpt.generationConfig,
    tokenizerJson: ckpt.tokenizerJson,
    tokenizerConfig,
    graph: buildLlamaGraph(config, ckpt.weights, { interface: options.interface ?? 'tally', dtype: options.dtype, quant }),
  });
}
