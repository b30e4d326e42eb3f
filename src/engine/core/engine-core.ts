import { loadModelFolder, type ModelFolder } from '../../model/folder.ts';
import { TextTokenizer } from '../../model/tokenizer.ts';
import { modelShape } from '../../meter/attribution.ts';
import { loadRunner } from '../runners/load.ts';
import { kvCacheDtypeOf, type ModelRunner } from '../runners/runner.ts';
import type { EngineInfo, EngineOptions, RequestEvent, StepRecord } from '../protocol.ts';
import { Scheduler } from './scheduler.ts';
import { resolveLimits } from './limits.ts';

/** The worker side of the engine: the loaded model's runner and the scheduler that drives it. */
export interface EngineCore {
  scheduler: Scheduler;
  runner: ModelRunner;
  info: EngineInfo;
  tokenizer: TextTokenizer;
  release(): Promise<void>;
}

/** generation_config's eos ids, else the tokenizer's. */
export function eosIdsOf(folder: ModelFolder, tokenizer: TextTokenizer): number[] {
  const fromGen = folder.generationConfig.eos_token_id ?? folder.config.eos_token_id;
  const ids = fromGen === undefined ? [] : Array.isArray(fromGen) ? (fromGen as number[]) : [fromGen as number];
  return [...new Set([...ids, ...tokenizer.eosIds])];
}

/** Loads a model folder and builds its scheduler, in whatever thread calls it. */
export async function createEngineCore(
  options: EngineOptions,
  emit: (events: RequestEvent[]) => void,
  onStep: (record: StepRecord) => void,
): Promise<EngineCore> {
  const folder = loadModelFolder(options.modelDir);
  const tokenizer = TextTokenizer.load(folder.dir);
  const checked = resolveLimits(folder, options);
  const { runner, device, threads, note } = await loadRunner(folder, {
    device: options.device,
    threads: options.threads,
    spinWait: options.spinWait,
    maxSlots: checked.maxNumSeqs,
    maxModelLen: checked.maxModelLen,
    attention: options.attention,
    kvCacheDtype: options.kvCacheDtype,
    runner: options.runner,
    ortLibrary: options.ortLibrary,
    kvCacheTokens: options.kvCacheTokens,
    kvCacheBytes: options.kvCacheBytes,
    prefixCache: options.prefixCache,
  });
  // The cache's element type is known once the session is open; the byte budget holds twice the tokens in float16.
  const limits = resolveLimits(folder, options, runner.kvElementBytes);
  const eosIds = eosIdsOf(folder, tokenizer);
  const scheduler = new Scheduler(runner, tokenizer, modelShape(folder.config), eosIds, limits, emit, onStep);
  return {
    scheduler,
    runner,
    tokenizer,
    info: { model: folder.name, modelDir: folder.dir, device, deviceNote: note, runner: runner.kind, threads, kvCacheDtype: kvCacheDtypeOf(runner), prefixCache: runner.prefixCache !== undefined, limits, eosIds, vocabSize: runner.vocabSize },
    release: () => runner.release(),
  };
}
