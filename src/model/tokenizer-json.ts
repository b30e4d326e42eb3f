import { PieceType, type SpVocab } from './types.js';

const SPACE = '\u2581';

/** Piece types that SentencePiece's BPE can produce by merging (its `pieces_` map). */
function isMergeTarget(type: PieceType): boolean {
  return type === PieceType.Normal || type === PieceType.UserDefined || type === PieceType.Unused;
}

/**
 * Every split of a mergeable piece into two vocabulary pieces, ranked as HF's SentencePieceExtractor does:
 * by the merged piece's score (higher first); ties keep piece-id order, and within one piece (left id, right id).
 */
function deriveMerges(vocab: SpVocab, ids: Map<string, number>): [string, string][] {
  const merges: { left: string; right: string; score: number; leftId: number; rightId: number }[] = [];
  for (const { piece, score, type } of vocab.pieces) {
    if (!isMergeTarget(type)) continue;
    const chars = Array.from(piece);
    const local: (typeof merges)[number][] = [];
    for (let i = 1; i < chars.length; i++) {
      const left = chars.slice(0, i).join('');
      const right = chars.slice(i).join('');
      const leftId = ids.get(left);
      const rightId = ids.get(right);
      if (leftId !== undefined && rightId !== undefined) local.push({ left, right, score, leftId, rightId });
    }
    local.sort((a, b) => a.leftId - b.leftId || a.rightId - b.rightId);
    merges.push(...local);
  }
  merges.sort((a, b) => b.score - a.score);
  return merges.map((m) => [m.left, m.right]);
}

/**
 * Hugging Face `tokenizer.json` and `tokenizer_config.json` for a SentencePiece BPE vocabulary, in the form
 * transformers' LlamaConverter writes (legacy Llama: Prepend/Replace normalizer, no pre-tokenizer, BOS template).
 */
export function buildTokenizerFiles(vocab: SpVocab): { tokenizerJson: object; tokenizerConfig: object } {
  const n = vocab.pieces.length;
  const pieceOf = (id: number): string | undefined => (id >= 0 && id < n ? vocab.pieces[id]!.piece : undefined);
  const ids = new Map<string, number>();
  vocab.pieces.forEach(({ piece }, id) => {
    if (ids.has(piece)) throw new Error(`tokenizer: duplicate piece ${JSON.stringify(piece)} (ids ${ids.get(piece)}, ${id})`);
    ids.set(piece, id);
  });

  const unk = pieceOf(vocab.unkId);
  const bos = pieceOf(vocab.bosId);
  const eos = pieceOf(vocab.eosId);
  const specialIds = new Set([vocab.unkId, vocab.bosId, vocab.eosId]);
  const addedTokens = vocab.pieces
    .map(({ piece, type }, id) => ({ piece, type, id }))
    .filter(({ type, id }) => specialIds.has(id) || type === PieceType.Control || type === PieceType.UserDefined)
    .map(({ piece, type, id }) => ({
      id,
      content: piece,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: type !== PieceType.UserDefined || specialIds.has(id),
    }));

  const replaceSpace = { type: 'Replace', pattern: { String: ' ' }, content: SPACE };
  const normalizer = vocab.addDummyPrefix
    ? { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: SPACE }, replaceSpace] }
    : replaceSpace;

  const decoders: object[] = [
    { type: 'Replace', pattern: { String: SPACE }, content: ' ' },
    { type: 'ByteFallback' },
    { type: 'Fuse' },
  ];
  if (vocab.addDummyPrefix) decoders.push({ type: 'Strip', content: ' ', start: 1, stop: 0 });

  const postProcessor =
    bos === undefined
      ? null
      : {
          type: 'TemplateProcessing',
          single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
          pair: [
            { SpecialToken: { id: bos, type_id: 0 } },
            { Sequence: { id: 'A', type_id: 0 } },
            { SpecialToken: { id: bos, type_id: 1 } },
            { Sequence: { id: 'B', type_id: 1 } },
          ],
          special_tokens: { [bos]: { id: bos, ids: [vocab.bosId], tokens: [bos] } },
        };

  const tokenizerJson = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: addedTokens,
    normalizer,
    pre_tokenizer: null,
    post_processor: postProcessor,
    decoder: { type: 'Sequence', decoders },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: unk ?? null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: true,
      byte_fallback: true,
      ignore_merges: false,
      vocab: Object.fromEntries(ids),
      merges: deriveMerges(vocab, ids),
    },
  };

  const tokenizerConfig = {
    tokenizer_class: 'LlamaTokenizer',
    bos_token: bos ?? null,
    eos_token: eos ?? null,
    unk_token: unk ?? null,
    add_bos_token: bos !== undefined,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    legacy: true,
  };

  return { tokenizerJson, tokenizerConfig };
}
