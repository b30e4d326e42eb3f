import fs from 'node:fs';
import path from 'node:path';
import { encodeModel, readLazy, type ModelSpec } from './onnx-proto.ts';
import type { LlamaConfig } from './types.ts';

/** A model folder in the onnx-community layout. */
export interface ModelFolder {
  dir: string;
  name: string;
  config: LlamaConfig;
  generationConfig: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  onnxPath: string;
}

export const ONNX_FILE = 'onnx/model.onnx';
/** onnx-community's name for the float16 variant; loaded when there is no model.onnx. */
export const ONNX_FP16_FILE = 'onnx/model_fp16.onnx';

function onnxFileOf(dir: string): string | undefined {
  return [ONNX_FILE, ONNX_FP16_FILE].find((f) => fs.existsSync(path.join(dir, f)));
}

function readJson(file: string): Record<string, unknown> {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`cannot read ${file}: ${(err as Error).message}`);
  }
}

export function isModelFolder(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'config.json')) && onnxFileOf(dir) !== undefined;
}

export function loadModelFolder(dir: string): ModelFolder {
  const abs = path.resolve(dir);
  if (!isModelFolder(abs)) {
    throw new Error(`${abs} is not a model folder: it needs config.json and ${ONNX_FILE} (convert one with \`tally convert\`)`);
  }
  const optional = (f: string) => (fs.existsSync(path.join(abs, f)) ? readJson(path.join(abs, f)) : {});
  return {
    dir: abs,
    name: path.basename(abs),
    config: readJson(path.join(abs, 'config.json')) as unknown as LlamaConfig,
    generationConfig: optional('generation_config.json'),
    tokenizerConfig: optional('tokenizer_config.json'),
    onnxPath: path.join(abs, onnxFileOf(abs)!),
  };
}

export interface FolderContents {
  config: LlamaConfig;
  generationConfig: Record<string, unknown>;
  tokenizerJson: unknown;
  tokenizerConfig: Record<string, unknown>;
  graph: ModelSpec;
}

function writeAll(fd: number, bytes: Uint8Array): void {
  for (let done = 0; done < bytes.length; ) done += fs.writeSync(fd, bytes, done, Math.min(bytes.length - done, 1 << 30));
}

/**
 * Writes config, tokenizer and generation files and the graph with its weights as external data:
 * onnx/model.onnx, or onnx/model_fp16.onnx when config.torch_dtype is float16.
 */
export function writeModelFolder(dir: string, contents: FolderContents): void {
  const onnxFile = contents.config.torch_dtype === 'float16' ? ONNX_FP16_FILE : ONNX_FILE;
  const dataFile = `${path.basename(onnxFile)}_data`;
  fs.mkdirSync(path.join(dir, 'onnx'), { recursive: true });
  const json = (f: string, v: unknown) => fs.writeFileSync(path.join(dir, f), JSON.stringify(v, null, 2) + '\n');
  json('config.json', contents.config);
  json('generation_config.json', contents.generationConfig);
  json('tokenizer.json', contents.tokenizerJson);
  json('tokenizer_config.json', contents.tokenizerConfig);
  const { model, external } = encodeModel({ ...contents.graph, externalDataFile: dataFile });
  const dataPath = path.join(dir, 'onnx', dataFile);
  const fd = fs.openSync(dataPath, 'w');
  try {
    for (const chunk of external) writeAll(fd, chunk instanceof Uint8Array ? chunk : readLazy(chunk));
  } finally {
    fs.closeSync(fd);
  }
  fs.writeFileSync(path.join(dir, onnxFile), model);
}
