// Attention over Tally's paged KV cache, for the CPU runner (src/engine/paged-runner.ts).
//
// Each layer's cache is an arena of `pages` pages of PAGE positions, laid out per kind (0 = K, 1 = V) and KV
// head, so that a sequence's pages, taken in order from the free list, are contiguous for each of them:
//   page p, kind, KV head h -> ((kind * kvh + h) * pages + p) * PAGE * hd
// K is stored in blocks of BLK positions, transposed ([PAGE / BLK][hd][BLK]), so that one query's scores
// for BLK positions are BLK-wide multiply-adds without horizontal sums; V is [PAGE][hd].
// Elements are float32 or float16 (the arena's type; float16 saturates at ±65504); arithmetic is float32.
//
// attend(arena, qkv, out, rows, pages, dims, cos, sin) for one layer (`arena` is that layer's):
//   qkv [B * T, (heads + 2 * kvh) * hd] float32: each token's q, k and v as the projection gives them (no RoPE);
//   out [B * T, heads * hd] float32;
//   rows Int32Array [B * 3]: new tokens n, cached length len, start of the row's page list in `pages`;
//   dims Int32Array [T, heads, kvh, hd, pages];
//   cos, sin [max positions, hd / 2] float32: rotary tables (rotate-half, as ONNX Runtime's RotaryEmbedding
//   with interleaved = 0).
// Row b's new keys (rotated) and values go to positions len … len + n - 1, then each new token's rotated query,
// scaled by 1/sqrt(hd), attends to every position up to its own. Tokens t >= n of a row (padding) get zeros.
#include <node_api.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define PAGE 64
#define BLK 16
#define QROWS 4

// Asks for `bytes` from `p` on into the cache ahead of use. A decode step's cache (every row's pages, in L3 at
// best) is read as many short runs of lines, one run per page, that the hardware prefetcher picks up late.
static inline void prefetch(const void *p, size_t bytes) {
#if defined(__x86_64__)
  for (size_t i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
#else
  (void)p;
  (void)bytes;
#endif
}

// Page-level kernels from block- and row-level ones.
#define PAGE_KERNELS(NAME, QK_BLOCK, PV_ROW, ATTR)                                                                        \
  ATTR static void qk_##NAME(const float *const *q, int nrows, const void *kpage, int blocks, int hd, float *const *s, int half) { \
    const size_t esize = half ? 2 : 4;                                                                                  \
    float *sb[QROWS];                                                                                                   \
    for (int b = 0; b < blocks; b++) {                                                                                  \
      for (int r = 0; r < nrows; r++) sb[r] = s[r] + b * BLK;                                                           \
      QK_BLOCK(q, nrows, (const char *)kpage + (size_t)b * hd * BLK * esize, hd, sb, half);                             \
    }                                                                                                                   \
  }                                                                                                                     \
  ATTR static void pv_##NAME(const float *const *w, int nrows, int count, const void *vpage, int hd, float *const *acc, int half) { \
    for (int r = 0; r < nrows; r++) PV_ROW(w[r], count, vpage, hd, acc[r], half);                                       \
  }

// A row's pages of one KV head: page i's keys at arena + (kbase + table[i] * PAGE * hd) elements, values at vbase.
struct Pages {
  const void *arena;
  const int32_t *table;
  size_t kbase, vbase;
  int half;
};

typedef struct {
  // One page (float32, or float16 when `half`) for up to QROWS query rows: scores of `blocks` blocks of BLK
  // positions into s[r][0 …), and acc[r] += the first `count` positions' values weighted by w[r].
  void (*qk)(const float *const *q, int nrows, const void *kpage, int blocks, int hd, float *const *s, int half);
  void (*pv)(const float *const *w, int nrows, int count, const void *vpage, int hd, float *const *acc, int half);
  void (*softmax)(float *s, int m);
  void (*h2f)(const uint16_t *src, float *dst, int n);
  void (*f2h)(const float *src, uint16_t *dst, int n);
  // head_dim 8 (NULL: none): one token's nrows (<= QROWS) query rows over its `own` positions, scores, softmax
  // and values in two passes over its pages: see attend8_rows.
  void (*attend8)(const float *const *q, int nrows, const struct Pages *pages, int own, float *scores, float *const *out);
} Kernels;

// ---- portable kernels ----

static float half_to_float(uint16_t h);

static inline float element(const void *base, size_t i, int half) {
  return half ? half_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static void qk_block_plain(const float *const *q, int nrows, const void *kblk, int hd, float *const *s, int half) {
  for (int r = 0; r < nrows; r++) {
    float acc[BLK] = {0};
    for (int d = 0; d < hd; d++) {
      const float qd = q[r][d];
      for (int j = 0; j < BLK; j++) acc[j] += qd * element(kblk, (size_t)d * BLK + j, half);
    }
    memcpy(s[r], acc, sizeof acc);
  }
}

static void pv_row_plain(const float *w, int count, const void *vpage, int hd, float *acc, int half) {
  for (int p = 0; p < count; p++) {
    const float wp = w[p];
    for (int d = 0; d < hd; d++) acc[d] += wp * element(vpage, (size_t)p * hd + d, half);
  }
}

PAGE_KERNELS(plain, qk_block_plain, pv_row_plain, )

static void softmax_plain(float *s, int m) {
  float max = -INFINITY;
  for (int i = 0; i < m; i++) max = s[i] > max ? s[i] : max;
  float sum = 0;
  for (int i = 0; i < m; i++) {
    s[i] = expf(s[i] - max);
    sum += s[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < m; i++) s[i] *= inv;
}

static float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    exp = 113;
    while (!(mant & 0x400)) {
      mant <<= 1;
      exp--;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static uint16_t float_to_half(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t absx = x & 0x7fffffff;
  if (absx > 0x7f800000) return sign | 0x7e00; // NaN
  if (absx >= 0x477ff000) return sign | 0x7bff; // saturates (infinities too) at the largest half, 65504
  if (absx < 0x38800000) { // subnormal half or zero
    if (absx < 0x33000000) return sign;
    const uint32_t e = absx >> 23;
    const uint32_t m = (absx & 0x7fffff) | 0x800000;
    const uint32_t shift = 126 - e;
    uint32_t h = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (h & 1))) h++;
    return sign | h;
  }
  uint32_t h = ((absx >> 13) - (112 << 10));
  const uint32_t rem = absx & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
  return sign | h;
}

static void h2f_plain(const uint16_t *src, float *dst, int n) {
  for (int i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

static void f2h_plain(const float *src, uint16_t *dst, int n) {
  for (int i = 0; i < n; i++) dst[i] = float_to_half(src[i]);
}

// ---- AVX2 + FMA + F16C kernels ----
#if defined(__x86_64__)
#define AVX2 __attribute__((target("avx2,fma,f16c")))

#define INLINE_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

INLINE_AVX2 __m256 load8(const void *base, size_t i, const int HALF) {
  return HALF ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i))) : _mm256_loadu_ps((const float *)base + i);
}

// R query rows (a constant after inlining). Named accumulators, not arrays: GCC keeps these in registers.
INLINE_AVX2 void qk_rows(const float *const *q, const void *kblk, int hd, float *const *s, const int R, const int HALF) {
  __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0;
  const float *q0 = q[0], *q1 = R > 1 ? q[1] : q0, *q2 = R > 2 ? q[2] : q0, *q3 = R > 3 ? q[3] : q0;
  for (int d = 0; d < hd; d++) {
    const __m256 k0 = load8(kblk, (size_t)d * BLK, HALF);
    const __m256 k1 = load8(kblk, (size_t)d * BLK + 8, HALF);
    __m256 x = _mm256_broadcast_ss(q0 + d);
    l0 = _mm256_fmadd_ps(x, k0, l0);
    h0 = _mm256_fmadd_ps(x, k1, h0);
    if (R > 1) {
      x = _mm256_broadcast_ss(q1 + d);
      l1 = _mm256_fmadd_ps(x, k0, l1);
      h1 = _mm256_fmadd_ps(x, k1, h1);
    }
    if (R > 2) {
      x = _mm256_broadcast_ss(q2 + d);
      l2 = _mm256_fmadd_ps(x, k0, l2);
      h2 = _mm256_fmadd_ps(x, k1, h2);
    }
    if (R > 3) {
      x = _mm256_broadcast_ss(q3 + d);
      l3 = _mm256_fmadd_ps(x, k0, l3);
      h3 = _mm256_fmadd_ps(x, k1, h3);
    }
  }
  _mm256_storeu_ps(s[0], l0);
  _mm256_storeu_ps(s[0] + 8, h0);
  if (R > 1) {
    _mm256_storeu_ps(s[1], l1);
    _mm256_storeu_ps(s[1] + 8, h1);
  }
  if (R > 2) {
    _mm256_storeu_ps(s[2], l2);
    _mm256_storeu_ps(s[2] + 8, h2);
  }
  if (R > 3) {
    _mm256_storeu_ps(s[3], l3);
    _mm256_storeu_ps(s[3] + 8, h3);
  }
}

AVX2 static void qk_block_avx2(const float *const *q, int nrows, const void *kblk, int hd, float *const *s, int half) {
  if (half) {
    switch (nrows) {
      case 1: return qk_rows(q, kblk, hd, s, 1, 1);
      case 2: return qk_rows(q, kblk, hd, s, 2, 1);
      case 3: return qk_rows(q, kblk, hd, s, 3, 1);
      default: return qk_rows(q, kblk, hd, s, 4, 1);
    }
  }
  switch (nrows) {
    case 1: return qk_rows(q, kblk, hd, s, 1, 0);
    case 2: return qk_rows(q, kblk, hd, s, 2, 0);
    case 3: return qk_rows(q, kblk, hd, s, 3, 0);
    default: return qk_rows(q, kblk, hd, s, 4, 0);
  }
}

// acc[0 … 8 * LANES) += sum_p w[p] * row_p, rows `stride` elements apart. With few lanes, two positions
// at a time into separate accumulators (a single chain would wait on each multiply-add's latency).
#define PV_LANE(i)                                                                   \
  if (LANES > i) a##i = _mm256_fmadd_ps(wp, load8(v, (size_t)p * stride + 8 * i, HALF), a##i);
INLINE_AVX2 void pv_lanes(const float *w, int count, const void *v, int stride, float *acc, const int LANES, const int HALF) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 a0 = zero, a1 = zero, a2 = zero, a3 = zero, a4 = zero, a5 = zero, a6 = zero, a7 = zero;
  __m256 b0 = zero, b1 = zero, b2 = zero, b3 = zero;
  int p = 0;
  if (LANES <= 4) {
    for (; p + 2 <= count; p += 2) {
      const __m256 wp = _mm256_broadcast_ss(w + p), wq = _mm256_broadcast_ss(w + p + 1);
      const size_t r0 = (size_t)p * stride, r1 = r0 + stride;
      a0 = _mm256_fmadd_ps(wp, load8(v, r0, HALF), a0);
      b0 = _mm256_fmadd_ps(wq, load8(v, r1, HALF), b0);
      if (LANES > 1) {
        a1 = _mm256_fmadd_ps(wp, load8(v, r0 + 8, HALF), a1);
        b1 = _mm256_fmadd_ps(wq, load8(v, r1 + 8, HALF), b1);
      }
      if (LANES > 2) {
        a2 = _mm256_fmadd_ps(wp, load8(v, r0 + 16, HALF), a2);
        b2 = _mm256_fmadd_ps(wq, load8(v, r1 + 16, HALF), b2);
      }
      if (LANES > 3) {
        a3 = _mm256_fmadd_ps(wp, load8(v, r0 + 24, HALF), a3);
        b3 = _mm256_fmadd_ps(wq, load8(v, r1 + 24, HALF), b3);
      }
    }
  }
  for (; p < count; p++) {
    const __m256 wp = _mm256_broadcast_ss(w + p);
    PV_LANE(0) PV_LANE(1) PV_LANE(2) PV_LANE(3) PV_LANE(4) PV_LANE(5) PV_LANE(6) PV_LANE(7)
  }
  __m256 *out[8] = {&a0, &a1, &a2, &a3, &a4, &a5, &a6, &a7};
  const __m256 extra[4] = {b0, b1, b2, b3};
  for (int i = 0; i < LANES; i++) {
    __m256 x = _mm256_add_ps(_mm256_loadu_ps(acc + 8 * i), *out[i]);
    if (i < 4) x = _mm256_add_ps(x, extra[i]);
    _mm256_storeu_ps(acc + 8 * i, x);
  }
}

#define PV_CASES(HALF)                                                   \
  switch ((hd - d0 < 64 ? hd - d0 : 64) / 8) {                           \
    case 1: pv_lanes(w, count, v, hd, a, 1, HALF); break;                \
    case 2: pv_lanes(w, count, v, hd, a, 2, HALF); break;                \
    case 3: pv_lanes(w, count, v, hd, a, 3, HALF); break;                \
    case 4: pv_lanes(w, count, v, hd, a, 4, HALF); break;                \
    case 5: pv_lanes(w, count, v, hd, a, 5, HALF); break;                \
    case 6: pv_lanes(w, count, v, hd, a, 6, HALF); break;                \
    case 7: pv_lanes(w, count, v, hd, a, 7, HALF); break;                \
    default: pv_lanes(w, count, v, hd, a, 8, HALF); break;               \
  }

AVX2 static void pv_row_avx2(const float *w, int count, const void *vpage, int hd, float *acc, int half) {
  if (hd % 8 != 0) return pv_row_plain(w, count, vpage, hd, acc, half);
  for (int d0 = 0; d0 < hd; d0 += 64) {
    float *a = acc + d0;
    if (half) {
      const uint16_t *v = (const uint16_t *)vpage + d0;
      PV_CASES(1)
    } else {
      const float *v = (const float *)vpage + d0;
      PV_CASES(0)
    }
  }
}

PAGE_KERNELS(avx2, qk_block_avx2, pv_row_avx2, AVX2)

// exp(x) for x <= 0 (Cephes' expf polynomial after reducing x to r + n ln 2).
AVX2 static inline __m256 exp_avx2(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AVX2 static void softmax_avx2(float *s, int m) {
  int i = 0;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; i + 8 <= m; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float max = lanes[0];
  for (int j = 1; j < 8; j++) max = lanes[j] > max ? lanes[j] : max;
  for (; i < m; i++) max = s[i] > max ? s[i] : max;
  const __m256 bmax = _mm256_set1_ps(max);
  __m256 vsum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= m; i += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + i), bmax));
    _mm256_storeu_ps(s + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  _mm256_storeu_ps(lanes, vsum);
  float sum = 0;
  for (int j = 0; j < 8; j++) sum += lanes[j];
  for (; i < m; i++) {
    s[i] = expf(s[i] - max);
    sum += s[i];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (i = 0; i + 8 <= m; i += 8) _mm256_storeu_ps(s + i, _mm256_mul_ps(_mm256_loadu_ps(s + i), inv));
  for (; i < m; i++) s[i] *= 1.0f / sum;
}

AVX2 static void h2f_avx2(const uint16_t *src, float *dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
  for (; i < n; i++) dst[i] = _cvtsh_ss(src[i]);
}


#define AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c")))
#define INLINE_AVX512 __attribute__((target("avx512f,avx512vl,avx2,fma,f16c"), always_inline)) static inline

INLINE_AVX512 __m512 load16(const void *base, size_t i, const int HALF) {
  return HALF ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i))) : _mm512_loadu_ps((const float *)base + i);
}

// R rows × NB blocks: R * NB independent accumulators, one 16-wide load per block and d.
INLINE_AVX512 void qk512(const float *const *q, const void *kpage, int hd, float *const *s, const int R, const int NB, const int HALF) {
  __m512 acc[QROWS][4];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
  for (int d = 0; d < hd; d++) {
    __m512 k[4];
    for (int b = 0; b < NB; b++) k[b] = load16(kpage, (size_t)b * hd * BLK + (size_t)d * BLK, HALF);
    for (int r = 0; r < R; r++) {
      const __m512 x = _mm512_set1_ps(q[r][d]);
      for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(x, k[b], acc[r][b]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) _mm512_storeu_ps(s[r] + b * BLK, acc[r][b]);
}

#define QK512_R(R, HALF)                                   \
  switch (blocks) {                                        \
    case 1: return qk512(q, kpage, hd, s, R, 1, HALF);     \
    case 2: return qk512(q, kpage, hd, s, R, 2, HALF);     \
    case 3: return qk512(q, kpage, hd, s, R, 3, HALF);     \
    default: return qk512(q, kpage, hd, s, R, 4, HALF);    \
  }
#define QK512(HALF)                 \
  switch (nrows) {                  \
    case 1: QK512_R(1, HALF)        \
    case 2: QK512_R(2, HALF)        \
    case 3: QK512_R(3, HALF)        \
    default: QK512_R(4, HALF)       \
  }

AVX512 static void qk_avx512(const float *const *q, int nrows, const void *kpage, int blocks, int hd, float *const *s, int half) {
  if (half) QK512(1)
  QK512(0)
}

// R rows share each loaded value row: R * NV accumulators (NV 16-wide lanes of head_dim).
INLINE_AVX512 void pv512(const float *const *w, int count, const void *v, int stride, float *const *acc, const int R, const int NV, const int HALF) {
  __m512 a[QROWS][4];
  for (int r = 0; r < R; r++)
    for (int i = 0; i < NV; i++) a[r][i] = _mm512_loadu_ps(acc[r] + 16 * i);
  for (int p = 0; p < count; p++) {
    __m512 x[4];
    for (int i = 0; i < NV; i++) x[i] = load16(v, (size_t)p * stride + 16 * i, HALF);
    for (int r = 0; r < R; r++) {
      const __m512 wp = _mm512_set1_ps(w[r][p]);
      for (int i = 0; i < NV; i++) a[r][i] = _mm512_fmadd_ps(wp, x[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int i = 0; i < NV; i++) _mm512_storeu_ps(acc[r] + 16 * i, a[r][i]);
}

#define PV512_R(R, HALF)                                          \
  switch (nv) {                                                   \
    case 1: pv512(w, count, v, hd, a, R, 1, HALF); break;         \
    case 2: pv512(w, count, v, hd, a, R, 2, HALF); break;         \
    case 3: pv512(w, count, v, hd, a, R, 3, HALF); break;         \
    default: pv512(w, count, v, hd, a, R, 4, HALF); break;        \
  }                                                               \
  break;
#define PV512(HALF)                 \
  switch (nrows) {                  \
    case 1: PV512_R(1, HALF)        \
    case 2: PV512_R(2, HALF)        \
    case 3: PV512_R(3, HALF)        \
    default: PV512_R(4, HALF)       \
  }

// head_dim 8: two positions per 16-wide vector (lanes 0-7 position p, 8-15 position p + 1), each row's
// weights spread to match by a permute; the value rows are loaded once for all R rows.
INLINE_AVX512 void pv512_hd8(const float *const *w, int count, const void *v, float *const *acc, const int R, const int HALF) {
  __m512 a[QROWS], b[QROWS];
  for (int r = 0; r < R; r++) a[r] = b[r] = _mm512_setzero_ps();
  const __m512i pair[2] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0), _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2)};
  int p = 0;
  for (; p + 4 <= count; p += 4) {
    const __m512 x0 = load16(v, (size_t)p * 8, HALF), x1 = load16(v, (size_t)p * 8 + 16, HALF);
    for (int r = 0; r < R; r++) {
      const __m512 wq = _mm512_castps128_ps512(_mm_loadu_ps(w[r] + p));
      a[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair[0], wq), x0, a[r]);
      b[r] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair[1], wq), x1, b[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    const __m512 s = _mm512_add_ps(a[r], b[r]);
    __m256 out = _mm256_add_ps(_mm512_castps512_ps256(s), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    for (int q = p; q < count; q++) out = _mm256_fmadd_ps(_mm256_set1_ps(w[r][q]), HALF ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)v + (size_t)q * 8))) : _mm256_loadu_ps((const float *)v + (size_t)q * 8), out);
    _mm256_storeu_ps(acc[r], _mm256_add_ps(_mm256_loadu_ps(acc[r]), out));
  }
}

#define PV512_HD8(HALF)                                         \
  switch (nrows) {                                              \
    case 1: return pv512_hd8(w, count, vpage, acc, 1, HALF);    \
    case 2: return pv512_hd8(w, count, vpage, acc, 2, HALF);    \
    case 3: return pv512_hd8(w, count, vpage, acc, 3, HALF);    \
    default: return pv512_hd8(w, count, vpage, acc, 4, HALF);   \
  }

// exp(x) for x <= 0, as exp_avx2, 16 lanes.
INLINE_AVX512 __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

AVX512 static void softmax_avx512(float *s, int m) {
  const int full = m & ~15;
  const __mmask16 tail = (__mmask16)((1u << (m - full)) - 1);
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int i = 0; i < full; i += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + i));
  if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + full));
  const __m512 bmax = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int i = 0; i < full; i += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), bmax));
    _mm512_storeu_ps(s + i, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  if (tail) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), bmax));
    _mm512_mask_storeu_ps(s + full, tail, e);
    vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int i = 0; i < full; i += 16) _mm512_storeu_ps(s + i, _mm512_mul_ps(_mm512_loadu_ps(s + i), inv));
  if (tail) _mm512_mask_storeu_ps(s + full, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, s + full), inv));
}

AVX512 static void pv_avx512(const float *const *w, int nrows, int count, const void *vpage, int hd, float *const *acc, int half) {
  if (hd == 8) {
    if (half) PV512_HD8(1)
    PV512_HD8(0)
  }
  if (hd % 16 != 0) return pv_avx2(w, nrows, count, vpage, hd, acc, half);
  for (int d0 = 0; d0 < hd; d0 += 64) {
    const int nv = (hd - d0 < 64 ? hd - d0 : 64) / 16;
    float *a[QROWS];
    for (int r = 0; r < nrows; r++) a[r] = acc[r] + d0;
    const void *v = half ? (const void *)((const uint16_t *)vpage + d0) : (const void *)((const float *)vpage + d0);
    if (half) {
      PV512(1)
    } else {
      PV512(0)
    }
  }
}

// Scores of R query rows (head_dim 8) against NB blocks of a key page, `end` positions of which are live (the
// rest score -inf), into s[r * padded + …]; vmax[r] keeps their maximum. R * NB independent accumulators.
INLINE_AVX512 void scores8(const float *const *q, const void *kpage, int end, float *s, int padded, __m512 *vmax, const int R, const int NB, const int HALF) {
  __m512 acc[QROWS][4];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < NB; b++) acc[r][b] = _mm512_setzero_ps();
  for (int d = 0; d < 8; d++) {
    __m512 k[4];
    for (int b = 0; b < NB; b++) k[b] = load16(kpage, (size_t)b * 8 * BLK + (size_t)d * BLK, HALF);
    for (int r = 0; r < R; r++) {
      const __m512 x = _mm512_set1_ps(q[r][d]);
      for (int b = 0; b < NB; b++) acc[r][b] = _mm512_fmadd_ps(x, k[b], acc[r][b]);
    }
  }
  for (int b = 0; b < NB; b++) {
    const int valid = end - b * BLK;
    const __mmask16 live = valid >= BLK ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
    for (int r = 0; r < R; r++) {
      const __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, acc[r][b]);
      _mm512_storeu_ps(s + (size_t)r * padded + b * BLK, x);
      vmax[r] = _mm512_max_ps(vmax[r], x);
    }
  }
}

// head_dim 8, R query rows of one token: a first pass over the key pages stores the scores (one 16-wide
// multiply-add per head_dim element and block of 16 positions, keys transposed) and keeps their maximum; a second
// pass takes exp(score - max), sums it and weights the values with it at once (two positions per 16-wide vector,
// each weight spread to its position's 8 lanes by a permute). The output is divided by the sum at the end.
// Positions past `own` in the last block weigh zero, and their values (a reused page's stale bytes) are not read.
INLINE_AVX512 void attend8_rows(const float *const *q, const struct Pages *pg, int own, float *scores, float *const *out, const int R, const int HALF) {
  const size_t esize = HALF ? 2 : 4, pageElements = (size_t)PAGE * 8;
  const char *arena = pg->arena;
  const int padded = (own + BLK - 1) / BLK * BLK;
  __m512 vmax[QROWS];
  for (int r = 0; r < R; r++) vmax[r] = _mm512_set1_ps(-INFINITY);
  for (int p0 = 0; p0 < own; p0 += PAGE) {
    const char *kpage = arena + (pg->kbase + (size_t)pg->table[p0 / PAGE] * pageElements) * esize;
    if (own - p0 > PAGE) {
      const int ncount = own - p0 - PAGE < PAGE ? own - p0 - PAGE : PAGE;
      prefetch(arena + (pg->kbase + (size_t)pg->table[p0 / PAGE + 1] * pageElements) * esize, (size_t)(ncount + BLK - 1) / BLK * BLK * 8 * esize);
    }
    const int end = own - p0 < PAGE ? own - p0 : PAGE;
    prefetch(arena + (pg->vbase + (size_t)pg->table[p0 / PAGE] * pageElements) * esize, (size_t)end * 8 * esize);
    switch ((end + BLK - 1) / BLK) {
      case 1: scores8(q, kpage, end, scores + p0, padded, vmax, R, 1, HALF); break;
      case 2: scores8(q, kpage, end, scores + p0, padded, vmax, R, 2, HALF); break;
      case 3: scores8(q, kpage, end, scores + p0, padded, vmax, R, 3, HALF); break;
      default: scores8(q, kpage, end, scores + p0, padded, vmax, R, 4, HALF); break;
    }
  }
  __m512 bmax[QROWS], sum[QROWS], acc[QROWS][4];
  for (int r = 0; r < R; r++) {
    bmax[r] = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[r]));
    sum[r] = acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm512_setzero_ps();
  }
  // pair[i]: lanes 0-7 take weight 2i, lanes 8-15 weight 2i + 1.
  __m512i pair[8];
  for (int i = 0; i < 8; i++) pair[i] = _mm512_inserti64x4(_mm512_set1_epi32(2 * i), _mm256_set1_epi32(2 * i + 1), 1);
  for (int p0 = 0; p0 < own; p0 += PAGE) {
    const char *vpage = arena + (pg->vbase + (size_t)pg->table[p0 / PAGE] * pageElements) * esize;
    const int end = own - p0 < PAGE ? own - p0 : PAGE;
    for (int b0 = 0; b0 < end; b0 += BLK) {
      const int valid = end - b0;
      const __mmask16 live = valid >= BLK ? (__mmask16)0xffff : (__mmask16)((1u << valid) - 1);
      __m512 e[QROWS];
      for (int r = 0; r < R; r++) {
        e[r] = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_loadu_ps(scores + (size_t)r * padded + p0 + b0), bmax[r])));
        sum[r] = _mm512_add_ps(sum[r], e[r]);
      }
      const size_t at = (size_t)b0 * 8;
      if (valid >= BLK) {
        for (int i = 0; i < 8; i++) {
          const __m512 v = load16(vpage, at + 16 * (size_t)i, HALF);
          for (int r = 0; r < R; r++) acc[r][i & 3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair[i], e[r]), v, acc[r][i & 3]);
        }
        continue;
      }
      for (int i = 0; 2 * i < valid; i++) {
        __m512 v;
        if (2 * i + 1 < valid) {
          v = load16(vpage, at + 16 * (size_t)i, HALF);
        } else { // the last live position is 2i: its pair's upper half is not read
          v = HALF ? _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)vpage + at + 16 * (size_t)i))))
                   : _mm512_castps256_ps512(_mm256_loadu_ps((const float *)vpage + at + 16 * (size_t)i));
          v = _mm512_maskz_mov_ps(0x00ff, v);
        }
        for (int r = 0; r < R; r++) acc[r][i & 3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair[i], e[r]), v, acc[r][i & 3]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    const __m512 t = _mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]), _mm512_add_ps(acc[r][2], acc[r][3]));
    const __m256 both = _mm256_add_ps(_mm512_castps512_ps256(t), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(t), 1)));
    _mm256_storeu_ps(out[r], _mm256_mul_ps(both, _mm256_set1_ps(1.0f / _mm512_reduce_add_ps(sum[r]))));
  }
}

AVX512 static void attend8_avx512(const float *const *q, int nrows, const struct Pages *pg, int own, float *scores, float *const *out) {
  if (pg->half) {
    switch (nrows) {
      case 1: return attend8_rows(q, pg, own, scores, out, 1, 1);
      case 2: return attend8_rows(q, pg, own, scores, out, 2, 1);
      case 3: return attend8_rows(q, pg, own, scores, out, 3, 1);
      default: return attend8_rows(q, pg, own, scores, out, 4, 1);
    }
  }
  switch (nrows) {
    case 1: return attend8_rows(q, pg, own, scores, out, 1, 0);
    case 2: return attend8_rows(q, pg, own, scores, out, 2, 0);
    case 3: return attend8_rows(q, pg, own, scores, out, 3, 0);
    default: return attend8_rows(q, pg, own, scores, out, 4, 0);
  }
}

// As float_to_half: values past the float16 range saturate at ±65504 (max/min keep a NaN, their second operand).
AVX2 static void f2h_avx2(const float *src, uint16_t *dst, int n) {
  const __m256 lo = _mm256_set1_ps(-65504.0f), hi = _mm256_set1_ps(65504.0f);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(src + i)));
    _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; i++) dst[i] = float_to_half(src[i]);
}
#endif

static Kernels kernels = {qk_plain, pv_plain, softmax_plain, h2f_plain, f2h_plain, NULL};
static const char *kernel_name = "portable C";

static void choose_kernels(void) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    kernels = (Kernels){qk_avx2, pv_avx2, softmax_avx2, h2f_avx2, f2h_avx2, NULL};
    kernel_name = "AVX2";
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && !getenv("TALLY_ATTENTION_NO_AVX512")) {
      kernels.qk = qk_avx512;
      kernels.pv = pv_avx512;
      kernels.softmax = softmax_avx512;
      kernels.attend8 = attend8_avx512;
      kernel_name = "AVX-512";
    }
  }
#endif
}

// ---- one layer ----

typedef struct {
  void *arena;
  int half;
  const float *qkv;
  const float *cos, *sin;
  float *out;
  const int32_t *rows;
  const int32_t *pages;
  // Packed rows: row b's tokens start at token tokenStart[b], one after another, no padding. NULL: row b's at b * T.
  const int32_t *tokenStart;
  int B, T, nh, kvh, hd, totalPages;
} Job;

// Where token t of row b lies among the step's tokens.
static inline size_t token_index(const Job *j, int b, int t) {
  return (j->tokenStart ? (size_t)j->tokenStart[b] : (size_t)b * j->T) + t;
}

// Token (b, t)'s projections: q heads, then k heads, then v heads.
static const float *qkv_row(const Job *j, int b, int t) {
  return j->qkv + token_index(j, b, t) * (j->nh + 2 * j->kvh) * j->hd;
}

// dst = x rotated to position pos (rotate-half: pairs (i, i + hd/2)), times scale.
static void rope(const Job *j, const float *x, int pos, float scale, float *dst) {
  const int half = j->hd / 2;
  const float *c = j->cos + (size_t)pos * half, *sn = j->sin + (size_t)pos * half;
  for (int i = 0; i < half; i++) {
    const float a = x[i], b = x[i + half];
    dst[i] = (a * c[i] - b * sn[i]) * scale;
    dst[i + half] = (b * c[i] + a * sn[i]) * scale;
  }
}

static size_t head_base(const Job *j, int32_t page, int kind, int h) {
  return (((size_t)kind * j->kvh + h) * j->totalPages + page) * (size_t)PAGE * j->hd;
}

// Writes row b's new keys and values for head h into its pages.
static void store_new(const Job *j, int b, int h) {
  const int n = j->rows[3 * b], len = j->rows[3 * b + 1];
  const int32_t *table = j->pages + j->rows[3 * b + 2];
  const int hd = j->hd;
  uint16_t halfRow[1024];
  float krow[1024];
  for (int t = 0; t < n; t++) {
    const int pos = len + t;
    const int32_t page = table[pos / PAGE];
    const int off = pos % PAGE;
    const float *row = qkv_row(j, b, t);
    rope(j, row + (size_t)(j->nh + h) * hd, pos, 1.0f, krow);
    const float *vrow = row + (size_t)(j->nh + j->kvh + h) * hd;
    const size_t kAt = head_base(j, page, 0, h) + (size_t)(off / BLK) * hd * BLK + off % BLK;
    const size_t vAt = head_base(j, page, 1, h) + (size_t)off * hd;
    if (j->half) {
      uint16_t *a = j->arena;
      kernels.f2h(krow, halfRow, hd);
      for (int d = 0; d < hd; d++) a[kAt + (size_t)d * BLK] = halfRow[d];
      kernels.f2h(vrow, a + vAt, hd);
    } else {
      float *a = j->arena;
      for (int d = 0; d < hd; d++) a[kAt + (size_t)d * BLK] = krow[d];
      memcpy(a + vAt, vrow, (size_t)hd * sizeof(float));
    }
  }
}

// Row b's keys and values on KV head h, up to PREFETCH_BYTES of them: the next work item's, fetched while this one computes.
#define PREFETCH_BYTES (48 * 1024)
static void prefetch_item(const Job *j, int b, int h) {
  const int32_t *table = j->pages + j->rows[3 * b + 2];
  const int positions = j->rows[3 * b + 1] + j->rows[3 * b];
  const size_t esize = j->half ? 2 : 4;
  size_t budget = PREFETCH_BYTES;
  for (int p0 = 0; p0 < positions && budget > 0; p0 += PAGE) {
    const int count = positions - p0 < PAGE ? positions - p0 : PAGE;
    for (int kind = 0; kind < 2 && budget > 0; kind++) {
      size_t bytes = (size_t)(kind == 0 ? (count + BLK - 1) / BLK * BLK : count) * j->hd * esize;
      if (bytes > budget) bytes = budget;
      prefetch((const char *)j->arena + head_base(j, table[p0 / PAGE], kind, h) * esize, bytes);
      budget -= bytes;
    }
  }
}

// Attention of row b's new tokens t0 … t1 - 1 on KV head h (all its query heads).
static void attend_chunk(const Job *j, int b, int h, int t0, int t1, float *scratch) {
  const int len = j->rows[3 * b + 1];
  const int32_t *table = j->pages + j->rows[3 * b + 2];
  const int hd = j->hd, group = j->nh / j->kvh;
  const int positions = len + t1; // the chunk's last query sees them all
  const int padded = (positions + BLK - 1) / BLK * BLK;
  const int nrows = (t1 - t0) * group;
  const size_t esize = j->half ? 2 : 4;
  const char *arena = j->arena;
  float *scores = scratch; // [nrows][padded]
  float *queries = scratch + (size_t)nrows * padded; // [nrows][hd], rotated and scaled
  const float scale = 1.0f / sqrtf((float)hd);
  for (int r = 0; r < nrows; r++) {
    const int t = t0 + r / group, g = r % group;
    rope(j, qkv_row(j, b, t) + (size_t)(h * group + g) * hd, len + t, scale, queries + (size_t)r * hd);
  }
  const float *qrow[QROWS];
  float *srow[QROWS];
  if (hd == 8 && kernels.attend8) {
    const struct Pages pg = {arena, table, head_base(j, 0, 0, h), head_base(j, 0, 1, h), j->half};
    float *orow[QROWS];
    for (int t = t0; t < t1; t++) {
      for (int g0 = 0; g0 < group; g0 += QROWS) {
        const int rn = group - g0 < QROWS ? group - g0 : QROWS;
        for (int i = 0; i < rn; i++) {
          qrow[i] = queries + (size_t)((t - t0) * group + g0 + i) * hd;
          orow[i] = j->out + (token_index(j, b, t) * j->nh + h * group + g0 + i) * hd;
        }
        kernels.attend8(qrow, rn, &pg, len + t + 1, scores, orow);
      }
    }
    return;
  }

  for (int r0 = 0; r0 < nrows; r0 += QROWS) {
    const int rn = nrows - r0 < QROWS ? nrows - r0 : QROWS;
    for (int r = 0; r < rn; r++) qrow[r] = queries + (size_t)(r0 + r) * hd;
    for (int p0 = 0; p0 < positions; p0 += PAGE) {
      const char *kpage = arena + head_base(j, table[p0 / PAGE], 0, h) * esize;
      const int count = positions - p0 < PAGE ? positions - p0 : PAGE;
      const int blocks = (count + BLK - 1) / BLK;
      const int next = positions - p0 - PAGE; // positions on the pages after this one
      if (r0 == 0 && next > 0) {
        const int ncount = next < PAGE ? next : PAGE;
        prefetch(arena + head_base(j, table[p0 / PAGE + 1], 0, h) * esize, (size_t)(ncount + BLK - 1) / BLK * BLK * hd * esize);
      }
      if (r0 == 0) prefetch(arena + head_base(j, table[p0 / PAGE], 1, h) * esize, (size_t)count * hd * esize);
      for (int r = 0; r < rn; r++) srow[r] = scores + (size_t)(r0 + r) * padded + p0;
      kernels.qk(qrow, rn, kpage, blocks, hd, srow, j->half);
    }
  }
  for (int r = 0; r < nrows; r++) {
    const int t = t0 + r / group;
    kernels.softmax(scores + (size_t)r * padded, len + t + 1); // causal: up to its own position
  }
  for (int r = 0; r < nrows; r++) {
    const int t = t0 + r / group, g = r % group;
    memset(j->out + (token_index(j, b, t) * j->nh + h * group + g) * hd, 0, (size_t)hd * sizeof(float));
  }
  for (int p0 = 0; p0 < positions; p0 += PAGE) {
    const char *vpage = arena + head_base(j, table[p0 / PAGE], 1, h) * esize;
    const int count = positions - p0 < PAGE ? positions - p0 : PAGE;
    // A token's query heads see the same positions: they go through together, sharing each value row.
    for (int t = t0; t < t1; t++) {
      const int own = len + t + 1 - p0; // positions of this page the token may see
      if (own <= 0) continue;
      for (int g0 = 0; g0 < group; g0 += QROWS) {
        const int rn = group - g0 < QROWS ? group - g0 : QROWS;
        const float *w[QROWS];
        float *acc[QROWS];
        for (int i = 0; i < rn; i++) {
          const int r = (t - t0) * group + g0 + i;
          w[i] = scores + (size_t)r * padded + p0;
          acc[i] = j->out + (token_index(j, b, t) * j->nh + h * group + g0 + i) * hd;
        }
        kernels.pv(w, rn, own < count ? own : count, vpage, hd, acc, j->half);
      }
    }
  }
}

#define QCHUNK 8

static void run_layer(const Job *j) {
  const int items = j->B * j->kvh;
  int maxPositions = 0, chunkTotal = 0;
  for (int b = 0; b < j->B; b++) {
    const int n = j->rows[3 * b], len = j->rows[3 * b + 1];
    if (len + n > maxPositions) maxPositions = len + n;
    chunkTotal += (n + QCHUNK - 1) / QCHUNK;
  }
  // Padding tokens of a row come out as zeros.
  for (int b = 0; b < j->B && !j->tokenStart; b++) {
    const int n = j->rows[3 * b];
    if (n < j->T) memset(j->out + (size_t)(b * j->T + n) * j->nh * j->hd, 0, (size_t)(j->T - n) * j->nh * j->hd * sizeof(float));
  }
  const int group = j->nh / j->kvh;
  const size_t padded = (size_t)(maxPositions + BLK - 1) / BLK * BLK;
  const size_t scratchFloats = (size_t)QCHUNK * group * (padded + j->hd) + 64;
  // Work items: (row, head, chunk of QCHUNK new tokens); a row's writes come before any of its reads.
  int *itemRow = malloc(sizeof(int) * (size_t)chunkTotal * j->kvh);
  int *itemChunk = malloc(sizeof(int) * (size_t)chunkTotal * j->kvh);
  int count = 0;
  for (int b = 0; b < j->B; b++) {
    const int chunks = (j->rows[3 * b] + QCHUNK - 1) / QCHUNK;
    for (int c = 0; c < chunks; c++) {
      for (int h = 0; h < j->kvh; h++) {
        itemRow[count] = b * j->kvh + h;
        itemChunk[count++] = c;
      }
    }
  }
  double work = 0;
  for (int b = 0; b < j->B; b++) work += (double)j->rows[3 * b] * (j->rows[3 * b + 1] + j->rows[3 * b]);
  work *= (double)j->nh * j->hd;
  // Waking a second thread costs more than a small layer's attention.
#pragma omp parallel if (work > 2e5)
  {
#if defined(__x86_64__)
    // Weights of far-off positions underflow: denormal arithmetic costs ~100 cycles per instruction.
    const unsigned int mxcsr = _mm_getcsr();
    _mm_setcsr(mxcsr | 0x8040); // flush to zero, denormals are zero
#endif
#pragma omp for schedule(static)
    for (int i = 0; i < items; i++) store_new(j, i / j->kvh, i % j->kvh);
    float *scratch = malloc(scratchFloats * sizeof(float));
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < count; i++) {
      const int b = itemRow[i] / j->kvh, h = itemRow[i] % j->kvh;
      const int n = j->rows[3 * b];
      const int t0 = itemChunk[i] * QCHUNK;
      const int t1 = t0 + QCHUNK < n ? t0 + QCHUNK : n;
      if (i + 1 < count) prefetch_item(j, itemRow[i + 1] / j->kvh, itemRow[i + 1] % j->kvh);
      attend_chunk(j, b, h, t0, t1, scratch);
    }
    free(scratch);
#if defined(__x86_64__)
    _mm_setcsr(mxcsr);
#endif
  }
  free(itemRow);
  free(itemChunk);
}

// ---- N-API ----

static napi_value fail(napi_env env, const char *msg) {
  napi_throw_error(env, NULL, msg);
  return NULL;
}

static int typed(napi_env env, napi_value v, napi_typedarray_type want, void **data, size_t *length) {
  bool is;
  if (napi_is_typedarray(env, v, &is) != napi_ok || !is) return 0;
  napi_typedarray_type type;
  napi_value buf;
  size_t offset;
  if (napi_get_typedarray_info(env, v, &type, length, data, &buf, &offset) != napi_ok) return 0;
  return type == want;
}

static napi_value attend(napi_env env, napi_callback_info info) {
  size_t argc = 8;
  napi_value argv[8];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
  if (argc != 8) return fail(env, "attend(arena, qkv, out, rows, pages, dims, cos, sin) takes 8 arguments");
  Job j = {0};
  void *p;
  size_t arenaLen, qkvLen, outLen, rowsLen, pagesLen, dimsLen, cosLen, sinLen;
  if (typed(env, argv[0], napi_float32_array, &j.arena, &arenaLen)) j.half = 0;
  else if (typed(env, argv[0], napi_uint16_array, &j.arena, &arenaLen)) j.half = 1;
  else return fail(env, "arena must be a Float32Array or a Uint16Array (float16)");
  if (!typed(env, argv[1], napi_float32_array, &p, &qkvLen)) return fail(env, "qkv must be a Float32Array");
  j.qkv = p;
  if (!typed(env, argv[2], napi_float32_array, &p, &outLen)) return fail(env, "out must be a Float32Array");
  j.out = p;
  if (!typed(env, argv[3], napi_int32_array, &p, &rowsLen)) return fail(env, "rows must be an Int32Array");
  j.rows = p;
  if (!typed(env, argv[4], napi_int32_array, &p, &pagesLen)) return fail(env, "pages must be an Int32Array");
  j.pages = p;
  if (!typed(env, argv[5], napi_int32_array, &p, &dimsLen) || dimsLen != 5) return fail(env, "dims must be an Int32Array of 5");
  const int32_t *dims = p;
  if (!typed(env, argv[6], napi_float32_array, &p, &cosLen)) return fail(env, "cos must be a Float32Array");
  j.cos = p;
  if (!typed(env, argv[7], napi_float32_array, &p, &sinLen)) return fail(env, "sin must be a Float32Array");
  j.sin = p;
  j.T = dims[0];
  j.nh = dims[1];
  j.kvh = dims[2];
  j.hd = dims[3];
  j.totalPages = dims[4];
  j.B = (int)(rowsLen / 3);
  if (j.T <= 0 || j.nh <= 0 || j.kvh <= 0 || j.hd <= 0 || j.hd > 1024 || j.hd % 2 != 0 || j.nh % j.kvh != 0) return fail(env, "bad dims");
  const size_t tokens = (size_t)j.B * j.T;
  if (qkvLen != tokens * (j.nh + 2 * j.kvh) * j.hd) return fail(env, "qkv must hold B * T * (heads + 2 * kv_heads) * head_dim floats");
  if (outLen != tokens * j.nh * j.hd) return fail(env, "out must hold B * T * heads * head_dim floats");
  if (cosLen != sinLen || cosLen % (j.hd / 2) != 0) return fail(env, "cos and sin must be [positions, head_dim / 2] tables of one size");
  const size_t ropePositions = cosLen / (j.hd / 2);
  if (j.totalPages <= 0 || (size_t)j.totalPages * 2 * j.kvh * PAGE * j.hd != arenaLen) return fail(env, "the arena must hold pages * 2 * kv_heads * page positions * head_dim elements");
  for (int b = 0; b < j.B; b++) {
    const int n = j.rows[3 * b], len = j.rows[3 * b + 1], start = j.rows[3 * b + 2];
    if (n < 1 || n > j.T || len < 0 || start < 0) return fail(env, "bad row");
    if ((size_t)len + n > ropePositions) return fail(env, "a row's positions run past the rotary tables");
    const size_t needed = (size_t)(len + n + PAGE - 1) / PAGE;
    if ((size_t)start + needed > pagesLen) return fail(env, "a row's page list is shorter than its positions");
    for (size_t i = 0; i < needed; i++) {
      const int32_t page = j.pages[start + i];
      if (page < 0 || page >= j.totalPages) return fail(env, "a page lies outside the arena");
    }
  }
  run_layer(&j);
  return NULL;
}

static napi_value threads(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_get_cb_info(env, info, &argc, argv, NULL, NULL);
#ifdef _OPENMP
  if (argc == 1) {
    int32_t n;
    if (napi_get_value_int32(env, argv[0], &n) == napi_ok && n > 0) omp_set_num_threads(n);
  }
  napi_value result;
  napi_create_int32(env, omp_get_max_threads(), &result);
#else
  napi_value result;
  napi_create_int32(env, 1, &result);
#endif
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  choose_kernels();
  napi_value fn, name, page;
  napi_create_function(env, "attend", NAPI_AUTO_LENGTH, attend, NULL, &fn);
  napi_set_named_property(env, exports, "attend", fn);
  napi_create_function(env, "threads", NAPI_AUTO_LENGTH, threads, NULL, &fn);
  napi_set_named_property(env, exports, "threads", fn);
  napi_create_string_utf8(env, kernel_name, NAPI_AUTO_LENGTH, &name);
  napi_set_named_property(env, exports, "kernels", name);
  napi_create_int32(env, PAGE, &page);
  napi_set_named_property(env, exports, "pagePositions", page);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
