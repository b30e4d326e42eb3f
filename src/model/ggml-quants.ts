import { halfTable } from './half.ts';

/** The ggml tensor types this reader dequantises (ggml's numbering). */
export enum GgmlType {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q8_0 = 8,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  BF16 = 30,
}

export const GGML_BLOCK: Record<number, { elems: number; bytes: number }> = {
  [GgmlType.F32]: { elems: 1, bytes: 4 },
  [GgmlType.F16]: { elems: 1, bytes: 2 },
  [GgmlType.BF16]: { elems: 1, bytes: 2 },
  [GgmlType.Q4_0]: { elems: 32, bytes: 18 },
  [GgmlType.Q8_0]: { elems: 32, bytes: 34 },
  [GgmlType.Q4_K]: { elems: 256, bytes: 144 },
  [GgmlType.Q5_K]: { elems: 256, bytes: 176 },
  [GgmlType.Q6_K]: { elems: 256, bytes: 210 },
};

export function ggmlTypeName(type: number): string {
  return GgmlType[type] ?? `type ${type}`;
}

const fr = Math.fround;

/**
 * Dequantises n values of a block-quantised type from bytes (starting at the first block), in float32
 * arithmetic step for step as ggml's dequantize_row_* does, so the values are the same bits.
 */
export function dequantize(type: number, bytes: Uint8Array, n: number, out = new Float32Array(n)): Float32Array {
  const h = halfTable();
  const f16 = (o: number) => h[bytes[o] | (bytes[o + 1] << 8)];
  const i8 = (o: number) => (bytes[o] << 24) >> 24;
  switch (type) {
    case GgmlType.Q4_0:
      for (let b = 0, o = 0; b < n; b += 32, o += 18) {
        const d = f16(o);
        for (let j = 0; j < 16; j++) {
          const q = bytes[o + 2 + j];
          out[b + j] = d * ((q & 0xf) - 8);
          out[b + j + 16] = d * ((q >> 4) - 8);
        }
      }
      return out;
    case GgmlType.Q8_0:
      for (let b = 0, o = 0; b < n; b += 32, o += 34) {
        const d = f16(o);
        for (let j = 0; j < 32; j++) out[b + j] = d * i8(o + 2 + j);
      }
      return out;
    case GgmlType.Q4_K:
    case GgmlType.Q5_K: {
      const five = type === GgmlType.Q5_K;
      const blockBytes = five ? 176 : 144;
      const sc = new Uint8Array(8), mn = new Uint8Array(8);
      for (let b = 0, o = 0; b < n; b += 256, o += blockBytes) {
        const d = f16(o), dmin = f16(o + 2);
        scaleMinK4(bytes, o + 4, sc, mn);
        const qh = o + 16, qs = five ? o + 48 : o + 16;
        for (let j = 0; j < 4; j++) {
          const d1 = fr(d * sc[2 * j]), m1 = fr(dmin * mn[2 * j]);
          const d2 = fr(d * sc[2 * j + 1]), m2 = fr(dmin * mn[2 * j + 1]);
          const u1 = 1 << (2 * j), u2 = 2 << (2 * j);
          for (let l = 0; l < 32; l++) {
            const q = bytes[qs + 32 * j + l];
            const hi1 = five && bytes[qh + l] & u1 ? 16 : 0, hi2 = five && bytes[qh + l] & u2 ? 16 : 0;
            out[b + 64 * j + l] = fr(d1 * ((q & 0xf) + hi1)) - m1;
            out[b + 64 * j + 32 + l] = fr(d2 * ((q >> 4) + hi2)) - m2;
          }
        }
      }
      return out;
    }
    case GgmlType.Q6_K:
      for (let b = 0, o = 0; b < n; b += 256, o += 210) {
        const d = f16(o + 208);
        for (let half = 0; half < 2; half++) {
          const ql = o + 64 * half, qh = o + 128 + 32 * half, sc = o + 192 + 8 * half, y = b + 128 * half;
          for (let l = 0; l < 32; l++) {
            const is = l >> 4, a = bytes[ql + l], c = bytes[ql + l + 32], hb = bytes[qh + l];
            out[y + l] = fr(d * i8(sc + is)) * (((a & 0xf) | ((hb & 3) << 4)) - 32);
            out[y + l + 32] = fr(d * i8(sc + is + 2)) * (((c & 0xf) | (((hb >> 2) & 3) << 4)) - 32);
            out[y + l + 64] = fr(d * i8(sc + is + 4)) * (((a >> 4) | (((hb >> 4) & 3) << 4)) - 32);
            out[y + l + 96] = fr(d * i8(sc + is + 6)) * (((c >> 4) | (((hb >> 6) & 3) << 4)) - 32);
          }
        }
      }
      return out;
    default:
      throw new Error(`can't dequantise ggml ${ggmlTypeName(type)}`);
  }
}

/** The eight 6-bit scales and mins of a Q4_K / Q5_K block (ggml's get_scale_min_k4). */
function scaleMinK4(q: Uint8Array, o: number, sc: Uint8Array, mn: Uint8Array): void {
  for (let j = 0; j < 8; j++) {
    if (j < 4) {
      sc[j] = q[o + j] & 63;
      mn[j] = q[o + j + 4] & 63;
    } else {
      sc[j] = (q[o + j + 4] & 0xf) | ((q[o + j - 4] >> 6) << 4);
      mn[j] = (q[o + j + 4] >> 4) | ((q[o + j] >> 6) << 4);
    }
  }
}
