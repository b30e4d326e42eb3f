import path from 'node:path';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { convertRandomLike, type QuantChoice } from '../src/model/convert.ts';
import { isModelFolder } from '../src/model/folder.ts';
import { TALLY_GRAPH_VERSION } from '../src/model/llama-graph.ts';
import { modelsDir } from '../src/model/resolve.ts';
import type { EngineOptions } from '../src/engine/protocol.ts';
import type { GenerationRequest } from '../src/engine/protocol.ts';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

/**
 * A converted random-weight model of a published shape (`like`: a folder of ../shared/models), fp32 or quantised,
 * built once into models/.cache (the converter's graph version in the key).
 */
export function randomShapeModel(like: string, quant?: QuantChoice): string {
  const dir = path.join(modelsDir(), '.cache', `${like}-shape-random-g${TALLY_GRAPH_VERSION}-${quant ?? 'fp32'}`);
  if (!isModelFolder(dir)) {
    const t0 = performance.now();
    convertRandomLike(path.resolve(ROOT, '../shared/models', like), dir, { seed: 1, quant });
    console.log(`converted a random-weight ${like} (${quant ?? 'fp32'}) in ${((performance.now() - t0) / 1000).toFixed(0)} s: ${dir}`);
  }
  return dir;
}

/** A random-weight model of SmolLM2-135M's shape (its real tokenizer), fp32. */
export function smolLM2ShapeModel(): string {
  return randomShapeModel('SmolLM2-135M-Instruct');
}

export const GREEDY = { temperature: 0, topP: 1, topK: 0, minP: 0, repetitionPenalty: 1, presencePenalty: 0, frequencyPenalty: 0 };

export interface LoopResult {
  outputTokens: number;
  seconds: number;
  tokensPerSecond: number;
  busySeconds: number;
  steps: number;
}

/**
 * The bare engine loop: `concurrency` closed-loop clients submit straight into the scheduler (no HTTP,
 * no worker), each re-submitting as soon as its request ends, until `requests` have finished.
 */
export async function engineLoop(
  options: EngineOptions,
  prompt: (i: number) => number[],
  concurrency: number,
  requests: number,
  maxTokens: number,
): Promise<LoopResult> {
  let done = 0;
  let started = 0;
  let outputTokens = 0;
  let busySeconds = 0;
  let steps = 0;
  let t0 = 0;
  let finish!: () => void;
  const finished = new Promise<void>((r) => (finish = r));
  const engine = await createEngineCore(
    options,
    (events) => {
      for (const e of events) {
        outputTokens += e.tokens.length;
        if (e.finish) {
          if (e.finish === 'error') throw new Error(e.error);
          done++;
          if (started < requests) submit();
          else if (done === requests) finish();
        }
      }
    },
    (record) => {
      busySeconds += record.busySeconds;
      steps++;
    },
  );
  const submit = () => {
    const i = started++;
    const req: GenerationRequest = { id: String(i), promptIds: prompt(i), maxTokens, minTokens: 0, ignoreEos: true, stop: [], stopTokenIds: [], sampling: GREEDY };
    engine.scheduler.submit(req);
  };
  const loop = engine.scheduler.run();
  t0 = performance.now();
  for (let i = 0; i < Math.min(concurrency, requests); i++) submit();
  await finished;
  const seconds = (performance.now() - t0) / 1000;
  engine.scheduler.stop();
  await loop;
  await engine.release();
  return { outputTokens, seconds, tokensPerSecond: outputTokens / seconds, busySeconds, steps };
}
