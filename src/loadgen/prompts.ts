/**
 * What the bench sends: synthetic prompts of exact token lengths, or the lines of a JSONL dataset.
 *
 * Synthetic prompts are windows of a fixed English text's tokens, each starting at a random offset (so
 * that prompts share no prefix a cache could reuse). Two forms:
 *   ids  — the prompt is the token-id array itself (vLLM, Tally and llama.cpp take one on /v1/completions):
 *          exactly as long as asked, without a BOS token.
 *   text — the window decoded to text, re-encoded and trimmed or extended until the server's encoding
 *          (special tokens included) has exactly the asked length; needs encode and decode (a local
 *          --tokenizer, or the server's /tokenize and /detokenize). Without a tokenizer the text is cut at
 *          about 4 characters per token and the lengths are only approximate.
 *
 * With a shared prefix (--shared-prefix N:L, as agent frameworks resend one long system prompt on every turn),
 * each prompt is one of N fixed prefixes of L tokens, picked at random, followed by a synthetic part as above
 * (on chat: the prefix as the system message, the rest as the user's): a server with prefix caching computes
 * each prefix once.
 */
import { readFileSync } from 'node:fs';
import { TextTokenizer } from '../model/tokenizer.ts';
import { requestJson, type Target } from './client.ts';
import { normalVariate, seededRandom } from './stats.ts';
import type { RequestSpec } from './types.ts';

/** Text whose tokens make up synthetic prompts (written for this tool). */
export const CORPUS = `Once upon a time, in a small town by the sea, there lived a girl named Lily who loved to build boats out of paper. Every morning she folded a new one, wrote a wish on its sail, and set it on the water to see how far it would go. Her brother Tom laughed at her and said that paper boats always sink, but Lily did not mind. She watched each boat drift past the harbor wall, past the old lighthouse, and out toward the place where the sky touched the waves.
One day a storm came. The wind howled through the streets, the rain drummed on the roofs, and the fishermen pulled their boats high onto the sand. Lily sat by the window and worried about the little boats she had sent out that week. When the storm was over, she ran down to the beach with Tom. The sand was covered in shells, seaweed and pieces of wood, and there, tangled in a net, was one of her paper boats. It was wet and torn, but the wish on its sail could still be read: "I wish my brother would build a boat with me."
Tom was quiet for a long time. Then he picked up a piece of driftwood, took out his pocket knife, and began to carve. By the evening they had made a real boat, small and crooked, with a sail cut from an old shirt. They carried it to the water together and watched it float, bobbing on the gentle waves as the sun went down behind the hills. From that day on, the two of them built a boat every Sunday, and the people of the town came to the harbor to see what they had made.
The teacher at the village school heard about the boats and asked the children to write down how they were built. They measured the wood, counted the nails, and drew pictures of every part. Some of the children wanted to know why a boat floats at all, so the teacher filled a bucket with water and showed them how a heavy stone sinks while a hollow cup of the same weight stays on top. The water pushes up, she said, as hard as the boat pushes down, and as long as the boat keeps the water out it will not sink.
In the spring the town held a race. Twenty boats lined up at the harbor wall, painted red, blue, yellow and green. The mayor blew a whistle, the children cheered, and the wind filled the sails. Lily and Tom's crooked boat was not the fastest, and it was not the prettiest, but it was the only one that reached the lighthouse and came back again. Everyone agreed that it had won something more important than a race, and the old fisherman who kept the lighthouse gave them a brass bell to hang from its mast.`;

export interface BenchTokenizer {
  source: 'local' | 'server';
  encode(text: string, addSpecialTokens: boolean): Promise<number[]>;
  decode?(ids: number[]): Promise<string>;
}

export function localTokenizer(dir: string): BenchTokenizer {
  const tok = TextTokenizer.load(dir);
  return {
    source: 'local',
    encode: async (text, addSpecialTokens) => tok.encode(text, { addSpecialTokens }),
    decode: async (ids) => tok.decode(ids, { skipSpecialTokens: false }),
  };
}

/**
 * The server's tokenizer through vLLM's POST /tokenize {model, prompt} → {tokens} (Tally, vLLM) or
 * llama.cpp's {content} → {tokens}; decode through /detokenize likewise. Undefined when /tokenize fails.
 */
export async function serverTokenizer(target: Target, model: string): Promise<BenchTokenizer | undefined> {
  const tryEncode = async (text: string, special: boolean): Promise<number[] | undefined> => {
    const vllm = await requestJson(target, 'POST', '/tokenize', { model, prompt: text, add_special_tokens: special });
    const tokens = (vllm.json as { tokens?: unknown } | undefined)?.tokens;
    if (vllm.status === 200 && Array.isArray(tokens) && tokens.every((t) => Number.isInteger(t))) return tokens as number[];
    const llama = await requestJson(target, 'POST', '/tokenize', { content: text, add_special: special });
    const t2 = (llama.json as { tokens?: unknown } | undefined)?.tokens;
    if (llama.status === 200 && Array.isArray(t2) && t2.every((t) => Number.isInteger(t))) return t2 as number[];
    return undefined;
  };
  const probe = await tryEncode('Hello world', false);
  if (!probe || probe.length === 0) return undefined;
  let decode: BenchTokenizer['decode'];
  const d = await requestJson(target, 'POST', '/detokenize', { model, tokens: probe });
  const body = d.json as { prompt?: unknown; content?: unknown } | undefined;
  if (d.status === 200 && (typeof body?.prompt === 'string' || typeof body?.content === 'string')) {
    const key = typeof body?.prompt === 'string' ? 'prompt' : 'content';
    decode = async (ids) => {
      const r = await requestJson(target, 'POST', '/detokenize', { model, tokens: ids });
      const text = (r.json as Record<string, unknown> | undefined)?.[key];
      if (typeof text !== 'string') throw new Error(`/detokenize failed: ${r.error ?? 'no text'}`);
      return text;
    };
  }
  return {
    source: 'server',
    encode: async (text, special) => {
      const ids = await tryEncode(text, special);
      if (!ids) throw new Error('/tokenize failed');
      return ids;
    },
    decode,
  };
}

export interface LengthSpec {
  mean: number;
  /** Relative half-width (uniform) or relative standard deviation (normal); 0 is a fixed length. */
  spread: number;
  dist: 'uniform' | 'normal';
}

/** A length drawn from the spec: uniform in [mean·(1−spread), mean·(1+spread)] or normal(mean, mean·spread), rounded, at least 1. */
export function sampleLength(spec: LengthSpec, rand: () => number): number {
  if (spec.spread <= 0) return Math.max(1, Math.round(spec.mean));
  const value = spec.dist === 'normal' ? spec.mean * (1 + spec.spread * normalVariate(rand(), rand())) : spec.mean * (1 - spec.spread + 2 * spec.spread * rand());
  return Math.max(1, Math.round(value));
}

export interface DatasetEntry {
  prompt?: string;
  messages?: unknown[];
  max_tokens?: number;
}

/** JSONL lines {"prompt": "..."} or {"messages": [...]}, each with an optional "max_tokens"; blank lines are skipped. */
export function parseDataset(text: string, name = 'dataset'): DatasetEntry[] {
  const out: DatasetEntry[] = [];
  text.split(/\r?\n/).forEach((line, i) => {
    if (line.trim() === '') return;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (err) {
      throw new Error(`${name}:${i + 1}: not JSON (${(err as Error).message})`);
    }
    const v = value as Record<string, unknown>;
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new Error(`${name}:${i + 1}: each line must be a JSON object`);
    const entry: DatasetEntry = {};
    if (typeof v.prompt === 'string') entry.prompt = v.prompt;
    else if (Array.isArray(v.messages) && v.messages.length > 0) entry.messages = v.messages;
    else throw new Error(`${name}:${i + 1}: needs "prompt" (a string) or "messages" (a non-empty array)`);
    if (v.max_tokens !== undefined) {
      if (!Number.isInteger(v.max_tokens) || (v.max_tokens as number) < 1) throw new Error(`${name}:${i + 1}: "max_tokens" must be a positive integer`);
      entry.max_tokens = v.max_tokens as number;
    }
    out.push(entry);
  });
  if (out.length === 0) throw new Error(`${name}: no prompts`);
  return out;
}

export function readDataset(file: string): DatasetEntry[] {
  return parseDataset(readFileSync(file, 'utf8'), file);
}

/** N distinct prompt prefixes of L tokens each. */
export interface SharedPrefixSpec {
  count: number;
  length: number;
}

/** "N:L" → the spec; throws with what is wrong. */
export function parseSharedPrefix(text: string): SharedPrefixSpec {
  const m = /^(\d+):(\d+)$/.exec(text.trim());
  const count = m ? Number(m[1]) : NaN;
  const length = m ? Number(m[2]) : NaN;
  if (!(count >= 1 && length >= 1)) throw new Error(`--shared-prefix takes N:L, N prefixes of L tokens (got "${text}")`);
  return { count, length };
}

export interface PromptOptions {
  model: string;
  endpoint: 'completions' | 'chat';
  format: 'ids' | 'text';
  input: LengthSpec;
  output: LengthSpec;
  tokenizer?: BenchTokenizer;
  dataset?: DatasetEntry[];
  /** Send ignore_eos and min_tokens so that every request generates exactly its max_tokens. */
  exactOutput: boolean;
  includeUsage: boolean;
  seed: number;
  sharedPrefix?: SharedPrefixSpec;
}

/** Builds prompts on demand, each one once; `take(n)` returns n specs (a dataset cycles). */
export class PromptSource {
  private readonly rand: () => number;
  private corpusIds?: number[];
  private specialCount = 0;
  private datasetIndex = 0;
  /** Prompts whose text encoding missed the asked length. */
  inexact = 0;
  private prefixes?: { ids?: number[]; text: string }[];

  constructor(private readonly options: PromptOptions) {
    this.rand = seededRandom(options.seed);
  }

  private async corpus(): Promise<number[]> {
    if (this.corpusIds) return this.corpusIds;
    const tok = this.options.tokenizer;
    if (!tok) throw new Error('synthetic prompts of exact length need a tokenizer');
    this.corpusIds = await tok.encode(CORPUS, false);
    if (this.corpusIds.length === 0) throw new Error('the tokenizer encodes the corpus to no tokens');
    this.specialCount = (await tok.encode('Hello', true)).length - (await tok.encode('Hello', false)).length;
    return this.corpusIds;
  }

  private window(ids: number[], length: number): number[] {
    const start = Math.floor(this.rand() * ids.length);
    const out: number[] = [];
    for (let i = 0; out.length < length; i++) out.push(ids[(start + i) % ids.length]);
    return out;
  }

  /** Text that encodes (with special tokens) to exactly `length` tokens, or the closest found. */
  private async exactText(length: number): Promise<string> {
    const tok = this.options.tokenizer!;
    const ids = await this.corpus();
    const start = Math.floor(this.rand() * ids.length);
    const windowOf = (k: number) => Array.from({ length: Math.max(1, k) }, (_, i) => ids[(start + i) % ids.length]);
    let k = Math.max(1, length - this.specialCount);
    let best: { text: string; miss: number } | undefined;
    for (let attempt = 0; attempt < 12; attempt++) {
      const text = await tok.decode!(windowOf(k));
      const count = (await tok.encode(text, true)).length;
      const miss = count - length;
      if (!best || Math.abs(miss) < Math.abs(best.miss) || (Math.abs(miss) === Math.abs(best.miss) && miss < 0)) best = { text, miss };
      if (miss === 0) return text;
      const next = Math.max(1, k - miss);
      k = next === k ? k + (miss > 0 ? -1 : 1) : next;
      if (k < 1) break;
    }
    this.inexact++;
    return best!.text;
  }

  private approximateText(length: number): string {
    const chars = length * 4;
    const start = Math.floor(this.rand() * CORPUS.length);
    let text = '';
    while (text.length < chars) text += CORPUS.slice(start) + ' ' + CORPUS.slice(0, start);
    return text.slice(0, chars);
  }

  private body(prompt: string | number[] | undefined, messages: unknown[] | undefined, maxTokens: number, exact: boolean): Record<string, unknown> {
    const o = this.options;
    const body: Record<string, unknown> = { model: o.model, max_tokens: maxTokens };
    if (o.endpoint === 'chat') body.messages = messages ?? [{ role: 'user', content: prompt }];
    else body.prompt = prompt;
    if (exact) {
      body.ignore_eos = true;
      body.min_tokens = maxTokens;
    }
    if (o.includeUsage) body.stream_options = { include_usage: true };
    return body;
  }

  /**
   * The shared prefixes: each a header naming it ("System prompt 3.") and a window of the corpus, together L
   * tokens (ids), or that text (text; its length is approximate without a tokenizer).
   */
  private async sharedPrefixes(spec: SharedPrefixSpec): Promise<{ ids?: number[]; text: string }[]> {
    if (this.prefixes) return this.prefixes;
    const tok = this.options.tokenizer;
    const out: { ids?: number[]; text: string }[] = [];
    for (let i = 0; i < spec.count; i++) {
      const header = `System prompt ${i + 1}. `;
      if (!tok) {
        out.push({ text: header + this.approximateText(Math.max(1, spec.length - header.length / 4)) });
        continue;
      }
      const ids = [...(await tok.encode(header, false)), ...this.window(await this.corpus(), spec.length)].slice(0, spec.length);
      out.push({ ids, text: tok.decode ? await tok.decode(ids) : header + this.approximateText(spec.length) });
    }
    return (this.prefixes = out);
  }

  private async nextShared(spec: SharedPrefixSpec): Promise<RequestSpec> {
    const o = this.options;
    const prefixes = await this.sharedPrefixes(spec);
    const prefix = prefixes[Math.floor(this.rand() * prefixes.length)];
    const inputLen = sampleLength(o.input, this.rand);
    const outputLen = sampleLength(o.output, this.rand);
    const plannedOutput = o.exactOutput ? outputLen : undefined;
    if (o.format === 'ids' && o.endpoint === 'completions' && prefix.ids) {
      const prompt = [...prefix.ids, ...this.window(await this.corpus(), inputLen)];
      return { endpoint: o.endpoint, body: this.body(prompt, undefined, outputLen, o.exactOutput), plannedInput: prompt.length, plannedOutput };
    }
    const rest = o.tokenizer?.decode ? await o.tokenizer.decode(this.window(await this.corpus(), inputLen)) : this.approximateText(inputLen);
    const messages = [{ role: 'system', content: prefix.text }, { role: 'user', content: rest }];
    return { endpoint: o.endpoint, body: this.body(prefix.text + rest, messages, outputLen, o.exactOutput), plannedOutput };
  }

  async next(): Promise<RequestSpec> {
    const o = this.options;
    if (o.sharedPrefix && !o.dataset) return this.nextShared(o.sharedPrefix);
    if (o.dataset) {
      const entry = o.dataset[this.datasetIndex++ % o.dataset.length];
      const maxTokens = entry.max_tokens ?? sampleLength(o.output, this.rand);
      if (o.endpoint === 'completions' && entry.prompt === undefined) throw new Error('a dataset line has "messages": use --endpoint chat');
      return { endpoint: o.endpoint, body: this.body(entry.prompt, entry.messages, maxTokens, o.exactOutput), plannedOutput: o.exactOutput ? maxTokens : undefined };
    }
    const inputLen = sampleLength(o.input, this.rand);
    const outputLen = sampleLength(o.output, this.rand);
    const plannedOutput = o.exactOutput ? outputLen : undefined;
    if (o.format === 'ids' && o.endpoint === 'completions' && o.tokenizer) {
      const prompt = this.window(await this.corpus(), inputLen);
      return { endpoint: o.endpoint, body: this.body(prompt, undefined, outputLen, o.exactOutput), plannedInput: inputLen, plannedOutput };
    }
    if (o.tokenizer?.decode) {
      const before = this.inexact;
      const text = await this.exactText(inputLen);
      // Chat templates add tokens around the message, so only completions know the prompt length.
      const planned = o.endpoint === 'completions' && this.inexact === before ? inputLen : undefined;
      return { endpoint: o.endpoint, body: this.body(text, undefined, outputLen, o.exactOutput), plannedInput: planned, plannedOutput };
    }
    this.inexact++;
    return { endpoint: o.endpoint, body: this.body(this.approximateText(inputLen), undefined, outputLen, o.exactOutput), plannedOutput };
  }

  async take(n: number): Promise<RequestSpec[]> {
    const out: RequestSpec[] = [];
    for (let i = 0; i < n; i++) out.push(await this.next());
    return out;
  }
}
