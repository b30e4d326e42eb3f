import fs from 'node:fs';
import path from 'node:path';
import { encodeModel, type ModelSpec } from './onnx-proto.ts';
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
export const ONNX_DATA_FILE = 'model.onnx_data';

function readJson(file: string): Record<string, unknown> {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`cannot read ${file}: ${(err as Error).message}`);
  }
}

export function isModelFolder(dir: string): boolean {
  return fs.existsSync(path.join(dir, 'config.json')) && fs.existsSync(path.join(dir, ONNX_FILE));
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
    onnxPath: path.join(abs, ONNX_FILE),
  };
}

export interface FolderContents {
  config: LlamaConfig;
  generationConfig: Record<string, unknown>;
  tokenizerJson: unknown;
  tokenizerConfig: Record<string, unknown>;
  graph: ModelSpec;
}

/** Writes config, tokenizer and generation files and onnx/model.onnx with its weights as external data. */
export function writeModelFolder(dir: string, contents: FolderContents): void {
  fs.mkdirSync(path.join(dir, 'onnx'), { recursive: true });
  const json = (f: string, v: unknown) => fs.writeFileSync(path.join(dir, f), JSON.stringify(v, null, 2) + '\n');
  json('config.json', contents.config);
  json('generation_config.json', contents.generationConfig);
  json('tokenizer.json', contents.tokenizerJson);
  json('tokenizer_config.json', contents.tokenizerConfig);
  const { model, external } = encodeModel({ ...contents.graph, externalDataFile: ONNX_DATA_FILE });
  const dataPath = path.join(dir, 'onnx', ONNX_DATA_FILE);
  const fd = fs.openSync(dataPath, 'w');
  try {
    for (const chunk of external) fs.writeSync(fd, chunk);
  } finally {
    fs.closeSync(fd);
  }
  fs.writeFileSync(path.join(dir, ONNX_FILE), model);
}
