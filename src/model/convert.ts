import fs from 'node:fs';
import path from 'node:path';
import { buildTokenizerFiles } from './tokenizer-json.ts';
import { ggufToCheckpoint } from './gguf.ts';
import { readLlama2c } from './llama2c.ts';
import { parseLlama2cTokenizer } from './llama2c-tokenizer.ts';
import { parseSentencePieceModel } from './sentencepiece.ts';
import { buildLlamaGraph, type GraphInterface, type ModelDtype } from './llama-graph.ts';
import { type QuantChoice, quantOptions, withPrecision } from './precision.ts';
import { writeModelFolder } from './folder.ts';
import { randomWeights } from './random.ts';
import { convertHfCheckpoint, isHfCheckpointDir } from './hf-checkpoint.ts';
import type { Checkpoint, LlamaConfig, SpVocab } from './types.ts';

export { DEFAULT_QUANT_BLOCK, type QuantChoice } from './precision.ts';

export interface ConvertOptions {
  /** Tokenizer for llama2.c checkpoints: tokenizer.model (SentencePiece) or tokenizer.bin (llama2.c). */
  tokenizer?: string;
  /** A Jinja chat template (file path) to store in tokenizer_config.json. */
  chatTemplate?: string;
  interface?: GraphInterface;
  dtype?: ModelDtype;
  /**
   * Linear layers as MatMulNBits blocks of 8 or 4 bits; 'none' widens a quantised GGUF to dtype. Default: a
   * quantised GGUF keeps its precision (its Q4_0 / Q8_0 blocks as they are), anything else stays dtype.
   */
  quant?: QuantChoice;
  /** Block size for weights quantised here (default DEFAULT_QUANT_BLOCK). */
  quantBlockSize?: number;
}

function readVocab(file: string, vocabSize: number): SpVocab {
  const buf = new Uint8Array(fs.readFileSync(file));
  return file.endsWith('.bin') ? parseLlama2cTokenizer(buf, vocabSize) : parseSentencePieceModel(buf);
}

function findTokenizerBeside(checkpoint: string): string {
  const dir = path.dirname(checkpoint);
  const candidates = fs.readdirSync(dir).filter((f) => /^(tokenizer|tok\d*)\.(model|bin)$/.test(f)).sort((a, b) => Number(b.endsWith('.model')) - Number(a.endsWith('.model')));
  if (candidates.length === 0) {
    throw new Error(`no tokenizer given for ${checkpoint}: pass --tokenizer tokenizer.model (or llama2.c's tokenizer.bin)`);
  }
  return path.join(dir, candidates[0]);
}

export function readCheckpoint(input: string, options: ConvertOptions = {}): Checkpoint {
  if (!fs.existsSync(input)) throw new Error(`${input} does not exist`);
  const fd = fs.openSync(input, 'r');
  const magic = Buffer.alloc(4);
  fs.readSync(fd, magic, 0, 4, 0);
  fs.closeSync(fd);
  // A .gguf name goes to the GGUF reader even when its magic is wrong, so that the error says so
  // (rather than misreading it as a llama2.c checkpoint and asking for a tokenizer).
  if (magic.toString('latin1') === 'GGUF' || /\.gguf$/i.test(input)) {
    const ckpt = ggufToCheckpoint(input);
    tieIfIdentical(ckpt);
    return ckpt;
  }
  const header = new Int32Array(new Uint8Array(fs.readFileSync(input).subarray(0, 28)).buffer);
  const vocabSize = Math.abs(header[5]);
  const tokenizer = options.tokenizer ?? findTokenizerBeside(input);
  return readLlama2c(input, readVocab(tokenizer, vocabSize));
}

/** Some GGUF exports store a copy of the embedding as output.weight; sharing it halves that memory. */
function tieIfIdentical(ckpt: Checkpoint): void {
  const head = ckpt.weights.get('lm_head.weight');
  const embed = ckpt.weights.get('model.embed_tokens.weight');
  if (!head || !embed || head.shape.join() !== embed.shape.join()) return;
  for (let i = 0; i < head.data.length; i++) if (head.data[i] !== embed.data[i]) return;
  ckpt.weights.delete('lm_head.weight');
  ckpt.config.tie_word_embeddings = true;
}

function generationConfigOf(config: LlamaConfig): Record<string, unknown> {
  return { bos_token_id: config.bos_token_id, eos_token_id: config.eos_token_id, do_sample: false };
}

/** llama2.c models separate documents with BOS, and run.c stops there; so does Tally. */
function llama2cGenerationConfig(config: LlamaConfig): Record<string, unknown> {
  const eos = [config.eos_token_id, config.bos_token_id].filter((x): x is number => typeof x === 'number');
  return { ...generationConfigOf(config), eos_token_id: [...new Set(eos)] };
}

export function convertCheckpoint(input: string, outDir: string, options: ConvertOptions = {}): void {
  if (fs.existsSync(input) && fs.statSync(input).isDirectory()) {
    if (!isHfCheckpointDir(input)) throw new Error(`${input} is a folder but not a Hugging Face checkpoint (config.json and model*.safetensors)`);
    return convertHfCheckpoint(input, outDir, options);
  }
  const ckpt = readCheckpoint(input, options);
  const tok = ckpt.tokenizer;
  const quant = quantOptions(options.quant, options.quantBlockSize, ckpt.weights);
  const config = withPrecision(tok
    ? { ...ckpt.config, bos_token_id: tok.bosId, eos_token_id: tok.eosIds[0], torch_dtype: options.dtype ?? 'float32' }
    : { ...ckpt.config, bos_token_id: ckpt.vocab.bosId, eos_token_id: ckpt.vocab.eosId, torch_dtype: options.dtype ?? 'float32' }, quant);
  const { tokenizerJson, tokenizerConfig } = tok ?? buildTokenizerFiles(ckpt.vocab);
  const tokConfig: Record<string, unknown> = { ...tokenizerConfig, model_max_length: config.max_position_embeddings };
  if (options.chatTemplate) tokConfig.chat_template = fs.readFileSync(options.chatTemplate, 'utf8');
  writeModelFolder(outDir, {
    config,
    generationConfig: tok ? { bos_token_id: tok.bosId, eos_token_id: tok.eosIds.length === 1 ? tok.eosIds[0] : tok.eosIds, do_sample: false } : llama2cGenerationConfig(config),
    tokenizerJson,
    tokenizerConfig: tokConfig,
    graph: buildLlamaGraph(config, ckpt.weights, { interface: options.interface ?? 'tally', dtype: options.dtype, quant }),
  });
}

export interface RandomOptions {
  seed: number;
  /** config.json fields to change (e.g. fewer layers for tests); the tokenizer stays the real one. */
  overrides?: Partial<LlamaConfig>;
  chatTemplate?: string;
  interface?: GraphInterface;
  dtype?: ModelDtype;
  quant?: QuantChoice;
  quantBlockSize?: number;
}

/** A random-weight model with the architecture, tokenizer and chat template of a published model folder. */
export function convertRandomLike(likeDir: string, outDir: string, options: RandomOptions): void {
  const read = (f: string) => JSON.parse(fs.readFileSync(path.join(likeDir, f), 'utf8'));
  if (!fs.existsSync(path.join(likeDir, 'config.json'))) throw new Error(`${likeDir} has no config.json`);
  if (!fs.existsSync(path.join(likeDir, 'tokenizer.json'))) throw new Error(`${likeDir} has no tokenizer.json`);
  const published = read('config.json') as LlamaConfig;
  const defaults = { rms_norm_eps: 1e-6, rope_theta: 10000, tie_word_embeddings: false, num_key_value_heads: published.num_attention_heads };
  const quant = quantOptions(options.quant, options.quantBlockSize);
  const config: LlamaConfig = withPrecision(Object.assign(defaults, published, options.overrides, { torch_dtype: options.dtype ?? 'float32' }), quant);
  const supported = ['llama', 'qwen2', 'mistral', 'qwen3'];
  if (!supported.includes(config.model_type)) throw new Error(`model_type ${config.model_type} is not a Llama-family decoder (${supported.join(', ')})`);
  const tokenizerConfig = fs.existsSync(path.join(likeDir, 'tokenizer_config.json')) ? read('tokenizer_config.json') : {};
  if (options.chatTemplate) tokenizerConfig.chat_template = fs.readFileSync(options.chatTemplate, 'utf8');
  const generationConfig = fs.existsSync(path.join(likeDir, 'generation_config.json')) ? read('generation_config.json') : generationConfigOf(config);
  writeModelFolder(outDir, {
    config,
    generationConfig,
    tokenizerJson: read('tokenizer.json'),
    tokenizerConfig,
    graph: buildLlamaGraph(config, randomWeights(config, options.seed), { interface: options.interface ?? 'tally', dtype: options.dtype, quant }),
  });
}
