/**
 * --spin-wait on the native runner, off against on, side by side: the runner's decode passes (p50 wall, as the
 * scheduler sees them) at batch 1 and 32, after short and long prompts per row. Each side runs in a process of its
 * own (ONNX Runtime's env, and the runner's shared thread pool with it, is made once per process), the sides
 * alternating round by round.
 *   node --import tsx bench/spin.ts [--model smollm2-int4] [--rounds 2]
 * smollm2 / smollm2-int8 / smollm2-int4: SmolLM2-135M's shape with random weights (bench/lib.ts).
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { loadRunner } from '../src/engine/runners/load.ts';
import { loadModelFolder } from '../src/model/folder.ts';
import type { QuantChoice } from '../src/model/convert.ts';
import { randomShapeModel } from './lib.ts';

const arg = (name: string, fallback: string) => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
};
const model = arg('model', 'smollm2-int4');
const rounds = Number(arg('rounds', '2'));
/** [batch, prompt tokens per row]. */
const CASES: [number, number][] = [[1, 64], [1, 2000], [32, 64], [32, 1000]];

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};

async function child(spin: boolean): Promise<void> {
  const smol = /^smollm2(?:-(int8|int4))?$/.exec(model);
  if (!smol) throw new Error(`--model: smollm2, smollm2-int8 or smollm2-int4 (got ${model})`);
  const folder = loadModelFolder(randomShapeModel('SmolLM2-135M-Instruct', smol[1] as QuantChoice | undefined));
  const { runner } = await loadRunner(folder, { device: { kind: 'cpu' }, runner: 'native', spinWait: spin, maxSlots: 32, maxModelLen: 4096, kvCacheTokens: 40 * 1024 });
  const result: number[] = [];
  for (const [B, prompt] of CASES) {
    for (let s = 0; s < B; s++) {
      runner.open(s);
      await runner.forwardTop!([{ seq: s, tokens: Array.from({ length: prompt }, (_, i) => 3 + ((i * 7 + s) % 300)) }], 1);
    }
    const walls: number[] = [];
    for (let i = 0; i < (B === 1 ? 100 : 20); i++) {
      const t0 = performance.now();
      await runner.forwardTop!(Array.from({ length: B }, (_, s) => ({ seq: s, tokens: [3 + ((i + s) % 300)] })), 1);
      walls.push(performance.now() - t0);
    }
    result.push(median(walls));
    for (let s = 0; s < B; s++) runner.close(s);
  }
  await runner.release();
  console.log(JSON.stringify(result));
}

if (process.argv.includes('--child')) {
  await child(arg('spin', '0') === '1');
} else {
  const passes: Record<'off' | 'on', number[][]> = { off: [], on: [] };
  for (let round = 0; round < rounds; round++) {
    for (const side of round % 2 ? (['on', 'off'] as const) : (['off', 'on'] as const)) {
      const r = spawnSync(process.execPath, ['--import', 'tsx', fileURLToPath(import.meta.url), '--child', '--model', model, '--spin', side === 'on' ? '1' : '0'], { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`the ${side} side failed: ${r.stderr}`);
      passes[side].push(JSON.parse(r.stdout.trim().split('\n').at(-1)!) as number[]);
    }
  }
  console.log(`${model}, native runner decode passes, --spin-wait off / on (${rounds} rounds, p50 ms per pass, medians)`);
  console.log('batch  prompt      off       on   on/off   rounds');
  CASES.forEach(([B, prompt], i) => {
    const [off, on] = [median(passes.off.map((p) => p[i])), median(passes.on.map((p) => p[i]))];
    const each = passes.on.map((p, r) => (p[i] / passes.off[r][i]).toFixed(2)).join(' ');
    console.log(`${String(B).padStart(5)}  ${String(prompt).padStart(6)} ${off.toFixed(2).padStart(8)} ${on.toFixed(2).padStart(8)} ${(on / off).toFixed(3).padStart(8)}   ${each}`);
  });
}
