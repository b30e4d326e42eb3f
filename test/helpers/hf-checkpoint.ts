import fs from 'node:fs';
import path from 'node:path';
import { writeSafetensors, type SafetensorsDtype } from '../../src/model/safetensors.ts';
import type { LlamaConfig, WeightMap } from '../../src/model/types.ts';
import { SHARED_MODELS } from './models.ts';

/**
 * Writes a Hugging Face checkpoint folder as transformers' save_pretrained lays it out: config.json,
 * model.safetensors (or model-0000k-of-0000n.safetensors with model.safetensors.index.json), and the tokenizer
 * files of a published model from ../shared/models.
 */
export function writeHfCheckpoint(dir: string, config: LlamaConfig, weights: WeightMap, options: { dtype?: SafetensorsDtype; shards?: number; tokenizerOf?: string } = {}): void {
  const dtype = options.dtype ?? 'BF16';
  const shards = options.shards ?? 1;
  fs.mkdirSync(dir, { recursive: true });
  const torchDtype = { BF16: 'bfloat16', F16: 'float16', F32: 'float32' }[dtype];
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify({ ...config, torch_dtype: torchDtype }, null, 2));
  const names = [...weights.keys()];
  const per = Math.ceil(names.length / shards);
  const weightMap: Record<string, string> = {};
  for (let s = 0; s < shards; s++) {
    const file = shards === 1 ? 'model.safetensors' : `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
    const mine = names.slice(s * per, (s + 1) * per);
    for (const n of mine) weightMap[n] = file;
    writeSafetensors(path.join(dir, file), mine.map((name) => ({ name, dtype, shape: weights.get(name)!.shape, data: weights.get(name)!.data })), { format: 'pt' });
  }
  if (shards > 1) fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }, null, 2));
  const tokenizerOf = path.join(SHARED_MODELS, options.tokenizerOf ?? 'SmolLM2-135M-Instruct');
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
    if (fs.existsSync(path.join(tokenizerOf, f))) fs.copyFileSync(path.join(tokenizerOf, f), path.join(dir, f));
  }
}
