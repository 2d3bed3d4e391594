// The decode attention's kernels (gguf_cpu.cpp's decode_attention and DecodeStack call them):
// one query head of one sequence over its paged context, softmax(q K^T * scale) V in fp32 after
// neox rotary on q; the dots and the weighted sum in registers (AVX2, with a plain fallback).
// One file of the extension gguf_cpu.py builds (gguf_cpu.h declares what the files share).
#include "gguf_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gguf {

namespace {

// dot: 16 lanes of fma(a, b, acc), summed in lane order, then the tail (fma). With AVX2 (also
// where AVX-512 is present: dot4 below does the same operations on 4 keys at once) in two
// 8-float registers: GCC kept a 16-float vector type on the stack without AVX-512.
#if defined(__AVX2__)
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), lo);
    hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), hi);
  }
  alignas(32) float v[16];
  _mm256_store_ps(v, lo);
  _mm256_store_ps(v + 8, hi);
  float s = 0;
  for (int l = 0; l < 16; ++l) s += v[l];
  for (; i < n; ++i) s = std::fma(a[i], b[i], s);
  return s;
}
#else
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  v16f acc{};
  for (; i + 16 <= n; i += 16) acc += loadf(a + i) * loadf(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
#endif

}  // namespace

// neox rotary (rotate-half) of one head: y = x * cos + rotate_half(x) * sin; one compiled copy
// (not inlined), so a k rotated for the cache and the same k rotated for a query's own use
// have the same bits
__attribute__((noinline)) void rotate(const float* x, const float* cos, const float* sin, float* y, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    y[i] = x[i] * cos[i] - x[i + h] * sin[i];
    y[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
  }
}

namespace {

// out[r] = dot(a, rows[r], n) for 4 rows, the same operations as dot() for each: the 16
// lanes' sums taken in lane order for the 4 rows at once (4x4 transposes of the accumulators)
inline void dot4(const float* a, const float* const* rows, int64_t n, float* out) {
#if defined(__AVX2__)
  __m256 lo[4], hi[4];
  for (int r = 0; r < 4; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a0 = _mm256_loadu_ps(a + i), a1 = _mm256_loadu_ps(a + i + 8);
    for (int r = 0; r < 4; ++r) {
      lo[r] = _mm256_fmadd_ps(a0, _mm256_loadu_ps(rows[r] + i), lo[r]);
      hi[r] = _mm256_fmadd_ps(a1, _mm256_loadu_ps(rows[r] + i + 8), hi[r]);
    }
  }
  __m128 sum = _mm_setzero_ps();   // lane l of the 4 rows, added in order l = 0 .. 15
  for (const __m256* v : {lo, hi})
    for (int half = 0; half < 2; ++half) {
      __m128 r0 = half ? _mm256_extractf128_ps(v[0], 1) : _mm256_castps256_ps128(v[0]);
      __m128 r1 = half ? _mm256_extractf128_ps(v[1], 1) : _mm256_castps256_ps128(v[1]);
      __m128 r2 = half ? _mm256_extractf128_ps(v[2], 1) : _mm256_castps256_ps128(v[2]);
      __m128 r3 = half ? _mm256_extractf128_ps(v[3], 1) : _mm256_castps256_ps128(v[3]);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      sum = _mm_add_ps(_mm_add_ps(_mm_add_ps(_mm_add_ps(sum, r0), r1), r2), r3);
    }
  _mm_storeu_ps(out, sum);
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r) out[r] = std::fma(a[i], rows[r][i], out[r]);
#else
  for (int r = 0; r < 4; ++r) out[r] = dot(a, rows[r], n);
#endif
}

// y [n] = the sum over j < L of p[j] * rows[j], each value an fma per j in the order of j from
// 0, 64 values at a time in registers
inline void weighted_sum(const float* p, const float* const* rows, int64_t L, int64_t n, float* y) {
  int64_t d = 0;
#if defined(__AVX2__)
  for (; d + 64 <= n; d += 64) {
    __m256 acc[8];
    for (int k = 0; k < 8; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(rows[j] + d + 8 * k), acc[k]);
    }
    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(y + d + 8 * k, acc[k]);
  }
  for (; d + 8 <= n; d += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), _mm256_loadu_ps(rows[j] + d), acc);
    _mm256_storeu_ps(y + d, acc);
  }
#endif
  for (; d < n; ++d) {
    float acc = 0;
    for (int64_t j = 0; j < L; ++j) acc = std::fma(p[j], rows[j][d], acc);
    y[d] = acc;
  }
}

}  // namespace

// gguf_cpu.h's DecodeBatch::attend
void DecodeBatch::attend(const float* q, int64_t stride, const float* kc, const float* vc, int64_t s, int64_t h,
                         const float* kr, const float* vr, HeadScratch& w, float* y) const {
  const int64_t g = h / (Hq / Hkv), L = lens[s];
  w.qr.resize(D);
  rotate(q + s * stride + h * D, cos + pos[s] * D, sin + pos[s] * D, w.qr.data(), D);
  w.scores.resize(L);
  w.krows.resize(L);
  w.vrows.resize(L);
  for (int64_t j0 = 0; j0 < L; j0 += B) {   // cache_row(s, j), a block at a time
    const int64_t row0 = static_cast<int64_t>(tables[s * max_blocks + j0 / B]) * B;
    for (int64_t j = j0; j < std::min(L, j0 + B); ++j) {
      const int64_t r = row0 + j - j0;
      const bool own = kr != nullptr && r == slots[s];
      w.krows[j] = own ? kr : kc + r * Hkv * D + g * D;
      w.vrows[j] = own ? vr : vc + r * Hkv * D + g * D;
    }
  }
  float* sc = w.scores.data();
  int64_t j = 0;
  for (; j + 4 <= L; j += 4) dot4(w.qr.data(), w.krows.data() + j, D, sc + j);
  for (; j < L; ++j) sc[j] = dot(w.qr.data(), w.krows[j], D);
  float top = -INFINITY;
  for (j = 0; j < L; ++j) top = std::max(top, sc[j] = sc[j] * scale);
  for (j = 0; j < L; ++j) sc[j] = std::exp(sc[j] - top);   // independent calls, then their sum
  float total = 0;
  for (j = 0; j < L; ++j) total += sc[j];
  for (j = 0; j < L; ++j) sc[j] = sc[j] / total;
  weighted_sum(sc, w.vrows.data(), L, D, y);
}

}  // namespace gguf
