import { halfTable } from './half.ts';
import { GgmlType } from './ggml-quants.ts';

/**
 * Weights in the layout of ONNX Runtime's MatMulNBits (com.microsoft): B [N, blocks, blob] uint8, each row of
 * the [N, K] (HF [out, in]) weight cut into blocks of `blockSize` along K, codes packed low bits first;
 * scales [N, blocks]; zero points (optional) [N, ceil(blocks × bits / 8)] uint8, packed the same way. A value
 * is (code − zero point) × scale; without zero points the zero point is 2^(bits−1).
 */
export interface NBitsWeight {
  bits: 4 | 8;
  blockSize: number;
  n: number;
  k: number;
  packed: Uint8Array;
  scales: Float32Array;
  zeroPoints?: Uint8Array;
}

export type Precision = 'fp32' | 'fp16' | 'int8' | 'int4';

export const QUANT_BLOCK_SIZES = [16, 32, 64, 128, 256];

export function blocksOf(k: number, blockSize: number): number {
  return Math.ceil(k / blockSize);
}

/** ONNX Runtime's CPU fast path: int8 activations against the int4/int8 blocks (MLAS SQNBitGemm CompInt8). */
export const QUANT_ACCURACY_LEVEL = 4;

/**
 * The block size for rows of k values when `blockSize` is asked for: at most a quarter of the row (from 16), so
 * that narrow rows (stories260K's 64) still get a scale per few values.
 */
export function rowBlockSize(k: number, blockSize: number): number {
  let bs = 16;
  while (bs * 2 <= blockSize && bs * 2 * 4 <= k) bs *= 2;
  return bs;
}

/**
 * The block size written for rows of k values: as asked, or where one block holds the whole row, the smallest
 * power of two from 16 that does. So a weight's bits and block size follow from its B dims and K alone.
 */
export function effectiveBlockSize(k: number, blockSize: number): number {
  if (k > blockSize) return blockSize;
  let bs = 16;
  while (bs < k) bs *= 2;
  return bs;
}

/** MatMulNBits' bits and block_size for a B initializer of dims [N, blocks, blob] over rows of k values. */
export function nbitsAttributes(k: number, dims: number[]): { bits: number; blockSize: number } {
  const [, blocks, blob] = dims;
  const blockSize = blocks === 1 ? effectiveBlockSize(k, k) : QUANT_BLOCK_SIZES.find((bs) => blocksOf(k, bs) === blocks);
  const bits = blockSize && (blob * 8) / blockSize;
  if (!blockSize || (bits !== 4 && bits !== 8)) throw new Error(`a MatMulNBits weight of dims [${dims}] does not fit rows of ${k} values`);
  return { bits, blockSize };
}

/** Bytes per row of blocks, for packed and for zero points. */
function rowBytes(w: { bits: number; blockSize: number; k: number }): { blob: number; blocks: number; zpRow: number } {
  const blocks = blocksOf(w.k, w.blockSize);
  return { blob: (w.blockSize * w.bits) / 8, blocks, zpRow: Math.ceil((blocks * w.bits) / 8) };
}

function setCode(buf: Uint8Array, bits: number, index: number, code: number): void {
  if (bits === 8) buf[index] = code;
  else buf[index >> 1] |= index & 1 ? code << 4 : code;
}

function getCode(buf: Uint8Array, bits: number, index: number): number {
  return bits === 8 ? buf[index] : (buf[index >> 1] >> ((index & 1) * 4)) & 0xf;
}

/**
 * Asymmetric round-to-nearest block quantisation of a row-major [n, k] weight, with zero points (see
 * bestAsymmetric).
 */
export function quantizeNBits(w: Float32Array, n: number, k: number, bits: 4 | 8, blockSize: number): NBitsWeight {
  if (w.length !== n * k) throw new Error(`quantizeNBits: ${w.length} values is not ${n}x${k}`);
  if (!QUANT_BLOCK_SIZES.includes(blockSize)) throw new Error(`block size ${blockSize} is not one of ${QUANT_BLOCK_SIZES.join(', ')}`);
  blockSize = effectiveBlockSize(k, blockSize);
  const out: NBitsWeight = { bits, blockSize, n, k, packed: new Uint8Array(0), scales: new Float32Array(0) };
  const { blob, blocks, zpRow } = rowBytes(out);
  const packed = new Uint8Array(n * blocks * blob);
  const scales = new Float32Array(n * blocks);
  const zeroPoints = new Uint8Array(n * zpRow);
  const qmax = (1 << bits) - 1;
  for (let r = 0; r < n; r++) {
    for (let b = 0; b < blocks; b++) {
      const start = r * k + b * blockSize, end = r * k + Math.min(k, (b + 1) * blockSize);
      const codeBase = (r * blocks + b) * blockSize;
      const [scale, zp] = bestAsymmetric(w, start, end, qmax, bits === 4 ? 5 : 1);
      const inv = scale ? 1 / scale : 0;
      scales[r * blocks + b] = scale;
      if (zeroPoints) setCode(zeroPoints, bits, r * zpRow * (8 / bits) + b, zp);
      for (let i = 0; i < blockSize; i++) {
        const code = start + i < end ? Math.min(qmax, Math.max(0, Math.round(w[start + i] * inv) + zp)) : zp;
        setCode(packed, bits, codeBase + i, code);
      }
    }
  }
  return { ...out, packed, scales, zeroPoints };
}

/**
 * Scale and zero point for one block: its [min, max] (widened to hold 0, so zeros stay exact), each end pulled
 * in over a small grid, keeping the pair with the least squared error; then the scale refitted by least squares
 * to the codes it gives.
 */
function bestAsymmetric(w: Float32Array, start: number, end: number, qmax: number, grid: number): [number, number] {
  let lo = 0, hi = 0;
  for (let i = start; i < end; i++) {
    lo = Math.min(lo, w[i]);
    hi = Math.max(hi, w[i]);
  }
  if (hi === lo) return [0, 0];
  let bestScale = 0, bestZp = 0, bestErr = Infinity;
  const errorOf = (scale: number, zp: number): number => {
    const inv = 1 / scale;
    let err = 0;
    for (let i = start; i < end; i++) {
      const q = Math.round(w[i] * inv) + zp;
      const d = ((q < 0 ? 0 : q > qmax ? qmax : q) - zp) * scale - w[i];
      err += d * d;
    }
    return err;
  };
  for (let a = 0; a < grid; a++) {
    for (let b = 0; b < grid; b++) {
      const l = lo * (1 - 0.05 * a), h = hi * (1 - 0.05 * b);
      const scale = Math.fround((h - l) / qmax);
      if (!(scale > 0)) continue;
      const zp = Math.min(qmax, Math.max(0, Math.round(-l / scale)));
      const err = errorOf(scale, zp);
      if (err < bestErr) [bestErr, bestScale, bestZp] = [err, scale, zp];
    }
  }
  // The scale that fits the best pair's codes by least squares, kept if it does better.
  const inv = 1 / bestScale;
  let xq = 0, qq = 0;
  for (let i = start; i < end; i++) {
    const q = Math.min(qmax, Math.max(0, Math.round(w[i] * inv) + bestZp)) - bestZp;
    xq += w[i] * q;
    qq += q * q;
  }
  const fit = qq > 0 ? Math.fround(xq / qq) : 0;
  if (fit > 0 && errorOf(fit, bestZp) < bestErr) bestScale = fit;
  return [bestScale, bestZp];
}

/** The float values a quantised weight stands for, row-major [n, k] (as MatMulNBits dequantises them). */
export function dequantizeNBits(q: NBitsWeight): Float32Array {
  const { blob, blocks, zpRow } = rowBytes(q);
  void blob;
  const out = new Float32Array(q.n * q.k);
  const defaultZp = 1 << (q.bits - 1);
  for (let r = 0; r < q.n; r++) {
    for (let c = 0; c < q.k; c++) {
      const b = Math.floor(c / q.blockSize);
      const zp = q.zeroPoints ? getCode(q.zeroPoints, q.bits, r * zpRow * (8 / q.bits) + b) : defaultZp;
      out[r * q.k + c] = (getCode(q.packed, q.bits, (r * blocks + b) * q.blockSize + (c % q.blockSize)) - zp) * q.scales[r * blocks + b];
    }
  }
  return out;
}

/**
 * A GGUF Q4_0 or Q8_0 weight ([n, k], k a multiple of 32) as MatMulNBits blocks of 32, without re-quantising:
 * Q4_0 stores d and codes q with value d × (q − 8), MatMulNBits' 4-bit default zero point; Q8_0 stores signed
 * codes, which become q + 128 against the 8-bit default zero point 128. Only the nibble order differs (Q4_0
 * keeps elements j and j + 16 in one byte).
 */
export function nbitsFromGgml(type: GgmlType, bytes: Uint8Array, n: number, k: number): NBitsWeight {
  const blocks = k / 32;
  if (!Number.isInteger(blocks)) throw new Error(`a ${GgmlType[type]} row of ${k} values is not whole blocks of 32`);
  const half = halfTable();
  const scales = new Float32Array(n * blocks);
  if (type === GgmlType.Q4_0) {
    const packed = new Uint8Array(n * blocks * 16);
    for (let b = 0; b < n * blocks; b++) {
      const o = b * 18;
      scales[b] = half[bytes[o] | (bytes[o + 1] << 8)];
      // Output byte i holds elements 2i (low) and 2i+1 (high); GGUF byte j holds j (low) and j+16 (high): bytes
      // 0-7 take low nibbles, bytes 8-15 the high nibbles, of GGUF bytes 2i and 2i+1.
      const s = o + 2, p = b * 16;
      for (let j = 0; j < 8; j++) {
        packed[p + j] = (bytes[s + 2 * j] & 0xf) | ((bytes[s + 2 * j + 1] & 0xf) << 4);
        packed[p + 8 + j] = (bytes[s + 2 * j] >> 4) | (bytes[s + 2 * j + 1] & 0xf0);
      }
    }
    return { bits: 4, blockSize: 32, n, k, packed, scales };
  }
  if (type === GgmlType.Q8_0) {
    const packed = new Uint8Array(n * blocks * 32);
    for (let b = 0; b < n * blocks; b++) {
      const o = b * 34;
      scales[b] = half[bytes[o] | (bytes[o + 1] << 8)];
      for (let j = 0; j < 32; j++) packed[b * 32 + j] = (bytes[o + 2 + j] + 128) & 0xff;
    }
    return { bits: 8, blockSize: 32, n, k, packed, scales };
  }
  throw new Error(`ggml ${GgmlType[type]} has no MatMulNBits equivalent`);
}

/** Rows of several weights with the same k stacked into one (as q, k and v become one projection). */
export function stackNBits(parts: NBitsWeight[]): NBitsWeight {
  const [first] = parts;
  for (const p of parts) {
    if (p.bits !== first.bits || p.blockSize !== first.blockSize || p.k !== first.k || !p.zeroPoints !== !first.zeroPoints) {
      throw new Error('stackNBits: the parts differ in bits, block size, k or zero points');
    }
  }
  const cat = <T extends Uint8Array | Float32Array>(arrays: T[], Ctor: new (n: number) => T): T => {
    const out = new Ctor(arrays.reduce((a, x) => a + x.length, 0));
    let at = 0;
    for (const a of arrays) (out.set(a as never, at), (at += a.length));
    return out;
  };
  return {
    bits: first.bits,
    blockSize: first.blockSize,
    n: parts.reduce((a, p) => a + p.n, 0),
    k: first.k,
    packed: cat(parts.map((p) => p.packed), Uint8Array),
    scales: cat(parts.map((p) => p.scales), Float32Array),
    zeroPoints: first.zeroPoints && cat(parts.map((p) => p.zeroPoints!), Uint8Array),
  };
}

/** The weight with its rows in a new order: row i of the result is row order[i] of q. */
export function permuteRows(q: NBitsWeight, order: number[]): NBitsWeight {
  const blocks = q.scales.length / q.n, rowBytes = q.packed.length / q.n;
  const packed = new Uint8Array(q.packed.length), scales = new Float32Array(q.scales.length);
  order.forEach((src, dst) => {
    packed.set(q.packed.subarray(src * rowBytes, (src + 1) * rowBytes), dst * rowBytes);
    scales.set(q.scales.subarray(src * blocks, (src + 1) * blocks), dst * blocks);
  });
  if (q.zeroPoints) throw new Error('permuteRows: weights with zero points are not row-permuted here');
  return { ...q, packed, scales };
}

/** A model folder's precision from its config.json: `tally.precision` where Tally wrote it, else torch_dtype. */
export function precisionOf(config: { torch_dtype?: unknown; tally?: unknown }): Precision {
  const written = (config.tally as { precision?: unknown } | undefined)?.precision;
  if (written === 'fp32' || written === 'fp16' || written === 'int8' || written === 'int4') return written;
  return config.torch_dtype === 'float16' ? 'fp16' : 'fp32';
}
