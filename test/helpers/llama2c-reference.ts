/**
 * An independent reference for stories260K: a direct port of llama2.c's run.c (forward pass, greedy
 * sampling, generate loop, BPE encode and piece decode), reading the raw legacy checkpoint and
 * tokenizer.bin itself. It deliberately shares nothing with Tally's converter: weights stay in run.c's
 * layout (q/k rows in interleaved-pair order, rotated as adjacent pairs (x[2i], x[2i+1])), and the
 * arithmetic is float32 (Math.fround after every operation that run.c does in float).
 */
import { readFileSync } from 'node:fs';

const f = Math.fround;

export interface Llama2cConfig {
  dim: number;
  hiddenDim: number;
  nLayers: number;
  nHeads: number;
  nKvHeads: number;
  vocabSize: number;
  seqLen: number;
  sharedWeights: boolean;
}

interface Llama2cWeights {
  tokenEmbeddingTable: Float32Array; // (vocab, dim)
  rmsAttWeight: Float32Array; // (layer, dim)
  wq: Float32Array; // (layer, dim, n_heads * head_size)
  wk: Float32Array; // (layer, dim, n_kv_heads * head_size)
  wv: Float32Array; // (layer, dim, n_kv_heads * head_size)
  wo: Float32Array; // (layer, n_heads * head_size, dim)
  rmsFfnWeight: Float32Array; // (layer, dim)
  w1: Float32Array; // (layer, hidden_dim, dim)
  w2: Float32Array; // (layer, dim, hidden_dim)
  w3: Float32Array; // (layer, hidden_dim, dim)
  rmsFinalWeight: Float32Array; // (dim)
  wcls: Float32Array; // (vocab, dim)
}

/** run.c's read_checkpoint + memory_map_weights. */
export function readLlama2cCheckpoint(file: string): { config: Llama2cConfig; weights: Llama2cWeights } {
  const buf = readFileSync(file);
  const header = Array.from({ length: 7 }, (_, i) => buf.readInt32LE(4 * i));
  const [dim, hiddenDim, nLayers, nHeads, nKvHeads, signedVocab, seqLen] = header;
  const config: Llama2cConfig = {
    dim, hiddenDim, nLayers, nHeads, nKvHeads, vocabSize: Math.abs(signedVocab), seqLen, sharedWeights: signedVocab > 0,
  };
  const all = new Float32Array(buf.buffer.slice(buf.byteOffset + 28, buf.byteOffset + buf.length));
  const headSize = dim / nHeads;
  let ptr = 0;
  const take = (n: number) => all.subarray(ptr, (ptr += n));
  const tokenEmbeddingTable = take(config.vocabSize * dim);
  const rmsAttWeight = take(nLayers * dim);
  const wq = take(nLayers * dim * (nHeads * headSize));
  const wk = take(nLayers * dim * (nKvHeads * headSize));
  const wv = take(nLayers * dim * (nKvHeads * headSize));
  const wo = take(nLayers * (nHeads * headSize) * dim);
  const rmsFfnWeight = take(nLayers * dim);
  const w1 = take(nLayers * dim * hiddenDim);
  const w2 = take(nLayers * hiddenDim * dim);
  const w3 = take(nLayers * dim * hiddenDim);
  const rmsFinalWeight = take(dim);
  take((seqLen * headSize) / 2); // freq_cis_real (unused since llama2.c computes RoPE on the fly)
  take((seqLen * headSize) / 2); // freq_cis_imag
  const wcls = config.sharedWeights ? tokenEmbeddingTable : take(config.vocabSize * dim);
  if (ptr !== all.length) throw new Error(`${file}: ${all.length - ptr} floats left over after the weights`);
  return {
    config,
    weights: { tokenEmbeddingTable, rmsAttWeight, wq, wk, wv, wo, rmsFfnWeight, w1, w2, w3, rmsFinalWeight, wcls },
  };
}

function rmsnorm(o: Float32Array, x: Float32Array, weight: Float32Array, size: number): void {
  let ss = 0;
  for (let j = 0; j < size; j++) ss = f(ss + f(x[j] * x[j]));
  ss = f(ss / size);
  ss = f(ss + f(1e-5));
  ss = f(1 / f(Math.sqrt(ss)));
  for (let j = 0; j < size; j++) o[j] = f(weight[j] * f(ss * x[j]));
}

function softmax(x: Float32Array, size: number): void {
  let max = x[0];
  for (let i = 1; i < size; i++) if (x[i] > max) max = x[i];
  let sum = 0;
  for (let i = 0; i < size; i++) {
    x[i] = f(Math.exp(f(x[i] - max)));
    sum = f(sum + x[i]);
  }
  for (let i = 0; i < size; i++) x[i] = f(x[i] / sum);
}

/** W (d,n) @ x (n,) -> xout (d,); `w` starts at `off`. */
function matmul(xout: Float32Array, x: Float32Array, w: Float32Array, off: number, n: number, d: number): void {
  for (let i = 0; i < d; i++) {
    let val = 0;
    const row = off + i * n;
    for (let j = 0; j < n; j++) val = f(val + f(w[row + j] * x[j]));
    xout[i] = val;
  }
}

/** run.c's Transformer: forward(token, pos) with its own KV cache. */
export class Llama2cTransformer {
  readonly config: Llama2cConfig;
  private readonly w: Llama2cWeights;
  private readonly x: Float32Array;
  private readonly xb: Float32Array;
  private readonly xb2: Float32Array;
  private readonly hb: Float32Array;
  private readonly hb2: Float32Array;
  private readonly q: Float32Array;
  private readonly att: Float32Array;
  private readonly logits: Float32Array;
  private readonly keyCache: Float32Array;
  private readonly valueCache: Float32Array;

  constructor(checkpointPath: string) {
    const { config, weights } = readLlama2cCheckpoint(checkpointPath);
    this.config = config;
    this.w = weights;
    const p = config;
    const kvDim = (p.dim * p.nKvHeads) / p.nHeads;
    this.x = new Float32Array(p.dim);
    this.xb = new Float32Array(p.dim);
    this.xb2 = new Float32Array(p.dim);
    this.hb = new Float32Array(p.hiddenDim);
    this.hb2 = new Float32Array(p.hiddenDim);
    this.q = new Float32Array(p.dim);
    this.att = new Float32Array(p.nHeads * p.seqLen);
    this.logits = new Float32Array(p.vocabSize);
    this.keyCache = new Float32Array(p.nLayers * p.seqLen * kvDim);
    this.valueCache = new Float32Array(p.nLayers * p.seqLen * kvDim);
  }

  /** Logits after `token` at position `pos` (a view, overwritten by the next call). */
  forward(token: number, pos: number): Float32Array {
    const p = this.config;
    const w = this.w;
    const { x, xb, xb2, hb, hb2, q, att } = this;
    const dim = p.dim;
    const kvDim = (p.dim * p.nKvHeads) / p.nHeads;
    const kvMul = p.nHeads / p.nKvHeads;
    const hiddenDim = p.hiddenDim;
    const headSize = dim / p.nHeads;
    if (pos < 0 || pos >= p.seqLen) throw new Error(`position ${pos} is outside the context of ${p.seqLen}`);

    x.set(w.tokenEmbeddingTable.subarray(token * dim, (token + 1) * dim));

    for (let l = 0; l < p.nLayers; l++) {
      rmsnorm(xb, x, w.rmsAttWeight.subarray(l * dim), dim);

      const loff = l * p.seqLen * kvDim;
      const k = this.keyCache.subarray(loff + pos * kvDim, loff + (pos + 1) * kvDim);
      const v = this.valueCache.subarray(loff + pos * kvDim, loff + (pos + 1) * kvDim);

      matmul(q, xb, w.wq, l * dim * dim, dim, dim);
      matmul(k, xb, w.wk, l * dim * kvDim, dim, kvDim);
      matmul(v, xb, w.wv, l * dim * kvDim, dim, kvDim);

      // RoPE: rotate adjacent pairs (x[i], x[i+1]) of q and k in each head.
      for (let i = 0; i < dim; i += 2) {
        const headDim = i % headSize;
        const freq = f(1 / f(Math.pow(10000, f(headDim / headSize))));
        const val = f(pos * freq);
        const fcr = f(Math.cos(val));
        const fci = f(Math.sin(val));
        const rotn = i < kvDim ? 2 : 1;
        for (let r = 0; r < rotn; r++) {
          const vec = r === 0 ? q : k;
          const v0 = vec[i];
          const v1 = vec[i + 1];
          vec[i] = f(f(v0 * fcr) - f(v1 * fci));
          vec[i + 1] = f(f(v0 * fci) + f(v1 * fcr));
        }
      }

      // Multi-head attention over positions 0..pos, GQA: head h reads KV head h / kvMul.
      const scale = f(Math.sqrt(headSize));
      for (let h = 0; h < p.nHeads; h++) {
        const qo = h * headSize;
        const ao = h * p.seqLen;
        for (let t = 0; t <= pos; t++) {
          const ko = loff + t * kvDim + Math.floor(h / kvMul) * headSize;
          let score = 0;
          for (let i = 0; i < headSize; i++) score = f(score + f(q[qo + i] * this.keyCache[ko + i]));
          att[ao + t] = f(score / scale);
        }
        softmax(att.subarray(ao), pos + 1);
        xb.fill(0, qo, qo + headSize);
        for (let t = 0; t <= pos; t++) {
          const vo = loff + t * kvDim + Math.floor(h / kvMul) * headSize;
          const a = att[ao + t];
          for (let i = 0; i < headSize; i++) xb[qo + i] = f(xb[qo + i] + f(a * this.valueCache[vo + i]));
        }
      }

      matmul(xb2, xb, w.wo, l * dim * dim, dim, dim);
      for (let i = 0; i < dim; i++) x[i] = f(x[i] + xb2[i]);

      rmsnorm(xb, x, w.rmsFfnWeight.subarray(l * dim), dim);
      matmul(hb, xb, w.w1, l * dim * hiddenDim, dim, hiddenDim);
      matmul(hb2, xb, w.w3, l * dim * hiddenDim, dim, hiddenDim);
      // SwiGLU: silu(w1(x)) * w3(x)
      for (let i = 0; i < hiddenDim; i++) {
        let val = hb[i];
        val = f(val * f(1 / f(1 + f(Math.exp(-val)))));
        val = f(val * hb2[i]);
        hb[i] = val;
      }
      matmul(xb, hb, w.w2, l * dim * hiddenDim, hiddenDim, dim);
      for (let i = 0; i < dim; i++) x[i] = f(x[i] + xb[i]);
    }

    rmsnorm(x, x, w.rmsFinalWeight, dim);
    matmul(this.logits, x, w.wcls, 0, p.dim, p.vocabSize);
    return this.logits;
  }
}

/** run.c's sample_argmax: the first index of the largest value. */
export function argmax(v: Float32Array): number {
  let best = 0;
  for (let i = 1; i < v.length; i++) if (v[i] > v[best]) best = i;
  return best;
}

/** run.c's Tokenizer (tokenizer.bin: int32 max_token_length, then per token float32 score, int32 len, bytes). */
export class Llama2cTokenizer {
  readonly vocab: Buffer[] = [];
  readonly scores: number[] = [];
  readonly maxTokenLength: number;
  private readonly lookup = new Map<string, number>();

  constructor(file: string, vocabSize: number) {
    const buf = readFileSync(file);
    this.maxTokenLength = buf.readInt32LE(0);
    let pos = 4;
    for (let i = 0; i < vocabSize; i++) {
      this.scores.push(buf.readFloatLE(pos));
      const len = buf.readInt32LE(pos + 4);
      pos += 8;
      this.vocab.push(Buffer.from(buf.subarray(pos, pos + len)));
      pos += len;
    }
    // str_lookup: keyed by the raw bytes (latin1 keeps one char per byte).
    this.vocab.forEach((bytes, id) => {
      const key = bytes.toString('latin1');
      if (!this.lookup.has(key)) this.lookup.set(key, id);
    });
  }

  private strLookup(bytes: Buffer): number {
    return this.lookup.get(bytes.toString('latin1')) ?? -1;
  }

  /** run.c's encode(): optional BOS (1), dummy prefix " ", UTF-8 code points or byte fallback (+3), then BPE merges by score. */
  encode(text: string, bos: boolean, eos: boolean): number[] {
    const tokens: number[] = [];
    if (bos) tokens.push(1);
    const bytes = Buffer.from(text, 'utf8');
    if (bytes.length > 0) tokens.push(this.strLookup(Buffer.from(' ')));
    let str: number[] = [];
    for (let c = 0; c < bytes.length; c++) {
      if ((bytes[c] & 0xc0) !== 0x80) str = [];
      str.push(bytes[c]);
      if (c + 1 < bytes.length && (bytes[c + 1] & 0xc0) === 0x80 && str.length < 4) continue;
      const id = this.strLookup(Buffer.from(str));
      if (id !== -1) tokens.push(id);
      else for (const b of str) tokens.push(b + 3);
      str = [];
    }
    for (;;) {
      let bestScore = -1e10;
      let bestId = -1;
      let bestIdx = -1;
      for (let i = 0; i < tokens.length - 1; i++) {
        const id = this.strLookup(Buffer.concat([this.vocab[tokens[i]], this.vocab[tokens[i + 1]]]));
        if (id !== -1 && this.scores[id] > bestScore) {
          bestScore = this.scores[id];
          bestId = id;
          bestIdx = i;
        }
      }
      if (bestIdx === -1) break;
      tokens.splice(bestIdx, 2, bestId);
    }
    if (eos) tokens.push(2);
    return tokens;
  }

  /** run.c's decode(prev, token): the piece's bytes, without the leading space right after BOS, "<0xXX>" as that byte. */
  decodePiece(prevToken: number, token: number): Buffer {
    let piece = this.vocab[token];
    if (prevToken === 1 && piece[0] === 0x20) piece = piece.subarray(1);
    const m = /^<0x([0-9A-Fa-f]{2})>/.exec(piece.toString('latin1'));
    if (m) return Buffer.from([parseInt(m[1], 16)]);
    return piece;
  }

  /** The text that run.c prints for `generated` following `prevToken`, as UTF-8. */
  decode(prevToken: number, generated: number[]): string {
    const parts: Buffer[] = [];
    let prev = prevToken;
    for (const t of generated) {
      parts.push(this.decodePiece(prev, t));
      prev = t;
    }
    return Buffer.concat(parts).toString('utf8');
  }
}

/**
 * run.c's generate() with temperature 0: feeds the prompt, then appends the argmax each step, and
 * stops when the model emits BOS (1, the end of a story) or after `steps` positions. Returns the
 * generated ids; the terminating BOS, when reached, is included as the last id.
 */
export function generateGreedy(model: Llama2cTransformer, promptTokens: number[], steps = model.config.seqLen): number[] {
  if (promptTokens.length < 1) throw new Error('expected at least 1 prompt token');
  const out: number[] = [];
  let token = promptTokens[0];
  let pos = 0;
  while (pos < steps) {
    const logits = model.forward(token, pos);
    let next: number;
    if (pos < promptTokens.length - 1) {
      next = promptTokens[pos + 1];
    } else {
      next = argmax(logits);
      out.push(next);
    }
    pos++;
    if (next === 1 && pos >= promptTokens.length) break;
    token = next;
  }
  return out;
}
