// GGUF (llama.cpp) blocks multiplied as they are stored, on the CPU: y = x @ w.T for a few
// rows of x (decode), fp32 in, fp32 accumulate, fp32 out; and the blocks dequantized to fp32 /
// bf16. One file of the extension gguf_cpu.py builds (gguf_cpu.cpp binds these; gguf_cpu.h
// declares what the files share).
//
// Every supported type is read as runs of S = 32 (16 for Q6_K) small integers q with one
// (scale, offset) per run: value = scale * q + offset, as ggml's dequantize_row_* computes it.
// A run contributes scale * dot(q, x_run) + offset * sum(x_run); the sums of x per run are
// computed once per call, so the inner loop is int8 -> fp32 conversions and FMAs. The
// vector types are GCC vector extensions: the compiler lowers them to AVX-512, AVX2 or
// SSE, whatever -march=native finds. Output rows are split across torch's threads
// (at::parallel_for).
#include "gguf_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gguf {

namespace {

typedef uint8_t v16u __attribute__((vector_size(16)));

constexpr int MAX_ROWS = 4;   // rows of x per pass over the weight

inline v16u load16(const uint8_t* p) { v16u v; std::memcpy(&v, p, 16); return v; }
inline void store16(int8_t* p, v16u v) { std::memcpy(p, &v, 16); }
// 16 int8 -> 16 fp32 (GCC scalarizes __builtin_convertvector for this one: intrinsics)
inline v16f to_float(const int8_t* q) {
#if defined(__AVX512F__)
  return (v16f)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
#elif defined(__AVX2__)
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
  v16f v; std::memcpy(&v, &lo, 32); std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  v16f v; for (int i = 0; i < 16; ++i) v[i] = q[i];
  return v;
#endif
}

// nibbles of 16 bytes: low ones -> q[0..16), high ones -> q[16..32)
inline void nibbles(const uint8_t* qs, int8_t* q) {
  v16u b = load16(qs);
  store16(q, b & 0xF);
  store16(q + 16, b >> 4);
}

// the fifth bit of Q5_0 / Q5_1: bit j of the little-endian word qh tops element j
inline void fifth_bits(const uint8_t* qh, int8_t* q) {
  uint32_t h; std::memcpy(&h, qh, 4);
  for (int j = 0; j < 32; ++j) q[j] |= ((h >> j) & 1) << 4;
}

// Q4_K / Q5_K: six-bit scale and min of sub-block j (ggml's get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) { *sc = s[j] & 63; *m = s[j + 4] & 63; }
  else { *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4); *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}

// One block -> q [elems], scale / offset [elems / run].
template <int T>
inline void unpack(const uint8_t* b, int8_t* q, float* scale, float* offset) {
  if constexpr (T == Q4_0 || T == Q4_1) {
    float d = f16(b);
    nibbles(b + (T == Q4_0 ? 2 : 4), q);
    scale[0] = d;
    offset[0] = T == Q4_0 ? -8 * d : f16(b + 2);
  } else if constexpr (T == Q5_0 || T == Q5_1) {
    int body = T == Q5_0 ? 2 : 4;
    float d = f16(b);
    nibbles(b + body + 4, q);
    fifth_bits(b + body, q);
    scale[0] = d;
    offset[0] = T == Q5_0 ? -16 * d : f16(b + 2);
  } else if constexpr (T == Q8_0) {
    std::memcpy(q, b + 2, 32);
    scale[0] = f16(b);
    offset[0] = 0;
  } else if constexpr (T == Q4_K || T == Q5_K) {
    float d = f16(b), dmin = f16(b + 2);
    const uint8_t* qs = b + (T == Q4_K ? 16 : 48);
    for (int j = 0; j < 4; ++j) {   // 4 chunks of 32 bytes: sub-block 2j low nibbles, 2j + 1 high
        v16u lo0 = load16(qs + 32 * j), lo1 = load16(qs + 32 * j + 16);
        store16(q + 64 * j, lo0 & 0xF); store16(q + 64 * j + 16, lo1 & 0xF);
        store16(q + 64 * j + 32, lo0 >> 4); store16(q + 64 * j + 48, lo1 >> 4);
    }
    if constexpr (T == Q5_K) {
      const uint8_t* qh = b + 16;
      for (int s = 0; s < 8; ++s)
        for (int l = 0; l < 32; ++l) q[32 * s + l] |= ((qh[l] >> s) & 1) << 4;
    }
    for (int s = 0; s < 8; ++s) {
      int sc, m;
      scale_min_k4(s, b + 4, &sc, &m);
      scale[s] = d * sc;
      offset[s] = -dmin * m;
    }
  } else {   // Q6_K: ql [128], qh [64], int8 scales [16], d
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    float d = f16(b + 208);
    for (int n = 0; n < 2; ++n) {
      const uint8_t *l4 = ql + 64 * n, *h2 = qh + 32 * n;
      int8_t* y = q + 128 * n;
      for (int l = 0; l < 32; ++l) {
        y[l] = (l4[l] & 0xF) | ((h2[l] & 3) << 4);
        y[l + 32] = (l4[l + 32] & 0xF) | (((h2[l] >> 2) & 3) << 4);
        y[l + 64] = (l4[l] >> 4) | (((h2[l] >> 4) & 3) << 4);
        y[l + 96] = (l4[l + 32] >> 4) | (((h2[l] >> 6) & 3) << 4);
      }
    }
    for (int s = 0; s < 16; ++s) {
      scale[s] = d * sc[s];
      offset[s] = -32 * scale[s];
    }
  }
}

// out[m, n0:n1] for M rows of x (row stride K), xsum [M, K / run]
template <int T, int M>
void rows(const uint8_t* w, int64_t blocks_per_row, const float* x, int64_t K, const float* xsum,
          float* out, int64_t N, int64_t n0, int64_t n1) {
  constexpr Format F = FORMATS[T];
  constexpr int RUNS = F.elems / F.run;
  alignas(64) int8_t q[F.elems];
  float scale[RUNS], offset[RUNS];
  const int64_t runs_per_row = K / F.run;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * blocks_per_row * F.nbytes;
    v16f acc[M];
    float off[M];
    for (int m = 0; m < M; ++m) { acc[m] = v16f{}; off[m] = 0; }
    for (int64_t blk = 0; blk < blocks_per_row; ++blk) {
      unpack<T>(row + blk * F.nbytes, q, scale, offset);
      for (int r = 0; r < RUNS; ++r) {
        const int64_t at = blk * F.elems + r * F.run, run_index = blk * RUNS + r;
        v16f q0 = to_float(q + r * F.run);
        if constexpr (F.run == 32) {
          v16f q1 = to_float(q + r * F.run + 16);
          for (int m = 0; m < M; ++m) {
            const float* xm = x + m * K + at;
            v16f t = q0 * loadf(xm) + q1 * loadf(xm + 16);
            acc[m] += scale[r] * t;
            off[m] += offset[r] * xsum[m * runs_per_row + run_index];
          }
        } else {
          for (int m = 0; m < M; ++m) {
            acc[m] += scale[r] * (q0 * loadf(x + m * K + at));
            off[m] += offset[r] * xsum[m * runs_per_row + run_index];
          }
        }
      }
    }
    for (int m = 0; m < M; ++m) out[m * N + n] = hsum(acc[m]) + off[m];
  }
}

#if defined(__AVX512F__)
// The 32-value types on AVX-512: a block -> its 32 values (scale * q + offset, one FMA per
// entry of a 16- or 32-entry table the nibbles index: vpermps / vpermt2ps) in two registers.
template <int T>
inline void block_values(const uint8_t* b, __m512& w0, __m512& w1) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const float d = f16(b);
  if constexpr (T == Q8_0) {
    const __m512 dv = _mm512_set1_ps(d);
    w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 2)))), dv);
    w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(b + 18)))), dv);
  } else {
    constexpr bool has_min = T == Q4_1 || T == Q5_1;
    constexpr bool five = T == Q5_0 || T == Q5_1;
    const uint8_t* qs = b + (has_min ? 4 : 2) + (five ? 4 : 0);
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qs));
    const __m512 dv = _mm512_set1_ps(*f16_ptr(b));
    const __m512 ov = has_min ? _mm512_set1_ps(*f16_ptr(b + 2)) : _mm512_set1_ps(five ? -16 * d : -8 * d);
    const __m512 table = _mm512_fmadd_ps(dv, iota, ov);   // vpermps reads the index's low 4 bits
    if constexpr (!five) {
      w0 = _mm512_permutexvar_ps(v, table);
      w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
    } else {
      const __m512 table_hi = _mm512_fmadd_ps(dv, _mm512_add_ps(iota, _mm512_set1_ps(16)), ov);
      uint32_t h; std::memcpy(&h, b + (has_min ? 4 : 2), 4);
      const __m512i hv = _mm512_set1_epi32(h), one = _mm512_set1_epi32(1), lane = _mm512_cvtps_epi32(iota);
      const __m512i top0 = _mm512_slli_epi32(_mm512_and_si512(_mm512_srlv_epi32(hv, lane), one), 4);
      const __m512i top1 = _mm512_slli_epi32(
          _mm512_and_si512(_mm512_srlv_epi32(hv, _mm512_add_epi32(lane, _mm512_set1_epi32(16))), one), 4);
      const __m512i i0 = _mm512_or_si512(_mm512_and_si512(v, _mm512_set1_epi32(15)), top0);
      const __m512i i1 = _mm512_or_si512(_mm512_srli_epi32(v, 4), top1);
      w0 = _mm512_permutex2var_ps(table, i0, table_hi);
      w1 = _mm512_permutex2var_ps(table, i1, table_hi);
    }
  }
}

// out[m, n0:n1] for M rows of x: two blocks per iteration, four accumulators per row of x
// (independent FMA chains)
template <int T, int M>
void rows32(const uint8_t* w, int64_t blocks_per_row, const float* x, int64_t K, float* out, int64_t N,
            int64_t n0, int64_t n1) {
  constexpr int NB = FORMATS[T].nbytes;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * blocks_per_row * NB;
    __m512 acc[M][4];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < 4; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t blk = 0;
    for (; blk + 1 < blocks_per_row; blk += 2) {
      __m512 a0, a1, b0, b1;
      block_values<T>(row + blk * NB, a0, a1);
      block_values<T>(row + (blk + 1) * NB, b0, b1);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + blk * 32;
        acc[m][0] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(xm), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(a1, _mm512_loadu_ps(xm + 16), acc[m][1]);
        acc[m][2] = _mm512_fmadd_ps(b0, _mm512_loadu_ps(xm + 32), acc[m][2]);
        acc[m][3] = _mm512_fmadd_ps(b1, _mm512_loadu_ps(xm + 48), acc[m][3]);
      }
    }
    if (blk < blocks_per_row) {
      __m512 a0, a1;
      block_values<T>(row + blk * NB, a0, a1);
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + blk * 32;
        acc[m][0] = _mm512_fmadd_ps(a0, _mm512_loadu_ps(xm), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(a1, _mm512_loadu_ps(xm + 16), acc[m][1]);
      }
    }
    for (int m = 0; m < M; ++m)
      out[m * N + n] = _mm512_reduce_add_ps(
          _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3])));
  }
}
#endif


// Sums of x per run [M, K / run] for rows<T, M> (none needed by rows32)
template <int T>
std::vector<float> run_sums(const float* x, int64_t M, int64_t K) {
  constexpr Format F = FORMATS[T];
#if defined(__AVX512F__)
  if constexpr (F.elems == 32) return {};
#endif
  const int64_t runs = K / F.run;
  std::vector<float> xsum(M * runs);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < runs; ++r) {
      float s = 0;
      for (int i = 0; i < F.run; ++i) s += x[m * K + r * F.run + i];
      xsum[m * runs + r] = s;
    }
  return xsum;
}

// out[:, n0:n1] of x [M, K] @ w.T, xsum from run_sums<T>: each output row is one thread's, so
// its value does not depend on how rows are shared out
template <int T>
void gemv_range(const uint8_t* w, int64_t N, int64_t blocks_per_row, const float* x, int64_t M, int64_t K,
                const float* xsum, float* out, int64_t n0, int64_t n1) {
  constexpr Format F = FORMATS[T];
  const int64_t runs = K / F.run;
  for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const float* xm = x + m0 * K;
    float* om = out + m0 * N;
#if defined(__AVX512F__)
    if constexpr (F.elems == 32) {
      switch (std::min<int64_t>(MAX_ROWS, M - m0)) {
        case 1: rows32<T, 1>(w, blocks_per_row, xm, K, om, N, n0, n1); break;
        case 2: rows32<T, 2>(w, blocks_per_row, xm, K, om, N, n0, n1); break;
        case 3: rows32<T, 3>(w, blocks_per_row, xm, K, om, N, n0, n1); break;
        default: rows32<T, 4>(w, blocks_per_row, xm, K, om, N, n0, n1); break;
      }
      continue;
    }
#endif
    const float* sm = xsum + m0 * runs;
    switch (std::min<int64_t>(MAX_ROWS, M - m0)) {
      case 1: rows<T, 1>(w, blocks_per_row, xm, K, sm, om, N, n0, n1); break;
      case 2: rows<T, 2>(w, blocks_per_row, xm, K, sm, om, N, n0, n1); break;
      case 3: rows<T, 3>(w, blocks_per_row, xm, K, sm, om, N, n0, n1); break;
      default: rows<T, 4>(w, blocks_per_row, xm, K, sm, om, N, n0, n1); break;
    }
  }
}

}  // namespace

#define GGUF_DISPATCH(TYPE, CALL)                                    \
  switch (TYPE) {                                                    \
    case Q4_0: { constexpr int T = Q4_0; CALL; } break;              \
    case Q4_1: { constexpr int T = Q4_1; CALL; } break;              \
    case Q5_0: { constexpr int T = Q5_0; CALL; } break;              \
    case Q5_1: { constexpr int T = Q5_1; CALL; } break;              \
    case Q8_0: { constexpr int T = Q8_0; CALL; } break;              \
    case Q4_K: { constexpr int T = Q4_K; CALL; } break;              \
    case Q5_K: { constexpr int T = Q5_K; CALL; } break;              \
    default: { constexpr int T = Q6_K; CALL; } break;                \
  }

void Weight::rows(const float* x, int64_t M, int64_t K, const float* xsum, float* out, int64_t n0, int64_t n1) const {
  GGUF_DISPATCH(type, (gemv_range<T>(data, N, blocks_per_row, x, M, K, xsum, out, n0, n1)));
}

std::vector<float> Weight::sums(const float* x, int64_t M, int64_t K) const {
  std::vector<float> out;
  if (!q8) GGUF_DISPATCH(type, (out = run_sums<T>(x, M, K)));
  return out;
}

void Weight::rows_q8(const Q8Rows& xq, int64_t M, float* out, int64_t n0, int64_t n1) const {
  q8_product(type, data, N, blocks_per_row, xq, M, out, n0, n1);
}

// x [M, K] @ w.T -> out [M, N], output rows split across torch's threads (at::parallel_for)
void gemv_parallel(const Weight& w, const float* x, int64_t M, int64_t K, float* out) {
  const std::vector<float> xsum = w.sums(x, M, K);
  Q8Rows xq;
  if (w.q8) {
    xq.resize(M, K);
    for (int64_t m = 0; m < M; ++m) xq.quantize(x, m, 0, K / 32);
  }
  // chunks of >= ~4K blocks: a thread's share outweighs waking it
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, w.blocks_per_row));
  at::parallel_for(0, w.N, grain, [&](int64_t n0, int64_t n1) {
    if (w.q8) w.rows_q8(xq, M, out, n0, n1);
    else w.rows(x, M, K, xsum.data(), out, n0, n1);
  });
}

namespace {

inline void store_values(float* y, const float* v, int n) { std::memcpy(y, v, n * sizeof(float)); }
inline void store_values(c10::BFloat16* y, const float* v, int n) {
  for (int i = 0; i < n; ++i) y[i] = c10::BFloat16(v[i]);   // round to nearest even
}

// w uint8 [N, K / elems, nbytes] -> out [N, K] (fp32 or bf16): value = scale * q + offset per run
template <int T, typename Out>
void dequantize_type(const uint8_t* w, int64_t N, int64_t blocks_per_row, Out* out) {
  constexpr Format F = FORMATS[T];
  constexpr int RUNS = F.elems / F.run;
  const int64_t K = blocks_per_row * F.elems;
  at::parallel_for(0, N, std::max<int64_t>(1, 4096 / blocks_per_row), [&](int64_t n0, int64_t n1) {
    alignas(64) int8_t q[F.elems];
    alignas(64) float values[F.elems];
    float scale[RUNS], offset[RUNS];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t blk = 0; blk < blocks_per_row; ++blk) {
        const uint8_t* b = w + (n * blocks_per_row + blk) * F.nbytes;
        Out* y = out + n * K + blk * F.elems;
#if defined(__AVX512F__)
        if constexpr (F.elems == 32) {
          __m512 w0, w1;
          block_values<T>(b, w0, w1);
#if defined(__AVX512BF16__)
          if constexpr (std::is_same_v<Out, c10::BFloat16>) {
            _mm256_storeu_si256((__m256i*)y, (__m256i)_mm512_cvtneps_pbh(w0));
            _mm256_storeu_si256((__m256i*)(y + 16), (__m256i)_mm512_cvtneps_pbh(w1));
            continue;
          }
#endif
          _mm512_store_ps(values, w0);
          _mm512_store_ps(values + 16, w1);
          store_values(y, values, 32);
          continue;
        }
#endif
        unpack<T>(b, q, scale, offset);
        for (int r = 0; r < RUNS; ++r)
          for (int i = 0; i < F.run; ++i) values[r * F.run + i] = scale[r] * q[r * F.run + i] + offset[r];
        store_values(y, values, F.elems);
      }
  });
}

}  // namespace

template <typename Out>
void dequantize_any(int64_t type, const uint8_t* w, int64_t N, int64_t blocks_per_row, Out* out) {
  GGUF_DISPATCH(type, (dequantize_type<T>(w, N, blocks_per_row, out)));
}
template void dequantize_any<float>(int64_t, const uint8_t*, int64_t, int64_t, float*);
template void dequantize_any<c10::BFloat16>(int64_t, const uint8_t*, int64_t, int64_t, c10::BFloat16*);

}  // namespace gguf
