import fs from 'node:fs';
import path from 'node:path';
import { isModelFolder } from './folder.ts';
import { convertCheckpoint } from './convert.ts';
import { TALLY_GRAPH_VERSION } from './llama-graph.ts';
import { isHfCheckpointDir } from './hf-checkpoint.ts';
import { cachedSnapshot, parseRepoSpec, pullModel } from './hub.ts';

export const DEFAULT_MODEL = 'stories260K';

/** Where converted models live: `<project>/models/`. */
export function modelsDir(): string {
  return path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../models');
}

function sharedModelsDir(): string {
  return path.resolve(modelsDir(), '../../shared/models');
}

/**
 * A model folder for `--model`: a converted folder as is; a Hugging Face checkpoint folder, GGUF or llama2.c
 * file converted once into models/.cache/<name>; a bare name looked up in models/, then ../shared/models/.
 */
export function resolveModel(spec: string | undefined, log: (msg: string) => void = () => {}): { dir: string; name: string } {
  const name = spec ?? DEFAULT_MODEL;
  if (fs.existsSync(name)) {
    const stat = fs.statSync(name);
    const served = path.basename(path.resolve(name)).replace(/\.(gguf|bin)$/, '');
    if (stat.isDirectory()) {
      if (isModelFolder(name)) return { dir: path.resolve(name), name: served };
      if (isHfCheckpointDir(name)) return { dir: convertOnce(name, log), name: served };
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
      `Convert one with \`tally convert CHECKPOINT models/NAME\` (a Hugging Face checkpoint folder, GGUF or llama2.c .bin), ` +
      `or pass --model PATH to a folder with config.json and onnx/model.onnx.`,
  );
}

/**
 * As resolveModel, and ORG/NAME[@REVISION] (when no such local path exists) from the Hugging Face hub's cache,
 * pulled first when it is not there; served as ORG/NAME.
 */
export async function resolveModelOrPull(spec: string | undefined, log: (msg: string) => void = () => {}): Promise<{ dir: string; name: string }> {
  const hub = spec !== undefined && !fs.existsSync(spec) ? parseRepoSpec(spec) : undefined;
  if (!hub) return resolveModel(spec, log);
  let snapshot = cachedSnapshot(hub)?.dir;
  if (!snapshot) {
    log(`pulling ${spec} from the hub`);
    try {
      snapshot = (await pullModel(spec!)).dir;
    } catch (err) {
      throw new Error(`--model ${spec} is no local path, and from the hub: ${(err as Error).message}`);
    }
  }
  const gguf = isHfCheckpointDir(snapshot) ? undefined : fs.readdirSync(snapshot).find((f) => /\.gguf$/i.test(f));
  const source = gguf ? path.join(snapshot, gguf) : snapshot;
  const key = `${hub.repo.replace('/', '--')}-${path.basename(snapshot).slice(0, 12)}${gguf ? `-${gguf.replace(/\.gguf$/i, '')}` : ''}-g${TALLY_GRAPH_VERSION}`;
  return { dir: convertOnce(source, log, key), name: hub.repo };
}

/** Size and latest change of a file, or of a folder's files (symlinks followed). */
function fingerprint(file: string): { size: number; mtimeMs: number } {
  const stat = fs.statSync(file);
  if (!stat.isDirectory()) return stat;
  return fs.readdirSync(file).map((f) => fingerprint(path.join(file, f))).reduce((a, b) => ({ size: a.size + b.size, mtimeMs: Math.max(a.mtimeMs, b.mtimeMs) }), { size: 0, mtimeMs: 0 });
}

function convertOnce(file: string, log: (msg: string) => void, cacheKey?: string): string {
  const stat = fingerprint(file);
  const key = cacheKey ?? `${path.basename(path.resolve(file)).replace(/\.(gguf|bin)$/, '')}-${stat.size}-${Math.floor(stat.mtimeMs)}-g${TALLY_GRAPH_VERSION}`;
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
