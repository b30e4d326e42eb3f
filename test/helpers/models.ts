import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { convertCheckpoint, convertRandomLike } from '../../src/model/convert.ts';
import type { LlamaConfig } from '../../src/model/types.ts';
import { isModelFolder } from '../../src/model/folder.ts';

export const SHARED_MODELS = path.resolve(process.cwd(), '../shared/models');
/** Keyed by the converter's source, so a changed converter never reuses an old conversion. */
const SOURCE_KEY = (() => {
  const dir = path.resolve(path.dirname(new URL(import.meta.url).pathname), '../../src/model');
  const hash = createHash('sha256');
  for (const f of fs.readdirSync(dir).sort()) hash.update(f).update(fs.readFileSync(path.join(dir, f)));
  return hash.digest('hex').slice(0, 12);
})();
const CACHE = path.join(os.tmpdir(), `tally-test-models-${SOURCE_KEY}`);

function once(name: string, build: (dir: string) => void): string {
  const dir = path.join(CACHE, name);
  if (!isModelFolder(dir)) {
    const tmp = `${dir}.tmp-${process.pid}`;
    fs.rmSync(tmp, { recursive: true, force: true });
    build(tmp);
    fs.rmSync(dir, { recursive: true, force: true });
    fs.renameSync(tmp, dir);
  }
  return dir;
}

/** stories260K converted from its GGUF by Tally's own converter (`tally convert --dtype` as given). */
export function storiesModel(dtype: 'float32' | 'float16' = 'float32'): string {
  const name = dtype === 'float32' ? 'stories260K' : `stories260K-${dtype}`;
  return once(name, (dir) => convertCheckpoint(path.join(SHARED_MODELS, 'stories260K', 'stories260K.gguf'), dir, { dtype }));
}

/** A small random-weight model with a published model's tokenizer and chat template. */
export function randomLike(published: 'SmolLM2-135M-Instruct' | 'Qwen2.5-0.5B-Instruct' | 'TinyLlama-1.1B-Chat-v1.0', overrides: Partial<LlamaConfig> = { num_hidden_layers: 2, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16 }): string {
  const key = `${published}-${Object.entries(overrides).map(([k, v]) => `${k}=${v}`).join(',')}`;
  return once(key.replace(/[^\w.,=-]/g, '_'), (dir) => convertRandomLike(path.join(SHARED_MODELS, published), dir, { seed: 1, overrides }));
}
