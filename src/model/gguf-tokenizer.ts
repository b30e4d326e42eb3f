import { PieceType, type TokenizerFiles } from './types.ts';

/**
 * GGUF's byte-level BPE ("gpt2") tokenizers as the Hugging Face `tokenizer.json` they were converted from.
 * llama.cpp keeps only a name for the pre-tokenizer (`tokenizer.ggml.pre`); these are the pre-tokenizers and
 * normalizers of the tokenizer.json files those names stand for. A name not here is an error: guessing one
 * would tokenize most text differently from how the model was trained.
 */
const GPT2_REGEX = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true };
const byteLevelAfter = (pattern: string) => ({
  type: 'Sequence',
  pretokenizers: [
    { type: 'Split', pattern: { Regex: pattern }, behavior: 'Isolated', invert: false },
    { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
  ],
});
const LLAMA3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const QWEN2 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const DIGITS_THEN_GPT2 = { type: 'Sequence', pretokenizers: [{ type: 'Digits', individual_digits: true }, GPT2_REGEX] };

interface PreTokenizer {
  normalizer: object | null;
  preTokenizer: object;
  /** llama.cpp's default for tokenizer.ggml.add_bos_token when the file does not say. */
  addBos: boolean;
}

export const GGUF_PRE_TOKENIZERS: Record<string, PreTokenizer> = {
  'gpt-2': { normalizer: null, preTokenizer: GPT2_REGEX, addBos: false },
  'llama-bpe': { normalizer: null, preTokenizer: byteLevelAfter(LLAMA3), addBos: true },
  llama3: { normalizer: null, preTokenizer: byteLevelAfter(LLAMA3), addBos: true },
  qwen2: { normalizer: { type: 'NFC' }, preTokenizer: byteLevelAfter(QWEN2), addBos: false },
  smollm: { normalizer: null, preTokenizer: DIGITS_THEN_GPT2, addBos: false },
  starcoder: { normalizer: null, preTokenizer: DIGITS_THEN_GPT2, addBos: false },
};

/** The tokenizer files of a GGUF whose tokenizer.ggml.model is "gpt2". */
export function ggufByteLevelTokenizer(metadata: Map<string, unknown>, label = 'GGUF'): TokenizerFiles {
  const fail = (msg: string): never => {
    throw new Error(`${label}: ${msg}`);
  };
  const tokens = metadata.get('tokenizer.ggml.tokens');
  if (!Array.isArray(tokens) || tokens.some((t) => typeof t !== 'string')) return fail('tokenizer.ggml.tokens is missing or not a list of strings');
  const types = (metadata.get('tokenizer.ggml.token_type') as number[] | undefined) ?? [];
  const merges = metadata.get('tokenizer.ggml.merges');
  if (!Array.isArray(merges)) return fail('a "gpt2" tokenizer needs tokenizer.ggml.merges');
  const preName = metadata.get('tokenizer.ggml.pre');
  if (typeof preName !== 'string') return fail('tokenizer.ggml.pre is missing: the file does not say how its byte-level BPE tokenizer splits text');
  const pre = GGUF_PRE_TOKENIZERS[preName] ?? fail(`unsupported tokenizer.ggml.pre "${preName}" (supported: ${Object.keys(GGUF_PRE_TOKENIZERS).join(', ')})`);
  const id = (key: string): number | undefined => {
    const v = metadata.get(`tokenizer.ggml.${key}_token_id`);
    if (v === undefined) return undefined;
    if (typeof v !== 'number' || v < 0 || v >= tokens.length) return fail(`tokenizer.ggml.${key}_token_id ${String(v)} is not a token id`);
    return v;
  };
  const bosId = id('bos'), eosId = id('eos'), unkId = id('unknown'), padId = id('padding');
  const addBos = (metadata.get('tokenizer.ggml.add_bos_token') as boolean | undefined) ?? pre.addBos;
  const addEos = (metadata.get('tokenizer.ggml.add_eos_token') as boolean | undefined) ?? false;
  if (addBos && bosId === undefined) fail('tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id');

  const vocab = Object.create(null) as Record<string, number>;
  const added: object[] = [];
  (tokens as string[]).forEach((piece, i) => {
    if (piece in vocab) fail(`duplicate token ${JSON.stringify(piece)} (ids ${vocab[piece]}, ${i})`);
    vocab[piece] = i;
    const type = types[i] ?? PieceType.Normal;
    // llama.cpp's converter fills ids the tokenizer lacks with [PADn] (user-defined): no text maps to them.
    if (type === PieceType.UserDefined && /^\[PAD\d+\]$/.test(piece)) return;
    if (type === PieceType.Control || type === PieceType.UserDefined) {
      added.push({ id: i, content: piece, single_word: false, lstrip: false, rstrip: false, normalized: false, special: type === PieceType.Control });
    }
  });
  const pairs = (merges as unknown[]).map((m, i) => {
    const parts = typeof m === 'string' ? m.split(' ') : [];
    if (parts.length !== 2) fail(`tokenizer.ggml.merges[${i}] ${JSON.stringify(m)} is not two tokens separated by a space`);
    return parts as [string, string];
  });

  const content = (i: number | undefined) => (i === undefined ? null : (tokens as string[])[i]);
  const template = (seq: 'A' | 'B', typeId: number) => [
    ...(addBos ? [{ SpecialToken: { id: content(bosId), type_id: typeId } }] : []),
    { Sequence: { id: seq, type_id: typeId } },
    ...(addEos && eosId !== undefined ? [{ SpecialToken: { id: content(eosId), type_id: typeId } }] : []),
  ];
  const specials: Record<string, object> = {};
  if (addBos) specials[content(bosId)!] = { id: content(bosId), ids: [bosId], tokens: [content(bosId)] };
  if (addEos && eosId !== undefined) specials[content(eosId)!] = { id: content(eosId), ids: [eosId], tokens: [content(eosId)] };
  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: pre.normalizer,
    pre_tokenizer: pre.preTokenizer,
    post_processor: addBos || addEos ? { type: 'TemplateProcessing', single: template('A', 0), pair: [...template('A', 0), ...template('B', 1)], special_tokens: specials } : null,
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: preName === 'llama-bpe' || preName === 'llama3',
      vocab,
      merges: pairs,
    },
  };
  const tokenizerConfig: Record<string, unknown> = {
    tokenizer_class: 'GPT2Tokenizer',
    add_bos_token: addBos,
    add_eos_token: addEos,
    add_prefix_space: false,
    bos_token: content(bosId),
    eos_token: content(eosId),
    unk_token: content(unkId),
    ...(padId !== undefined && { pad_token: content(padId) }),
    clean_up_tokenization_spaces: false,
  };
  const chatTemplate = metadata.get('tokenizer.chat_template');
  if (typeof chatTemplate === 'string') tokenizerConfig.chat_template = chatTemplate;
  const eosIds = [eosId, id('eot'), id('eom')].filter((x): x is number => x !== undefined);
  return { tokenizerJson, tokenizerConfig, bosId, eosIds: [...new Set(eosIds)] };
}
