/**
 * Peak memory of `tally convert` on a Hugging Face checkpoint: writes a random-weight bf16 checkpoint of a
 * published shape (default TinyLlama-1.1B, ~2.2 GB) into a temporary folder, converts it in a child process
 * (float32 output, ~4.4 GB) and prints that process's peak RSS beside the largest tensor's and the whole
 * model's float32 size. Deletes both folders afterwards.
 *
 *   node --import tsx bench/convert-memory.ts [--like ../shared/models/TinyLlama-1.1B-Chat-v1.0] [--tmp /tmp]
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { hfWeightShapes } from '../src/model/gguf.ts';
import { normalizeHfConfig } from '../src/model/hf-checkpoint.ts';
import { seededUniform } from '../src/model/random.ts';
import { writeSafetensors } from '../src/model/safetensors.ts';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const { values } = parseArgs({ options: { like: { type: 'string' }, tmp: { type: 'string' }, child: { type: 'string', multiple: true } } });

if (values.child) {
  const { convertCheckpoint } = await import('../src/model/convert.ts');
  const started = Date.now();
  convertCheckpoint(values.child[0], values.child[1]);
  console.log(JSON.stringify({ seconds: (Date.now() - started) / 1000, maxRssBytes: process.resourceUsage().maxRSS * 1024 }));
  process.exit(0);
}

const like = path.resolve(values.like ?? path.join(ROOT, '../shared/models/TinyLlama-1.1B-Chat-v1.0'));
const work = fs.mkdtempSync(path.join(values.tmp ?? os.tmpdir(), 'tally-convert-memory-'));
try {
  const raw = JSON.parse(fs.readFileSync(path.join(like, 'config.json'), 'utf8'));
  const config = normalizeHfConfig(raw, like);
  const shapes = hfWeightShapes(config);
  const ckpt = path.join(work, 'checkpoint');
  fs.mkdirSync(ckpt);
  for (const f of ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json']) {
    if (fs.existsSync(path.join(like, f))) fs.copyFileSync(path.join(like, f), path.join(ckpt, f));
  }
  const rand = seededUniform(1);
  const started = Date.now();
  writeSafetensors(
    path.join(ckpt, 'model.safetensors'),
    [...shapes].map(([name, shape]) => ({
      name,
      dtype: 'BF16' as const,
      shape,
      data: () => {
        const d = new Float32Array(shape.reduce((a, b) => a * b, 1));
        if (name.includes('norm')) d.fill(1);
        else for (let i = 0; i < d.length; i++) d[i] = (rand() * 2 - 1) * 0.035;
        return d;
      },
    })),
  );
  const elems = [...shapes.values()].map((s) => s.reduce((a, b) => a * b, 1));
  const largest = Math.max(...elems) * 4;
  const model = elems.reduce((a, b) => a + b, 0) * 4;
  console.log(`checkpoint: ${path.basename(like)} shape, ${(fs.statSync(path.join(ckpt, 'model.safetensors')).size / 1e9).toFixed(2)} GB bf16, written in ${((Date.now() - started) / 1000).toFixed(0)} s`);

  const baseline = spawnSync(process.execPath, ['--import', 'tsx', '-e', "await import('./src/model/convert.ts'); console.log(process.resourceUsage().maxRSS * 1024)"], { cwd: ROOT, encoding: 'utf8' });
  const child = spawnSync(process.execPath, ['--import', 'tsx', path.join(ROOT, 'bench/convert-memory.ts'), '--child', ckpt, '--child', path.join(work, 'converted')], { cwd: ROOT, encoding: 'utf8' });
  if (child.status !== 0) throw new Error(`conversion failed: ${child.stderr}`);
  const result = JSON.parse(child.stdout.trim().split('\n').pop()!);
  const mb = (b: number) => `${(b / 2 ** 20).toFixed(0)} MiB`;
  const peak = result.maxRssBytes;
  const idle = Number(baseline.stdout.trim());
  console.log(`converted in ${result.seconds.toFixed(0)} s to float32 (${(fs.statSync(path.join(work, 'converted/onnx/model.onnx_data')).size / 1e9).toFixed(2)} GB)`);
  console.log(`peak RSS of the conversion:         ${mb(peak)}`);
  console.log(`  the same process before any work: ${mb(idle)}`);
  console.log(`largest tensor (float32):           ${mb(largest)}`);
  console.log(`whole model (float32):              ${mb(model)}`);
  console.log(`(peak - idle) / largest tensor:     ${((peak - idle) / largest).toFixed(2)}`);
  console.log(`(peak - idle) / whole model:        ${((peak - idle) / model).toFixed(3)}`);
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
