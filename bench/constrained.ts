/**
 * Constrained decoding, side by side in one run:
 *   0. the cost of one full mask (what a refused draw pays) by grammar state, for a 49k and a 152k vocabulary;
 *   1. engine loop at c=32 on the SmolLM2-135M shape (random weights): output tokens/s with a json_schema on every
 *      request against none, rounds alternating, greedy and sampled (temperature 1); and how many tokens needed a
 *      full mask (outside strings, or a refused draw inside one), with the mask's mean cost;
 *   2. a 5-turn agent loop through the openai SDK against `tally serve` (random-weight Qwen2.5 shape, forced tool
 *      calls, growing history): every call validated with ajv; prefix-cache hits printed where usage has them.
 *
 *   node --import tsx bench/constrained.ts [--quick]
 */
import path from 'node:path';
import { Ajv } from 'ajv';
import OpenAI from 'openai';
import { createEngineCore } from '../src/engine/core/engine-core.ts';
import { CompiledGrammar, GrammarMatcher, TokenTable } from '../src/engine/core/grammar.ts';
import { TextTokenizer } from '../src/model/tokenizer.ts';
import type { EngineOptions, GenerationRequest, OutputConstraint, SamplingParams } from '../src/engine/protocol.ts';
import { responseFormatConstraint } from '../src/server/structured-output.ts';
import { randomLike } from '../test/helpers/models.ts';
import { GREEDY, smolLM2ShapeModel } from './lib.ts';
import { startServerProcess } from './server-process.ts';

const ROOT = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');
const quick = process.argv.includes('--quick');
const CONCURRENCY = 32;
const REQUESTS = quick ? 32 : 64;
const MAX_TOKENS = 64;
const ROUNDS = quick ? 1 : 3;

const SCHEMA = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 40 },
    age: { type: 'integer' },
    email: { type: 'string' },
    tags: { type: 'array', items: { enum: ['a', 'b', 'c'] }, maxItems: 4 },
    address: { type: 'object', properties: { city: { type: 'string' }, zip: { type: ['string', 'null'] } }, required: ['city'] },
  },
  required: ['name', 'age', 'address'],
  additionalProperties: false,
};


/** Mask statistics, counted by wrapping the matcher's methods for one point. */
const stats = { drawn: 0, refused: 0, maskMs: 0 };
function countMasks(): () => void {
  const proto = GrammarMatcher.prototype;
  const { accept, apply } = proto;
  proto.accept = function (this: GrammarMatcher, t: number) {
    stats.drawn++;
    accept.call(this, t);
  };
  proto.apply = function (this: GrammarMatcher, row: Float32Array) {
    stats.refused++;
    const t0 = performance.now();
    apply.call(this, row);
    stats.maskMs += performance.now() - t0;
  };
  return () => Object.assign(proto, { accept, apply });
}

type Core = Awaited<ReturnType<typeof createEngineCore>>;

/** Closed-loop clients straight into the scheduler, as bench/lib.ts's engineLoop, on an engine already loaded. */
async function loop(core: { engine: Core; resolve?: () => void; onEvent?: (done: boolean, tokens: number) => void }, sampling: SamplingParams, constraint: OutputConstraint | undefined): Promise<number> {
  let started = 0;
  let done = 0;
  let tokens = 0;
  let finish!: () => void;
  const finished = new Promise<void>((r) => (finish = r));
  const submit = (): void => {
    const i = started++;
    const req: GenerationRequest = { id: `r${i}-${Math.random()}`, promptIds: PROMPT, maxTokens: MAX_TOKENS, minTokens: 0, ignoreEos: false, stop: [], stopTokenIds: [], sampling: { ...sampling, seed: i } };
    if (constraint) req.constraint = constraint;
    core.engine.scheduler.submit(req);
  };
  core.onEvent = (ended, n) => {
    tokens += n;
    if (!ended) return;
    done++;
    if (started < REQUESTS) submit();
    else if (done === REQUESTS) finish();
  };
  const t0 = performance.now();
  for (let i = 0; i < CONCURRENCY; i++) submit();
  await finished;
  return tokens / ((performance.now() - t0) / 1000);
}

let PROMPT: number[] = [];

async function enginePart(): Promise<void> {
  const dir = smolLM2ShapeModel();
  const holder: { engine: Core; onEvent?: (done: boolean, tokens: number) => void } = {} as never;
  const options: EngineOptions = { modelDir: dir, device: { kind: 'cpu' }, maxNumSeqs: CONCURRENCY, maxNumBatchedTokens: 2048, kvCacheBytes: 2 ** 30 };
  holder.engine = await createEngineCore(options, (events) => {
    for (const e of events) {
      if (e.finish === 'error') throw new Error(e.error);
      holder.onEvent?.(e.finish !== undefined, e.tokens.length);
    }
  }, () => {});
  PROMPT = holder.engine.tokenizer.encode('Write a JSON record of a person:');
  const constraint = responseFormatConstraint({ type: 'json_schema', json_schema: { schema: SCHEMA } })!;
  const run = holder.engine.scheduler.run();
  const sampled: SamplingParams = { ...GREEDY, temperature: 1 };
  // Warm-up: the token table is built on the first constrained request.
  const t0 = performance.now();
  await loop(holder, GREEDY, constraint);
  console.log(`warm-up (includes building the token table once): ${((performance.now() - t0) / 1000).toFixed(1)} s`);

  console.log(`\n1. engine loop, SmolLM2-135M shape (random weights), c=${CONCURRENCY}, ${REQUESTS} requests of at most ${MAX_TOKENS} tokens per point, ${ROUNDS} round(s), points alternating`);
  for (const [label, sampling] of [['greedy', GREEDY], ['temperature 1', sampled]] as const) {
    const ratios: number[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      // Which goes first alternates by round, so that a drift in the machine's load favours neither.
      const measureConstrained = async (): Promise<number> => {
        Object.assign(stats, { drawn: 0, refused: 0, maskMs: 0 });
        const restore = countMasks();
        const tps = await loop(holder, sampling, constraint);
        restore();
        return tps;
      };
      let free: number;
      let constrained: number;
      if (r % 2 === 0) {
        free = await loop(holder, sampling, undefined);
        constrained = await measureConstrained();
      } else {
        constrained = await measureConstrained();
        free = await loop(holder, sampling, undefined);
      }
      ratios.push(constrained / free);
      console.log(`  ${label}, round ${r + 1}: unconstrained ${free.toFixed(1)} tok/s, json_schema ${constrained.toFixed(1)} tok/s, ratio ${(constrained / free).toFixed(3)}; full masks ${stats.refused} for ${stats.drawn} tokens (${((100 * stats.refused) / Math.max(1, stats.drawn)).toFixed(1)}%: outside strings, and refused draws in them), ${(stats.maskMs / Math.max(1, stats.refused)).toFixed(2)} ms each`);
    }
    const sorted = [...ratios].sort((a, b) => a - b);
    console.log(`  ${label}: json_schema / unconstrained tokens/s, median ${sorted[Math.floor(sorted.length / 2)].toFixed(3)} (bar: ≥ 0.8)`);
  }
  holder.engine.scheduler.stop();
  await run;
  await holder.engine.release();
}

async function agentPart(): Promise<void> {
  const dir = randomLike('Qwen2.5-0.5B-Instruct');
  const server = await startServerProcess(dir, ['--max-model-len', '2048']);
  try {
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'x', maxRetries: 0 });
    const weather = { type: 'object', properties: { city: { type: 'string', maxLength: 24 }, unit: { enum: ['celsius', 'fahrenheit'] } }, required: ['city', 'unit'], additionalProperties: false };
    const search = { type: 'object', properties: { query: { type: 'string', maxLength: 40 }, limit: { type: 'integer' } }, required: ['query'] };
    const schemas: Record<string, object> = { get_weather: weather, search };
    const tools: OpenAI.ChatCompletionTool[] = Object.entries(schemas).map(([name, parameters]) => ({ type: 'function', function: { name, parameters: parameters as Record<string, unknown> } }));
    const ajv = new Ajv({ strict: false });
    const messages: OpenAI.ChatCompletionMessageParam[] = [{ role: 'system', content: 'You are a travel agent.' }, { role: 'user', content: 'Plan a weekend in Lisbon.' }];
    console.log('\n2. agent loop through the openai SDK (random-weight Qwen2.5 shape, tool_choice "required", 5 turns, history growing)');
    let valid = 0;
    for (let turn = 1; turn <= 5; turn++) {
      const r = await client.chat.completions.create({ model: path.basename(dir), messages, tools, tool_choice: 'required', max_tokens: 80 });
      const msg = r.choices[0].message;
      const call = msg.tool_calls?.[0];
      const ok = call?.type === 'function' && ajv.compile(schemas[call.function.name] ?? false)(JSON.parse(call.function.arguments));
      if (ok) valid++;
      const cached = (r.usage as { prompt_tokens_details?: { cached_tokens?: number } } | undefined)?.prompt_tokens_details?.cached_tokens;
      const hit = cached === undefined ? 'no prompt_tokens_details' : `prefix hit ${((100 * cached) / r.usage!.prompt_tokens).toFixed(0)}%`;
      console.log(`  turn ${turn}: prompt ${r.usage?.prompt_tokens} tokens, ${hit}, finish ${r.choices[0].finish_reason}, call ${call?.type === 'function' ? `${call.function.name}(${call.function.arguments})` : 'none'} ${ok ? 'valid' : 'INVALID'}`);
      messages.push(msg as OpenAI.ChatCompletionAssistantMessageParam);
      messages.push({ role: 'tool', tool_call_id: call?.id ?? 'none', content: JSON.stringify({ ok: true, turn }) });
    }
    console.log(`  valid tool calls: ${valid}/5`);
  } finally {
    await server.stop();
  }
}

function maskPart(): void {
  console.log('0. one full mask (a refused draw), mean of 40 after one warm-up, by state');
  const states: [string, string][] = [['object start', ''], ['in a string', '{"name": "ab'], ['after a colon', '{"name": "ab", "age":'], ['in a number', '{"name": "ab", "age": 12'], ['in an enum', '{"name": "a", "age": 1, "tags": ["']];
  for (const model of ['SmolLM2-135M-Instruct', 'Qwen2.5-0.5B-Instruct']) {
    const tokenizer = TextTokenizer.load(path.resolve(ROOT, '../shared/models', model));
    let t0 = performance.now();
    const table = TokenTable.of(tokenizer, tokenizer.vocabSize);
    const g = new CompiledGrammar(responseFormatConstraint({ type: 'json_schema', json_schema: { schema: SCHEMA } })!, table);
    const built = performance.now() - t0;
    const cells: string[] = [];
    for (const [label, prefix] of states) {
      const m = new GrammarMatcher(g, tokenizer.eosIds);
      if (!m.acceptText(prefix)) throw new Error(`not a prefix: ${prefix}`);
      m.budget = MAX_TOKENS;
      m.mask();
      t0 = performance.now();
      for (let i = 0; i < 40; i++) m.mask();
      cells.push(`${label} ${((performance.now() - t0) / 40).toFixed(2)} ms`);
    }
    console.log(`  ${model} (${tokenizer.vocabSize} tokens; token table built in ${built.toFixed(0)} ms): ${cells.join(', ')}`);
  }
}

maskPart();
await enginePart();
await agentPart();
