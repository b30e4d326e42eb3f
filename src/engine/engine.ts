import { loadModelFolder, type ModelFolder } from '../model/folder.ts';
import { TextTokenizer } from '../model/tokenizer.ts';
import { modelShape } from '../meter/attribution.ts';
import { createRunner } from './session.ts';
import { kvCacheDtypeOf } from './runner.ts';
import { Scheduler, type RequestEvent, type StepRecord } from './scheduler.ts';
import { type EngineOptions, resolveLimits } from './engine-options.ts';
import type { SchedulerLimits } from './scheduler.ts';
import type { KvCacheDtype } from './paged-runner.ts';

export interface EngineInfo {
  model: string;
  modelDir: string;
  device: string;
  deviceNote?: string;
  runner: 'tally' | 'plain' | 'paged';
  /** Intra-op threads on the CPU. */
  threads: number;
  kvCacheDtype: KvCacheDtype;
  limits: SchedulerLimits;
  eosIds: number[];
  vocabSize: number;
}

/** generation_config's eos ids, else the tokenizer's. */
export function eosIdsOf(folder: ModelFolder, tokenizer: TextTokenizer): number[] {
  const fromGen = folder.generationConfig.eos_token_id ?? folder.config.eos_token_id;
  const ids = fromGen === undefined ? [] : Array.isArray(fromGen) ? (fromGen as number[]) : [fromGen as number];
  return [...new Set([...ids, ...tokenizer.eosIds])];
}

/** Loads a model folder and builds its scheduler, in whatever thread calls it. */
export async function createEngine(
  options: EngineOptions,
  emit: (events: RequestEvent[]) => void,
  onStep: (record: StepRecord) => void,
): Promise<{ scheduler: Scheduler; info: EngineInfo; tokenizer: TextTokenizer; release: () => Promise<void> }> {
  const folder = loadModelFolder(options.modelDir);
  const tokenizer = TextTokenizer.load(folder.dir);
  const checked = resolveLimits(folder, options);
  const { runner, device, threads, note } = await createRunner(folder, {
    device: options.device,
    threads: options.threads,
    spinWait: options.spinWait,
    maxSlots: checked.maxNumSeqs,
    maxModelLen: checked.maxModelLen,
    attention: options.attention,
    kvCacheDtype: options.kvCacheDtype,
    kvCacheTokens: options.kvCacheTokens,
    kvCacheBytes: options.kvCacheBytes,
  });
  // The cache's element type is known once the session is open; --kv-cache-gb holds twice the tokens in float16.
  const limits = resolveLimits(folder, options, runner.kvElementBytes);
  const eosIds = eosIdsOf(folder, tokenizer);
  const scheduler = new Scheduler(runner, tokenizer, modelShape(folder.config), eosIds, limits, emit, onStep);
  return {
    scheduler,
    tokenizer,
    info: { model: folder.name, modelDir: folder.dir, device, deviceNote: note, runner: runner.kind, threads, kvCacheDtype: kvCacheDtypeOf(runner), limits, eosIds, vocabSize: runner.vocabSize },
    release: () => runner.release(),
  };
}
