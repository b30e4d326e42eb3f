import { describe, it, expect } from 'vitest';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { parseSentencePieceModel } from '../src/model/sentencepiece.js';
import { parseLlama2cTokenizer } from '../src/model/llama2c-tokenizer.js';
import { buildTokenizerFiles } from '../src/model/tokenizer-json.js';
import { TextTokenizer } from '../src/model/tokenizer.js';
import { PieceType, type SpVocab } from '../src/model/types.js';

const MODELS = path.resolve(process.cwd(), '../shared/models');
const STORIES = path.join(MODELS, 'stories260K');
const LILY = 'Once upon a time, there was a little girl named Lily.';

interface SpCase {
  text: string;
  ids: number[];
  idsKeepWhitespace: number[];
}
const fixture = JSON.parse(readFileSync(new URL('./fixtures/sp-stories260K.json', import.meta.url), 'utf8')) as {
  cases: SpCase[];
};
const TEXTS = fixture.cases.map((c) => c.text);

/** llama2.c run.c `encode()` (bos=1, eos=0), over a vocabulary whose pieces use '▁' where tokenizer.bin has ' '. */
function llama2cEncode(vocab: SpVocab, text: string): number[] {
  const pieces = vocab.pieces.map((p) => p.piece);
  const lookup = new Map(pieces.map((p, i) => [p, i]));
  const tokens = [1];
  if (text !== '') tokens.push(lookup.get('\u2581')!);
  for (const ch of text.replaceAll(' ', '\u2581')) {
    const id = lookup.get(ch);
    if (id !== undefined) tokens.push(id);
    else for (const b of new TextEncoder().encode(ch)) tokens.push(b + 3);
  }
  for (;;) {
    let bestScore = -1e10;
    let bestId = -1;
    let bestIdx = -1;
    for (let i = 0; i < tokens.length - 1; i++) {
      const id = lookup.get(pieces[tokens[i]!]! + pieces[tokens[i + 1]!]!);
      if (id !== undefined && vocab.pieces[id]!.score > bestScore) {
        bestScore = vocab.pieces[id]!.score;
        bestId = id;
        bestIdx = i;
      }
    }
    if (bestIdx === -1) return tokens;
    tokens.splice(bestIdx, 2, bestId);
  }
}

/** SentencePiece's remove_extra_whitespaces: strip spaces at both ends, collapse runs of spaces. */
function collapseSpaces(text: string): string {
  return text.replace(/ +/g, ' ').replace(/^ /, '').replace(/ $/, '');
}

function mulberry32(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Strings made of vocabulary pieces, whitespace and characters that need byte fallback. */
function randomTexts(vocab: SpVocab, count: number, seed: number): string[] {
  const rand = mulberry32(seed);
  const normal = vocab.pieces.filter((p) => p.type === PieceType.Normal).map((p) => p.piece.replaceAll('\u2581', ' '));
  const extra = [' ', '  ', '\n', '\t', 'é', 'ü', 'ß', '中', '文', '😀', '🎉', '\u00a0', '—', '’'];
  return Array.from({ length: count }, () => {
    const parts = Array.from({ length: 1 + Math.floor(rand() * 10) }, () =>
      rand() < 0.75 ? normal[Math.floor(rand() * normal.length)]! : extra[Math.floor(rand() * extra.length)]!,
    );
    return parts.join('');
  });
}

function streamDecode(tok: TextTokenizer, ids: number[], skipSpecialTokens = true): { pushes: string[]; text: string } {
  const dec = tok.decodeStream({ skipSpecialTokens });
  const pushes = ids.map((id) => dec.push(id));
  return { pushes, text: pushes.join('') + dec.flush() };
}

/** The streamed text equals a full decode for every prefix of `ids`, and never runs ahead of it. */
function expectStreamMatches(tok: TextTokenizer, ids: number[], skipSpecialTokens = true): void {
  for (let k = 1; k <= ids.length; k++) {
    const full = tok.decode(ids.slice(0, k), { skipSpecialTokens });
    const { pushes, text } = streamDecode(tok, ids.slice(0, k), skipSpecialTokens);
    expect(full.startsWith(pushes.join(''))).toBe(true);
    expect(text).toBe(full);
  }
}

const spVocab = parseSentencePieceModel(readFileSync(path.join(STORIES, 'tok512.model')));
const binVocab = parseLlama2cTokenizer(readFileSync(path.join(STORIES, 'tok512.bin')), 512);
const spFiles = buildTokenizerFiles(spVocab);
const binFiles = buildTokenizerFiles(binVocab);
const stories = TextTokenizer.fromFiles(spFiles.tokenizerJson, spFiles.tokenizerConfig);
const storiesFromBin = TextTokenizer.fromFiles(binFiles.tokenizerJson, binFiles.tokenizerConfig);

describe('stories260K vocabularies', () => {
  it('reads tok512.model', () => {
    expect(spVocab.pieces).toHaveLength(512);
    expect([spVocab.unkId, spVocab.bosId, spVocab.eosId, spVocab.addDummyPrefix]).toEqual([0, 1, 2, true]);
    expect(spVocab.pieces.slice(0, 4)).toEqual([
      { piece: '<unk>', score: 0, type: PieceType.Unknown },
      { piece: '<s>', score: 0, type: PieceType.Control },
      { piece: '</s>', score: 0, type: PieceType.Control },
      { piece: '<0x00>', score: 0, type: PieceType.Byte },
    ]);
    expect(spVocab.pieces[13]).toEqual({ piece: '<0x0A>', score: 0, type: PieceType.Byte });
    expect(spVocab.pieces[259]).toEqual({ piece: '\u2581t', score: -0, type: PieceType.Normal });
    expect(spVocab.pieces[260]).toEqual({ piece: 'he', score: -1, type: PieceType.Normal });
  });

  it('reads the same vocabulary from tok512.bin', () => {
    expect(binVocab).toEqual(spVocab);
    expect(binFiles).toEqual(spFiles);
  });

  it('rejects what is not a whole SentencePiece model', () => {
    const model = readFileSync(path.join(STORIES, 'tok512.model'));
    expect(() => parseSentencePieceModel(model.subarray(0, 3000))).toThrow(/truncated/);
    expect(() => parseSentencePieceModel(readFileSync(path.join(STORIES, 'tok512.bin')))).toThrow();
  });

  it('rejects a truncated tokenizer.bin', () => {
    const buf = readFileSync(path.join(STORIES, 'tok512.bin'));
    expect(() => parseLlama2cTokenizer(buf.subarray(0, 1000), 512)).toThrow(/truncated/);
  });
});

describe('stories260K encode', () => {
  it('matches the known ids of the greedy story opening and decodes it back', () => {
    const ids = stories.encode(LILY);
    expect(ids).toEqual([1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426]);
    expect(stories.decode(ids)).toBe(LILY);
    expect(ids.map((id) => stories.idToToken(id)).slice(0, 3)).toEqual(['<s>', '\u2581Once', '\u2581upon']);
  });

  it('gives the same ids from tok512.model and tok512.bin', () => {
    for (const text of [...TEXTS, ...randomTexts(spVocab, 100, 1)]) {
      expect(storiesFromBin.encode(text)).toEqual(stories.encode(text));
    }
  });

  it('starts with BOS and a dummy-prefix space, unless asked for no special tokens', () => {
    expect(stories.bosId).toBe(1);
    expect(stories.eosIds).toEqual([2]);
    expect(stories.addBosToken).toBe(true);
    expect(stories.encode('')).toEqual([1]);
    expect(stories.encode('', { addSpecialTokens: false })).toEqual([]);
    const ids = stories.encode('Hello', { addSpecialTokens: false });
    expect(ids[0]).not.toBe(1);
    expect(stories.idToToken(ids[0]!)!.startsWith('\u2581')).toBe(true);
    expect(stories.encode('Hello')).toEqual([1, ...ids]);
  });

  it.each(fixture.cases)('matches SentencePiece with whitespace kept: $text', ({ text, idsKeepWhitespace }) => {
    expect(stories.encode(text)).toEqual(idsKeepWhitespace);
  });

  it.each(fixture.cases)('matches the shipped SentencePiece model after its space collapsing: $text', ({ text, ids }) => {
    expect(stories.encode(collapseSpaces(text))).toEqual(ids);
    if (collapseSpaces(text) === text) expect(stories.encode(text)).toEqual(ids);
  });

  it('matches llama2.c encode() on the fixture strings and on random strings', () => {
    for (const text of [...TEXTS, ...randomTexts(spVocab, 400, 2)]) {
      expect(stories.encode(text), JSON.stringify(text)).toEqual(llama2cEncode(spVocab, text));
    }
  });

  it('encodes characters outside the vocabulary as UTF-8 byte tokens', () => {
    const ids = stories.encode('😀', { addSpecialTokens: false });
    expect(ids.map((id) => stories.idToToken(id))).toEqual(['\u2581', '<0xF0>', '<0x9F>', '<0x98>', '<0x80>']);
  });

  it('follows the vocabulary when it has no dummy prefix', () => {
    const files = buildTokenizerFiles({ ...spVocab, addDummyPrefix: false });
    const tok = TextTokenizer.fromFiles(files.tokenizerJson, files.tokenizerConfig);
    const ids = tok.encode('Hello world', { addSpecialTokens: false });
    expect(tok.idToToken(ids[0]!)!.startsWith('\u2581')).toBe(false);
    for (const text of [...TEXTS, ' lead', '  two']) expect(tok.decode(tok.encode(text))).toBe(text);
  });
});

describe('stories260K decode', () => {
  const texts = [...TEXTS, ...randomTexts(spVocab, 200, 3)];

  it('round-trips every string', () => {
    for (const text of texts) expect(stories.decode(stories.encode(text))).toBe(text);
  });

  it('keeps or drops special tokens on request', () => {
    const ids = [...stories.encode('Hi'), 2];
    expect(stories.decode(ids)).toBe('Hi');
    expect(stories.decode(ids, { skipSpecialTokens: false })).toBe('<s> Hi</s>');
    expect(stories.isSpecial(1) && stories.isSpecial(2) && stories.isSpecial(0)).toBe(true);
    expect(stories.isSpecial(ids[1]!)).toBe(false);
    expect(stories.decode([])).toBe('');
  });

  it('streams exactly the full decode for every prefix', () => {
    for (const text of texts.slice(0, 80)) expectStreamMatches(stories, stories.encode(text));
  });

  it('streams across special tokens and leading-space pieces in the middle', () => {
    const ids = [...stories.encode(' a  b'), 2, ...stories.encode('  c é'), 2, 1, 0, ...stories.encode('\u2581x')];
    expectStreamMatches(stories, ids, true);
    expectStreamMatches(stories, ids, false);
  });

  it('holds back a character split over byte tokens until it is complete', () => {
    const ids = stories.encode('a😀b');
    expect(ids.map((id) => stories.idToToken(id))).toEqual(['<s>', '\u2581a', '<0xF0>', '<0x9F>', '<0x98>', '<0x80>', 'b']);
    expect(streamDecode(stories, ids).pushes).toEqual(['', 'a', '', '', '', '😀', 'b']);
  });

  it('streams arbitrary id sequences, invalid UTF-8 included, like a full decode', () => {
    const rand = mulberry32(4);
    for (let n = 0; n < 200; n++) {
      const ids = Array.from({ length: 1 + Math.floor(rand() * 12) }, () =>
        rand() < 0.5 ? 3 + Math.floor(rand() * 256) : Math.floor(rand() * 512),
      );
      expect(streamDecode(stories, ids).text, JSON.stringify(ids)).toBe(stories.decode(ids));
    }
  });
});

describe('TinyLlama (Llama-2 SentencePiece)', () => {
  const dir = path.join(MODELS, 'TinyLlama-1.1B-Chat-v1.0');
  const tok = TextTokenizer.load(dir);

  it('converts tokenizer.model into its published tokenizer.json', () => {
    const vocab = parseSentencePieceModel(readFileSync(path.join(dir, 'tokenizer.model')));
    expect(vocab.pieces).toHaveLength(32000);
    expect(vocab.pieces[30143]!.piece).toBe('\ufeff');
    const built = buildTokenizerFiles(vocab).tokenizerJson as Record<string, any>;
    const real = JSON.parse(readFileSync(path.join(dir, 'tokenizer.json'), 'utf8')) as Record<string, any>;
    for (const key of ['added_tokens', 'normalizer', 'pre_tokenizer', 'post_processor', 'decoder']) {
      expect(built[key], key).toEqual(real[key]);
    }
    expect(built.model.vocab).toEqual(real.model.vocab);
    const merges = (real.model.merges as (string | string[])[]).map((m) => (Array.isArray(m) ? m : m.split(' ')));
    expect(built.model.merges).toEqual(merges);
  });

  it('encodes with BOS and round-trips', () => {
    expect(tok.encode('Hello world')).toEqual([1, 15043, 3186]);
    expect([tok.bosId, tok.eosIds, tok.addBosToken, tok.vocabSize]).toEqual([1, [2], true, 32000]);
    for (const text of TEXTS) {
      const ids = tok.encode(text);
      expect(tok.decode(ids)).toBe(text);
      expectStreamMatches(tok, ids);
    }
  });
});

describe('byte-level BPE tokenizers', () => {
  const texts = [...TEXTS, 'def f(x):\n    return x  # comment\n', '<|im_start|>user\nHi<|im_end|>'];

  for (const [name, helloIds] of [
    ['SmolLM2-135M-Instruct', [19556, 905]],
    ['Qwen2.5-0.5B-Instruct', [9707, 1879]],
  ] as const) {
    describe(name, () => {
      const tok = TextTokenizer.load(path.join(MODELS, name));

      it('encodes without BOS', () => {
        expect(tok.encode('Hello world')).toEqual(helloIds);
        expect(tok.addBosToken).toBe(false);
        expect(tok.encode('')).toEqual([]);
      });

      it('round-trips and streams every prefix exactly', () => {
        for (const text of texts) {
          const ids = tok.encode(text);
          expect(tok.decode(ids, { skipSpecialTokens: false })).toBe(text);
          expectStreamMatches(tok, ids, false);
          expectStreamMatches(tok, ids, true);
        }
      });

      it('holds back a character split over byte-level tokens', () => {
        const ids = tok.encode('x🫠');
        expect(ids.length).toBeGreaterThan(2);
        expect(streamDecode(tok, ids).pushes).toEqual(['x', ...Array<string>(ids.length - 2).fill(''), '🫠']);
      });

      it('streams arbitrary id sequences like a full decode', () => {
        const rand = mulberry32(5);
        for (let n = 0; n < 200; n++) {
          const ids = Array.from({ length: 1 + Math.floor(rand() * 12) }, () => Math.floor(rand() * tok.vocabSize));
          expect(streamDecode(tok, ids).text, JSON.stringify(ids)).toBe(tok.decode(ids));
        }
      });
    });
  }

  it('reads eos and special tokens from tokenizer_config.json', () => {
    const qwen = TextTokenizer.load(path.join(MODELS, 'Qwen2.5-0.5B-Instruct'));
    expect(qwen.bosId).toBeUndefined();
    expect(qwen.eosIds).toEqual([151645]);
    expect(qwen.vocabSize).toBe(151665);
    expect(qwen.isSpecial(151645)).toBe(true);
    expect(qwen.isSpecial(151657)).toBe(false);
    expect(qwen.decode([9707, 151645])).toBe('Hello');
    expect(qwen.decode([9707, 151645], { skipSpecialTokens: false })).toBe('Hello<|im_end|>');
  });
});

describe('streaming decoders that keep bytes instead of re-decoding ids', () => {
  const cases = [
    ['stories260K', stories, 'sentencepiece'],
    ['TinyLlama', TextTokenizer.load(path.join(MODELS, 'TinyLlama-1.1B-Chat-v1.0')), 'sentencepiece'],
    ['SmolLM2', TextTokenizer.load(path.join(MODELS, 'SmolLM2-135M-Instruct')), 'bytelevel'],
    ['Qwen2.5', TextTokenizer.load(path.join(MODELS, 'Qwen2.5-0.5B-Instruct')), 'bytelevel'],
  ] as const;

  for (const [name, tok, kind] of cases) {
    it(`${name}: recognised as ${kind}; random ids (bytes, specials, added tokens) stream as the library decodes them`, () => {
      expect(tok.streamDecoding).toBe(kind);
      const rand = mulberry32(11);
      // SentencePiece byte tokens (<0xNN>); byte-level vocabularies have single-byte tokens among the first ids.
      const byteIds = Array.from({ length: tok.vocabSize }, (_, id) => id).filter((id) => /^<0x[0-9A-F]{2}>$/.test(tok.idToToken(id) ?? ''));
      if (kind === 'sentencepiece') expect(byteIds).toHaveLength(256);
      else byteIds.push(...Array.from({ length: 256 }, (_, id) => id));
      const special = [0, 1, 2, ...tok.eosIds, ...tok.encode('<|im_start|><|im_end|>', { addSpecialTokens: false })];
      for (let n = 0; n < 300; n++) {
        const ids = Array.from({ length: 1 + Math.floor(rand() * 16) }, () => {
          const r = rand();
          if (r < 0.3 && byteIds.length > 0) return byteIds[Math.floor(rand() * byteIds.length)]!;
          if (r < 0.4) return special[Math.floor(rand() * special.length)]!;
          return Math.floor(rand() * tok.vocabSize);
        });
        for (const skip of [true, false]) {
          const fast = streamDecode(tok, ids, skip);
          expect(fast.text, `${skip} ${JSON.stringify(ids)}`).toBe(tok.decode(ids, { skipSpecialTokens: skip }));
        }
      }
    });

    it(`${name}: with a prompt as context, the same text as decoding through the library window`, () => {
      const prompt = tok.encode('Once upon a time, there was a little girl named Lily.');
      for (const text of [' She loved to play outside.', ' é😀中 — ’x', '\n\n  spaces  ', 'plain']) {
        const ids = tok.encode(text, { addSpecialTokens: false });
        const fast = tok.decodeStream({ context: prompt });
        const slow = tok.decodeStream({ context: prompt, window: true });
        const a = ids.map((id) => fast.push(id)).join('') + fast.flush();
        const b = ids.map((id) => slow.push(id)).join('') + slow.flush();
        expect(a, JSON.stringify(text)).toBe(b);
        expect(a).toBe(tok.decode([...prompt, ...ids]).slice(tok.decode(prompt).length));
      }
    });
  }
});
