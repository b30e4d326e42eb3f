import fs from 'node:fs';
import path from 'node:path';
import { isModelFolder } from './folder.ts';
import { convertCheckpoint } from './convert.ts';
import { TALLY_GRAPH_VERSION } from './llama-graph.ts';

export const DEFAULT_MODEL = 'stories260K';

/** Where converted models live: `<project>/models/`. */
export function modelsDir(): string {
  return path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../models');
}

function sharedModelsDir(): string {
  return path.resolve(modelsDir(), '../../shared/models');
}

/**
 * A model folder for `--model`: a converted folder as is; a GGUF or llama2.c file converted once into
 * models/.cache/<name>; a bare name looked up in models/, then ../shared/models/.
 */
export function resolveModel(spec: string | undefined, log: (msg: string) => void = () => {}): { dir: string; name: string } {
  const name = spec ?? DEFAULT_MODEL;
  if (fs.existsSync(name)) {
    const stat = fs.statSync(name);
    const served = path.basename(path.resolve(name)).replace(/\.(gguf|bin)$/, '');
    if (stat.isDirectory()) {
      if (isModelFolder(name)) return { dir: path.resolve(name), name: served };
      const checkpoint = fs.readdirSync(name).find((f) => f.endsWith('.gguf')) ?? fs.readdirSync(name).find((f) => f.endsWith('.bin') && !/^tok/.test(f));
      if (checkpoint) return { dir: convertOnce(path.join(name, checkpoint), log), name: served };
      throw new Error(`${name} is neither a model folder (config.json + onnx/model.onnx or onnx/model_fp16.onnx) nor a folder with a GGUF or llama2.c checkpoint`);
    }
    return { dir: convertOnce(name, log), name: served };
  }
  if (name.includes('/') || name.includes('..')) throw new Error(`model ${name} not found`);
  for (const base of [modelsDir(), sharedModelsDir()]) {
    const dir = path.join(base, name);
    if (fs.existsSync(dir)) return resolveModel(dir, log);
  }
  throw new Error(
    `model "${name}" not found in ${modelsDir()} or ${sharedModelsDir()}. ` +
      `Convert one with \`tally convert CHECKPOINT.gguf models/NAME\` (GGUF or llama2.c .bin), ` +
      `or pass --model PATH to a folder with config.json and onnx/model.onnx.`,
  );
}

function convertOnce(file: string, log: (msg: string) => void): string {
  const stat = fs.statSync(file);
  const key = `${path.basename(file).replace(/\.(gguf|bin)$/, '')}-${stat.size}-${Math.floor(stat.mtimeMs)}-g${TALLY_GRAPH_VERSION}`;
  const out = path.join(modelsDir(), '.cache', key);
  if (!isModelFolder(out)) {
    log(`converting ${file} into ${out}`);
    const tmp = `${out}.tmp-${process.pid}`;
    fs.rmSync(tmp, { recursive: true, force: true });
    convertCheckpoint(file, tmp);
    fs.rmSync(out, { recursive: true, force: true });
    fs.renameSync(tmp, out);
  }
  return out;
}
