import { readFileSync, writeFileSync } from 'node:fs';
import { bfloat16ToFloat32, f32ToBf16, f32ToF16, float16ToFloat32 } from './half.ts';
import { GGML_BLOCK as BLOCK, GgmlType, dequantize, ggmlTypeName } from './ggml-quants.ts';

export { GgmlType } from './ggml-quants.ts';
import { PieceType, type Checkpoint, type LlamaConfig, type SpVocab, type TokenizerFiles, type WeightMap } from './types.ts';
import { ggufByteLevelTokenizer } from './gguf-tokenizer.ts';
import { nbitsFromGgml, permuteRows } from './quant.ts';

/** GGUF metadata value types. */
export enum GgufValueType {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
}

export interface GgufTensorInfo {
  name: string;
  /** Row-major, outermost first (the reverse of GGUF's ne[]). */
  shape: number[];
  type: number;
  /** Absolute byte offset of the tensor's data in the file. */
  offset: number;
  /** Byte size of the data, or undefined for a type this reader can't decode. */
  nbytes: number | undefined;
}

export interface GgufFile {
  version: number;
  /** Integers are numbers (64-bit ones beyond 2^53 are bigints); float32 values are the shortest decimal that rounds to them. */
  metadata: Map<string, unknown>;
  tensors: GgufTensorInfo[];
  /** F32 data is a view into the file's buffer when aligned; other types are decoded into a new array. */
  tensorData(name: string): Float32Array;
  /** A tensor's stored bytes (its blocks, for quantised types). */
  tensorBytes(tensor: GgufTensorInfo | string): Uint8Array;
}

const GGUF_MAGIC = 0x46554747; // "GGUF" little-endian

export function readGguf(path: string): GgufFile {
  return parseGguf(readFileSync(path), path);
}

export function parseGguf(buf: Buffer, label = 'GGUF'): GgufFile {
  let pos = 0;
  const fail = (msg: string): never => {
    throw new Error(`${label}: ${msg}`);
  };
  const need = (n: number) => {
    if (pos + n > buf.length) fail(`truncated file (needed ${n} bytes at offset ${pos}, file is ${buf.length} bytes)`);
  };
  const u32 = () => (need(4), (pos += 4), buf.readUInt32LE(pos - 4));
  const u64 = () => {
    need(8);
    const v = buf.readBigUInt64LE(pos);
    pos += 8;
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) fail(`size ${v} at offset ${pos - 8} is implausible`);
    return Number(v);
  };
  const str = () => {
    const len = u64();
    need(len);
    pos += len;
    return buf.toString('utf8', pos - len, pos);
  };
  const int64 = (v: bigint) => (v >= BigInt(Number.MIN_SAFE_INTEGER) && v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v);
  const value = (type: number): unknown => {
    const fixed = (n: number, read: (o: number) => unknown) => {
      need(n);
      pos += n;
      return read(pos - n);
    };
    switch (type) {
      case GgufValueType.UINT8: return fixed(1, (o) => buf.readUInt8(o));
      case GgufValueType.INT8: return fixed(1, (o) => buf.readInt8(o));
      case GgufValueType.UINT16: return fixed(2, (o) => buf.readUInt16LE(o));
      case GgufValueType.INT16: return fixed(2, (o) => buf.readInt16LE(o));
      case GgufValueType.UINT32: return fixed(4, (o) => buf.readUInt32LE(o));
      case GgufValueType.INT32: return fixed(4, (o) => buf.readInt32LE(o));
      case GgufValueType.FLOAT32: return fixed(4, (o) => shortestF32(buf.readFloatLE(o)));
      case GgufValueType.BOOL: return fixed(1, (o) => buf.readUInt8(o) !== 0);
      case GgufValueType.STRING: return str();
      case GgufValueType.UINT64: return fixed(8, (o) => int64(buf.readBigUInt64LE(o)));
      case GgufValueType.INT64: return fixed(8, (o) => int64(buf.readBigInt64LE(o)));
      case GgufValueType.FLOAT64: return fixed(8, (o) => buf.readDoubleLE(o));
      case GgufValueType.ARRAY: {
        const itemType = u32();
        const count = u64();
        if (count > buf.length - pos) fail(`truncated file: array of ${count} items at offset ${pos} exceeds it`);
        const out = new Array<unknown>(count);
        for (let i = 0; i < count; i++) out[i] = value(itemType);
        return out;
      }
      default:
        return fail(`unknown metadata value type ${type} at offset ${pos}`);
    }
  };

  if (buf.length < 4 || buf.readUInt32LE(0) !== GGUF_MAGIC) fail('not a GGUF file (bad magic)');
  pos = 4;
  const version = u32();
  if (version !== 2 && version !== 3) fail(`unsupported GGUF version ${version} (only 2 and 3)`);
  const tensorCount = u64();
  const kvCount = u64();
  const metadata = new Map<string, unknown>();
  for (let i = 0; i < kvCount; i++) {
    const key = str();
    metadata.set(key, value(u32()));
  }

  const infos: { name: string; ne: number[]; type: number; rel: number }[] = [];
  for (let i = 0; i < tensorCount; i++) {
    const name = str();
    const nDims = u32();
    if (nDims > 8) fail(`tensor ${name} has ${nDims} dims`);
    const ne: number[] = [];
    for (let d = 0; d < nDims; d++) ne.push(u64());
    infos.push({ name, ne, type: u32(), rel: u64() });
  }

  const alignment = metadata.get('general.alignment') ?? 32;
  if (typeof alignment !== 'number' || alignment <= 0) fail(`bad general.alignment ${String(alignment)}`);
  const dataStart = Math.ceil(pos / (alignment as number)) * (alignment as number);

  const tensors: GgufTensorInfo[] = infos.map(({ name, ne, type, rel }) => {
    const elems = ne.reduce((a, b) => a * b, 1);
    const block = BLOCK[type];
    if (block && ne.length > 0 && ne[0] % block.elems !== 0) fail(`tensor ${name}: ne[0]=${ne[0]} is not a multiple of the block size ${block.elems}`);
    const nbytes = block && (elems / block.elems) * block.bytes;
    const offset = dataStart + rel;
    if (nbytes !== undefined && offset + nbytes > buf.length) fail(`truncated file: tensor ${name} needs bytes ${offset}..${offset + nbytes}, file is ${buf.length} bytes`);
    return { name, shape: [...ne].reverse(), type, offset, nbytes };
  });
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const tensorBytes = (t: GgufTensorInfo | string): Uint8Array => {
    const info = typeof t === 'string' ? byName.get(t) ?? fail(`no tensor named ${t}`) : t;
    if (info.nbytes === undefined) return fail(`tensor ${info.name} has ggml ${ggmlTypeName(info.type)}, which this reader can't decode`);
    return buf.subarray(info.offset, info.offset + info.nbytes);
  };

  return {
    version,
    metadata,
    tensors,
    tensorData(name) {
      const t = byName.get(name) ?? fail(`no tensor named ${name}`);
      const n = t.shape.reduce((a, b) => a * b, 1);
      switch (t.type) {
        case GgmlType.F32:
          return view(buf, t.offset, n, Float32Array);
        case GgmlType.F16:
          return float16ToFloat32(view(buf, t.offset, n, Uint16Array));
        case GgmlType.BF16:
          return bfloat16ToFloat32(view(buf, t.offset, n, Uint16Array));
        default:
          if (t.nbytes === undefined) return fail(`tensor ${name} has ggml ${ggmlTypeName(t.type)}, which this reader can't decode (F32, F16, BF16, Q4_0, Q8_0, Q4_K, Q5_K, Q6_K)`);
          return dequantize(t.type, tensorBytes(t), n);
      }
    },
    tensorBytes,
  };
}

/** A typed view of buf's bytes, copied only when they aren't aligned for the element type. */
function view<T extends Float32Array | Uint16Array>(
  buf: Buffer, offset: number, length: number, Ctor: { new (b: ArrayBufferLike, o: number, l: number): T; new (l: number): T; BYTES_PER_ELEMENT: number },
): T {
  const abs = buf.byteOffset + offset;
  if (abs % Ctor.BYTES_PER_ELEMENT === 0) return new Ctor(buf.buffer, abs, length);
  const out = new Ctor(length);
  new Uint8Array(out.buffer).set(buf.subarray(offset, offset + length * Ctor.BYTES_PER_ELEMENT));
  return out;
}


/** The shortest decimal that is the same float32, so 1e-5 stored as f32 reads back as 1e-5. */
function shortestF32(x: number): number {
  if (!Number.isFinite(x)) return x;
  for (let p = 1; p < 9; p++) {
    const y = Number(x.toPrecision(p));
    if (Math.fround(y) === x) return y;
  }
  return x;
}

export type GgufMeta =
  | { type: Exclude<GgufValueType, GgufValueType.ARRAY>; value: unknown }
  | { type: GgufValueType.ARRAY; itemType: Exclude<GgufValueType, GgufValueType.ARRAY>; value: unknown[] };

export interface GgufTensorSpec {
  name: string;
  /** Row-major, outermost first. */
  shape: number[];
  type: GgmlType;
  /** Float values to encode, or the already-encoded bytes. */
  data: Float32Array | Uint8Array;
}

/** Writes a GGUF file: enough for tests and small exports, not for multi-GB models. */
export function writeGguf(path: string, metadata: Record<string, GgufMeta>, tensors: GgufTensorSpec[], opts: { version?: 2 | 3; alignment?: number } = {}): void {
  const alignment = opts.alignment ?? (metadata['general.alignment']?.value as number | undefined) ?? 32;
  const parts: Buffer[] = [];
  const u32 = (v: number) => { const b = Buffer.alloc(4); b.writeUInt32LE(v); parts.push(b); };
  const u64 = (v: number | bigint) => { const b = Buffer.alloc(8); b.writeBigUInt64LE(BigInt(v)); parts.push(b); };
  const str = (s: string) => { const b = Buffer.from(s, 'utf8'); u64(b.length); parts.push(b); };
  const scalar = (type: GgufValueType, v: unknown) => {
    const b = Buffer.alloc(8);
    switch (type) {
      case GgufValueType.UINT8: b.writeUInt8(v as number); return parts.push(b.subarray(0, 1));
      case GgufValueType.INT8: b.writeInt8(v as number); return parts.push(b.subarray(0, 1));
      case GgufValueType.UINT16: b.writeUInt16LE(v as number); return parts.push(b.subarray(0, 2));
      case GgufValueType.INT16: b.writeInt16LE(v as number); return parts.push(b.subarray(0, 2));
      case GgufValueType.UINT32: b.writeUInt32LE(v as number); return parts.push(b.subarray(0, 4));
      case GgufValueType.INT32: b.writeInt32LE(v as number); return parts.push(b.subarray(0, 4));
      case GgufValueType.FLOAT32: b.writeFloatLE(v as number); return parts.push(b.subarray(0, 4));
      case GgufValueType.BOOL: b.writeUInt8(v ? 1 : 0); return parts.push(b.subarray(0, 1));
      case GgufValueType.STRING: return str(v as string);
      case GgufValueType.UINT64: b.writeBigUInt64LE(BigInt(v as number)); return parts.push(b);
      case GgufValueType.INT64: b.writeBigInt64LE(BigInt(v as number)); return parts.push(b);
      case GgufValueType.FLOAT64: b.writeDoubleLE(v as number); return parts.push(b);
      default: throw new Error(`writeGguf: can't write value type ${type}`);
    }
  };

  u32(GGUF_MAGIC);
  u32(opts.version ?? 3);
  u64(tensors.length);
  u64(Object.keys(metadata).length);
  for (const [key, m] of Object.entries(metadata)) {
    str(key);
    u32(m.type);
    if (m.type === GgufValueType.ARRAY) {
      u32(m.itemType);
      u64(m.value.length);
      for (const v of m.value) scalar(m.itemType, v);
    } else scalar(m.type, m.value);
  }
  const blobs = tensors.map((t) => (t.data instanceof Uint8Array ? Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength) : encode(t.type, t.data)));
  let rel = 0;
  const pad = (n: number) => Math.ceil(n / alignment) * alignment;
  tensors.forEach((t, i) => {
    str(t.name);
    u32(t.shape.length);
    for (const d of [...t.shape].reverse()) u64(d);
    u32(t.type);
    u64(rel);
    rel = pad(rel + blobs[i].length);
  });
  const headerLen = parts.reduce((a, b) => a + b.length, 0);
  parts.push(Buffer.alloc(pad(headerLen) - headerLen));
  for (const b of blobs) {
    parts.push(b, Buffer.alloc(pad(b.length) - b.length));
  }
  writeFileSync(path, Buffer.concat(parts));
}

function encode(type: GgmlType, x: Float32Array): Buffer {
  const n = x.length;
  switch (type) {
    case GgmlType.F32:
      return Buffer.from(x.buffer, x.byteOffset, x.byteLength);
    case GgmlType.F16:
    case GgmlType.BF16: {
      const b = Buffer.alloc(2 * n), conv = type === GgmlType.F16 ? f32ToF16 : f32ToBf16;
      for (let i = 0; i < n; i++) b.writeUInt16LE(conv(x[i]), 2 * i);
      return b;
    }
    case GgmlType.Q8_0: {
      if (n % 32) throw new Error('writeGguf: Q8_0 needs a multiple of 32 values');
      const b = Buffer.alloc((n / 32) * 34);
      for (let blk = 0; blk < n / 32; blk++) {
        let amax = 0;
        for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[blk * 32 + j]));
        const d = amax / 127, id = d ? 1 / d : 0;
        b.writeUInt16LE(f32ToF16(d), blk * 34);
        for (let j = 0; j < 32; j++) {
          const v = x[blk * 32 + j] * id;
          b.writeInt8(Math.sign(v) * Math.round(Math.abs(v)), blk * 34 + 2 + j); // roundf: half away from zero
        }
      }
      return b;
    }
    default:
      throw new Error(`writeGguf: can't encode ggml type ${type}`);
  }
}

/** Per head, row i of HF's rotate-half q/k layout is row order[i] of the interleaved-pairs layout. */
export function qkRowOrder(nHeads: number, headDim: number): number[] {
  const order: number[] = [], half = headDim / 2;
  for (let h = 0; h < nHeads; h++) {
    for (let j = 0; j < headDim; j++) order.push(h * headDim + (j < half ? 2 * j : 2 * (j - half) + 1));
  }
  return order;
}

/**
 * Reorders q/k projection rows (or biases, cols = 1) per head from the interleaved-pairs RoPE layout
 * (llama2.c, Meta, GGUF llama) to HF's rotate-half layout.
 */
export function unpermuteQk(data: Float32Array, nHeads: number, headDim: number, cols: number): Float32Array {
  if (data.length !== nHeads * headDim * cols) throw new Error(`unpermuteQk: ${data.length} values is not ${nHeads}x${headDim}x${cols}`);
  const out = new Float32Array(data.length);
  qkRowOrder(nHeads, headDim).forEach((from, row) => out.set(data.subarray(from * cols, (from + 1) * cols), row * cols));
  return out;
}

/** The HF weight names and shapes a config implies. */
export function hfWeightShapes(config: LlamaConfig): Map<string, number[]> {
  const d = config.hidden_size, f = config.intermediate_size, hd = config.head_dim ?? d / config.num_attention_heads;
  const q = config.num_attention_heads * hd, kv = config.num_key_value_heads * hd;
  const bias = config.attention_bias ?? config.model_type === 'qwen2';
  const m = new Map<string, number[]>([['model.embed_tokens.weight', [config.vocab_size, d]]]);
  for (let i = 0; i < config.num_hidden_layers; i++) {
    const p = `model.layers.${i}.`;
    m.set(p + 'input_layernorm.weight', [d]);
    m.set(p + 'self_attn.q_proj.weight', [q, d]);
    m.set(p + 'self_attn.k_proj.weight', [kv, d]);
    m.set(p + 'self_attn.v_proj.weight', [kv, d]);
    if (bias) {
      m.set(p + 'self_attn.q_proj.bias', [q]);
      m.set(p + 'self_attn.k_proj.bias', [kv]);
      m.set(p + 'self_attn.v_proj.bias', [kv]);
    }
    if (config.model_type === 'qwen3') {
      // Qwen3 normalises q and k per head.
      m.set(p + 'self_attn.q_norm.weight', [hd]);
      m.set(p + 'self_attn.k_norm.weight', [hd]);
    }
    m.set(p + 'self_attn.o_proj.weight', [d, q]);
    m.set(p + 'post_attention_layernorm.weight', [d]);
    m.set(p + 'mlp.gate_proj.weight', [f, d]);
    m.set(p + 'mlp.up_proj.weight', [f, d]);
    m.set(p + 'mlp.down_proj.weight', [d, f]);
  }
  m.set('model.norm.weight', [d]);
  if (!config.tie_word_embeddings) m.set('lm_head.weight', [config.vocab_size, d]);
  return m;
}

const LAYER_NAMES: Record<string, string> = {
  attn_norm: 'input_layernorm',
  attn_q: 'self_attn.q_proj',
  attn_k: 'self_attn.k_proj',
  attn_v: 'self_attn.v_proj',
  attn_output: 'self_attn.o_proj',
  ffn_norm: 'post_attention_layernorm',
  ffn_gate: 'mlp.gate_proj',
  ffn_up: 'mlp.up_proj',
  ffn_down: 'mlp.down_proj',
};

function hfName(gguf: string): string | undefined {
  const top: Record<string, string> = { token_embd: 'model.embed_tokens', output_norm: 'model.norm', output: 'lm_head' };
  const m = /^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$/.exec(gguf);
  if (!m) return undefined;
  const [, layer, base, kind] = m;
  const mapped = layer === undefined ? top[base] : LAYER_NAMES[base] && `model.layers.${layer}.${LAYER_NAMES[base]}`;
  return mapped && `${mapped}.${kind}`;
}

export function ggufVocab(metadata: Map<string, unknown>): SpVocab {
  const tokens = metadata.get('tokenizer.ggml.tokens');
  if (!Array.isArray(tokens)) throw new Error('GGUF has no tokenizer.ggml.tokens');
  const scores = metadata.get('tokenizer.ggml.scores') as number[] | undefined;
  const types = metadata.get('tokenizer.ggml.token_type') as number[] | undefined;
  const id = (key: string, def?: number) => {
    const v = metadata.get(`tokenizer.ggml.${key}_token_id`) ?? def;
    if (typeof v !== 'number') throw new Error(`GGUF has no tokenizer.ggml.${key}_token_id`);
    return v;
  };
  return {
    pieces: tokens.map((piece: string, i) => ({ piece, score: scores?.[i] ?? 0, type: (types?.[i] ?? PieceType.Normal) as PieceType })),
    bosId: id('bos'),
    eosId: id('eos'),
    unkId: id('unknown', 0),
    addDummyPrefix: (metadata.get('tokenizer.ggml.add_space_prefix') as boolean | undefined) ?? true,
  };
}

/** A llama or qwen2 GGUF as an HF-layout fp32 checkpoint. */
export function ggufToCheckpoint(path: string): Checkpoint {
  const g = readGguf(path);
  const arch = g.metadata.get('general.architecture');
  if (arch !== 'llama' && arch !== 'qwen2') throw new Error(`${path}: unsupported architecture ${String(arch)} (llama, qwen2)`);
  const num = (key: string, def?: number): number => {
    const v = g.metadata.get(`${arch}.${key}`) ?? def;
    if (typeof v !== 'number') throw new Error(`${path}: missing ${arch}.${key}`);
    return v;
  };
  const tokenizerModel = g.metadata.get('tokenizer.ggml.model');
  let tokenizer: TokenizerFiles | undefined;
  if (tokenizerModel === 'gpt2') tokenizer = ggufByteLevelTokenizer(g.metadata, path);
  else if (tokenizerModel !== 'llama') throw new Error(`${path}: unsupported tokenizer.ggml.model ${JSON.stringify(tokenizerModel)} (llama: SentencePiece, gpt2: byte-level BPE)`);
  const vocab: SpVocab = tokenizer
    ? { pieces: (g.metadata.get('tokenizer.ggml.tokens') as string[]).map((piece) => ({ piece, score: 0, type: PieceType.Normal })), bosId: tokenizer.bosId ?? -1, eosId: tokenizer.eosIds[0] ?? -1, unkId: -1, addDummyPrefix: false }
    : ggufVocab(g.metadata);
  const hidden = num('embedding_length'), heads = num('attention.head_count');
  const kvHeads = num('attention.head_count_kv', heads);
  const headDim = num('attention.key_length', hidden / heads);
  const names = new Set(g.tensors.map((t) => t.name));
  const config: LlamaConfig = {
    model_type: arch,
    architectures: [arch === 'llama' ? 'LlamaForCausalLM' : 'Qwen2ForCausalLM'],
    hidden_size: hidden,
    intermediate_size: num('feed_forward_length'),
    num_hidden_layers: num('block_count'),
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    ...(headDim !== hidden / heads && { head_dim: headDim }),
    vocab_size: vocab.pieces.length,
    max_position_embeddings: num('context_length'),
    rms_norm_eps: num('attention.layer_norm_rms_epsilon'),
    rope_theta: num('rope.freq_base', 10000),
    tie_word_embeddings: !names.has('output.weight'),
    ...(names.has('blk.0.attn_q.bias') && { attention_bias: true }),
    bos_token_id: tokenizer ? tokenizer.bosId : vocab.bosId,
    eos_token_id: tokenizer ? tokenizer.eosIds[0] : vocab.eosId,
  };

  const expected = hfWeightShapes(config);
  const weights: WeightMap = new Map();
  for (const t of g.tensors) {
    const name = hfName(t.name);
    if (!name) continue;
    const shape = expected.get(name);
    if (!shape) throw new Error(`${path}: unexpected tensor ${t.name}`);
    if (shape.join() !== t.shape.join()) throw new Error(`${path}: ${t.name} is [${t.shape}], expected [${shape}]`);
    let nbits = shape.length === 2 && (t.type === GgmlType.Q4_0 || t.type === GgmlType.Q8_0) ? nbitsFromGgml(t.type, g.tensorBytes(t), shape[0], shape[1]) : undefined;
    // GGUF qwen2 keeps HF's rotate-half order (llama.cpp runs it with NEOX RoPE); llama is interleaved.
    const qk = arch === 'llama' && /\.(q|k)_proj\./.exec(name)?.[1];
    const decode = (): Float32Array => {
      const data = g.tensorData(t.name);
      return qk ? unpermuteQk(data, qk === 'q' ? heads : kvHeads, headDim, shape.length === 2 ? shape[1] : 1) : data;
    };
    if (qk && nbits) nbits = permuteRows(nbits, qkRowOrder(qk === 'q' ? heads : kvHeads, headDim));
    const ggml = t.type !== GgmlType.F32 ? { ggml: { type: t.type, ...(nbits && { nbits }) } } : {};
    if (nbits) {
      // Blocks kept as they are need no floats: decoded only if something asks (re-quantising to other bits).
      let floats: Float32Array | undefined;
      weights.set(name, { shape, get data() { return (floats ??= decode()); }, ...ggml });
    } else {
      weights.set(name, { shape, data: decode(), ...ggml });
    }
  }
  for (const name of expected.keys()) if (!weights.has(name)) throw new Error(`${path}: missing tensor for ${name}`);
  return { config, weights, vocab, ...(tokenizer && { tokenizer }) };
}
