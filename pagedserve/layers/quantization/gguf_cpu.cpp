// GGUF (llama.cpp) blocks multiplied as they are stored, on the CPU: y = x @ w.T for a few
// rows of x (decode), fp32 in, fp32 accumulate, fp32 out. gguf_cpu.py compiles this file and
// gguf_cpu_q8.cpp (Q8 activations: the integer GEMV and GEMM; gguf_cpu.h between them) on
// first use (torch.utils.cpp_extension, -O3 -march=native) and binds them.
//
// Every supported type is read as runs of S = 32 (16 for Q6_K) small integers q with one
// (scale, offset) per run: value = scale * q + offset, as ggml's dequantize_row_* computes it.
// A run contributes scale * dot(q, x_run) + offset * sum(x_run); the sums of x per run are
// computed once per call, so the inner loop is int8 -> fp32 conversions and FMAs. The
// vector types are GCC vector extensions: the compiler lowers them to AVX-512, AVX2 or
// SSE, whatever -march=native finds. Output rows are split across torch's threads
// (at::parallel_for).
//
// Prologues (one call instead of the several torch ops around a decode GEMV):
//   norm: x <- rms_norm(x + residual) * weight (x + residual returned too)
//   silu: x = [gate | up] <- silu(gate) * up
//
// decode_attention: an all-decode step's attention of one layer in one call (rotary on q and
// k, k and v stored into the paged cache, softmax(q K^T * scale) V over the sequence's
// blocks), fp32, instead of ~40 small torch ops; the GGUF packed path uses it (its rounding
// already differs from the fp32 reference), the exact fp32 path keeps torch's SDPA.
// decode_layer: the calls of one Llama decoder layer's decode step in one (no Python between).
#include "gguf_cpu.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <omp.h>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>

namespace {

using namespace gguf;

typedef float v16f __attribute__((vector_size(64)));
typedef uint8_t v16u __attribute__((vector_size(16)));

constexpr int MAX_ROWS = 4;   // rows of x per pass over the weight

inline v16u load16(const uint8_t* p) { v16u v; std::memcpy(&v, p, 16); return v; }
inline void store16(int8_t* p, v16u v) { std::memcpy(p, &v, 16); }
inline v16f loadf(const float* p) { v16f v; std::memcpy(&v, p, 64); return v; }
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
inline float hsum(v16f v) { float s = 0; for (int i = 0; i < 16; ++i) s += v[i]; return s; }

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

// One weight of any type, multiplied by a range of its rows (the decode stack's unit of work)
// (q8: its products quantize x to Q8 blocks, where the type has that path)
struct Weight {
  const uint8_t* data = nullptr;
  int64_t type = 0, N = 0, blocks_per_row = 0;
  bool q8 = false;
  void rows(const float* x, int64_t M, int64_t K, const float* xsum, float* out, int64_t n0, int64_t n1) const;
  std::vector<float> sums(const float* x, int64_t M, int64_t K) const;
  void rows_q8(const Q8Rows& xq, int64_t M, float* out, int64_t n0, int64_t n1) const;
};

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

template <typename Out>
void dequantize_any(int64_t type, const uint8_t* w, int64_t N, int64_t blocks_per_row, Out* out) {
  GGUF_DISPATCH(type, (dequantize_type<T>(w, N, blocks_per_row, out)));
}

// q8: Q8 activations where the type has them (Q4_0, Q4_1, Q8_0), else fp32 ones
Weight weight_of(const torch::Tensor& w, int64_t type, bool q8 = false) {
  TORCH_CHECK(type >= 0 && type < 8, "unknown GGUF type id ", type);
  const Format& f = FORMATS[type];
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kUInt8 && w.is_contiguous() && w.size(2) == f.nbytes,
              "w: contiguous uint8 [N, K / ", f.elems, ", ", f.nbytes, "]");
  return {w.data_ptr<uint8_t>(), type, w.size(0), w.size(1), q8 && q8_type(type)};
}

int64_t features(const Weight& w) { return w.blocks_per_row * FORMATS[w.type].elems; }

// x [M, K] fp32 contiguous, w uint8 [N, K / elems, nbytes] -> [M, N] fp32
torch::Tensor gemv_f32(const torch::Tensor& x, const torch::Tensor& w, int64_t type, bool q8) {
  const Weight wt = weight_of(w, type, q8);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(features(wt) == K, "x has ", K, " features, w ", features(wt));
  auto out = torch::empty({M, wt.N}, x.options());
  if (M > 0 && wt.N > 0) gemv_parallel(wt, x.data_ptr<float>(), M, K, out.data_ptr<float>());
  return out;
}

// w uint8 [N, K / elems, nbytes] -> [N, K], fp32 or (bf16 = true) bf16
torch::Tensor dequantize(const torch::Tensor& w, int64_t type, bool bf16) {
  const Weight wt = weight_of(w, type);
  auto out = torch::empty({wt.N, features(wt)}, bf16 ? torch::kBFloat16 : torch::kFloat32);
  if (out.numel() == 0) return out;
  if (bf16)
    dequantize_any(type, wt.data, wt.N, wt.blocks_per_row, out.data_ptr<c10::BFloat16>());
  else
    dequantize_any(type, wt.data, wt.N, wt.blocks_per_row, out.data_ptr<float>());
  return out;
}

torch::Tensor as_f32(const torch::Tensor& x) { return x.to(torch::kFloat32).contiguous(); }

// x @ w.T in x's dtype (computed in fp32)
torch::Tensor gemv(const torch::Tensor& x, const torch::Tensor& w, int64_t type, bool q8) {
  return gemv_f32(as_f32(x), w, type, q8).to(x.scalar_type());
}

// The elementwise parts, one definition each: the module calls and the decode stack compute
// the same values.
// dst [M, K] = rms_norm(src) * g (one compiled copy: the same bits from every caller)
__attribute__((noinline)) void rms_norm_rows(const float* src, const float* g, float eps, int64_t M, int64_t K, float* dst) {
  for (int64_t m = 0; m < M; ++m) {
    float ss = 0;
    for (int64_t k = 0; k < K; ++k) ss += src[m * K + k] * src[m * K + k];
    const float inv = 1.0f / std::sqrt(ss / K + eps);
    for (int64_t k = 0; k < K; ++k) dst[m * K + k] = g[k] * (src[m * K + k] * inv);
  }
}

inline float silu_mul(float gate, float up) { return gate / (1.0f + std::exp(-gate)) * up; }

// (rms_norm(x + residual) * norm_weight) @ w.T, x + residual; without a residual, x itself
std::tuple<torch::Tensor, torch::Tensor> gemv_normed(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                                     const torch::Tensor& norm_weight, double eps,
                                                     const torch::Tensor& w, int64_t type, bool q8) {
  auto hf = residual.has_value() ? (x.to(torch::kFloat32) + residual->to(torch::kFloat32)).contiguous() : as_f32(x);
  auto normed = torch::empty_like(hf);
  rms_norm_rows(hf.data_ptr<float>(), as_f32(norm_weight).data_ptr<float>(), static_cast<float>(eps), hf.size(0),
                hf.size(1), normed.data_ptr<float>());
  return {gemv_f32(normed, w, type, q8).to(x.scalar_type()), hf.to(x.scalar_type())};
}

// (rms_norm(x + residual) * weight, x + residual); without a residual (rms_norm(x) * weight, x):
// the decode stack's final norm, for the steps it does not run
std::tuple<torch::Tensor, torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                                  const torch::Tensor& weight, double eps) {
  auto hf = residual.has_value() ? (x.to(torch::kFloat32) + residual->to(torch::kFloat32)).contiguous() : as_f32(x);
  auto normed = torch::empty_like(hf);
  rms_norm_rows(hf.data_ptr<float>(), as_f32(weight).data_ptr<float>(), static_cast<float>(eps), hf.size(0),
                hf.size(1), normed.data_ptr<float>());
  return {normed.to(x.scalar_type()), hf.to(x.scalar_type())};
}

// (silu(gate) * up) @ w.T for gate_up = [gate | up]
torch::Tensor gemv_silu(const torch::Tensor& gate_up, const torch::Tensor& w, int64_t type, bool q8) {
  auto gu = as_f32(gate_up);
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  auto act = torch::empty({M, I}, gu.options());
  const float* src = gu.data_ptr<float>();
  float* dst = act.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) dst[m * I + i] = silu_mul(src[m * 2 * I + i], src[m * 2 * I + I + i]);
  return gemv_f32(act, w, type, q8).to(gate_up.scalar_type());
}

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

// one query head's scratch: its rotated q, scores, and the K / V rows of its context
struct HeadScratch {
  std::vector<float> qr, scores;
  std::vector<const float*> krows, vrows;
};

// An all-decode step's attention inputs as raw pointers (the tensors they point into are held
// by StepTensors): S sequences, caches [blocks, B, Hkv, D], tables [S, max_blocks], lens [S]
// (context after this step, this token included), slots [S] (-1: not stored), pos [S],
// cos / sin [max_pos, D]
struct DecodeBatch {
  int64_t S = 0, Hq = 0, Hkv = 0, D = 0, B = 0, max_blocks = 0;
  const int32_t* tables = nullptr;
  const int64_t *lens = nullptr, *slots = nullptr, *pos = nullptr;
  const float *cos = nullptr, *sin = nullptr;
  float scale = 1;

  int64_t cache_row(int64_t s, int64_t j) const {   // context position j of sequence s
    return static_cast<int64_t>(tables[s * max_blocks + j / B]) * B + j % B;
  }
  // kr [D] = k (row `k_row` of sequence s's kv head g) rotated to its position
  void rotate_k(const float* k_row, int64_t s, float* kr) const { rotate(k_row, cos + pos[s] * D, sin + pos[s] * D, kr, D); }
  // kr (rotated) and v_row of sequence s, kv head g into the caches at its slot
  void store(const float* kr, const float* v_row, float* kc, float* vc, int64_t s, int64_t g) const {
    if (slots[s] < 0) return;
    const int64_t at = slots[s] * Hkv * D + g * D;
    std::memcpy(kc + at, kr, D * sizeof(float));
    std::memcpy(vc + at, v_row, D * sizeof(float));
  }
  // query head h of sequence s (q rows `stride` apart) over its context -> y [D]: softmax(q K^T *
  // scale) V. kr / vr (or null): this step's k (rotated) and v of the head's kv head, read in
  // place of the cache row at its slot (the values store() writes there), so the heads of one
  // kv head need not wait for its store
  void attend(const float* q, int64_t stride, const float* kc, const float* vc, int64_t s, int64_t h,
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
};

// A step's block tables, lengths, slots and positions in the dtypes DecodeBatch reads
struct StepTensors {
  torch::Tensor tables, lens, slots, pos;
  StepTensors(const torch::Tensor& block_tables, const torch::Tensor& seq_lens, const torch::Tensor& slot_mapping,
              const torch::Tensor& positions)
      : tables(block_tables.to(torch::kInt32).contiguous()), lens(seq_lens.to(torch::kInt64).contiguous()),
        slots(slot_mapping.to(torch::kInt64).contiguous()), pos(positions.to(torch::kInt64).contiguous()) {}
  DecodeBatch batch(int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const torch::Tensor& k_cache,
                    const torch::Tensor& cos_cache, const torch::Tensor& sin_cache, double scale) const {
    TORCH_CHECK(tables.dim() == 2 && tables.size(0) >= S && lens.numel() >= S && slots.numel() >= S &&
                pos.numel() >= S, "block_tables / seq_lens / slot_mapping / positions: one entry per sequence");
    for (const torch::Tensor* t : {&k_cache, &cos_cache, &sin_cache})
      TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->is_contiguous(), "caches, cos / sin: contiguous fp32");
    TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == Hkv && k_cache.size(3) == D && Hkv > 0 && Hq % Hkv == 0 &&
                cos_cache.size(1) == D, "k_cache: [blocks, B, Hkv, D]");
    return {S, Hq, Hkv, D, k_cache.size(1), tables.size(1), tables.data_ptr<int32_t>(), lens.data_ptr<int64_t>(),
            slots.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), cos_cache.data_ptr<float>(), sin_cache.data_ptr<float>(),
            static_cast<float>(scale)};
  }
};

// q [S, Hq, D], k / v [S, Hkv, D] (rows of the qkv output, one stride; heads and D
// contiguous), caches [blocks, B, Hkv, D], block_tables [S, max_blocks] int32, seq_lens [S],
// slot_mapping [S] (-1: not stored), positions [S], cos / sin [max_pos, D] -> out [S, Hq * D]
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& block_tables,
                               const torch::Tensor& seq_lens, const torch::Tensor& slot_mapping,
                               const torch::Tensor& positions, const torch::Tensor& cos_cache,
                               const torch::Tensor& sin_cache, double scale) {
  const int64_t S = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  for (const torch::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == torch::kFloat32 && t->stride(2) == 1 && t->stride(1) == D &&
                t->size(0) == S && t->size(2) == D, "q / k / v: fp32 [S, H, D] with contiguous heads");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() && v_cache.scalar_type() == torch::kFloat32,
              "v_cache: as k_cache");
  const StepTensors step(block_tables, seq_lens, slot_mapping, positions);
  const DecodeBatch b = step.batch(S, Hq, Hkv, D, k_cache, cos_cache, sin_cache, scale);
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  std::vector<float> kr(D);
  for (int64_t s = 0; s < S; ++s)   // this step's k (rotated) and v into the cache
    for (int64_t g = 0; g < Hkv; ++g) {
      b.rotate_k(kp + s * k.stride(0) + g * D, s, kr.data());
      b.store(kr.data(), vp + s * v.stride(0) + g * D, kc, vc, s, g);
    }
  auto out = torch::empty({S, Hq * D}, q.options());
  float* o = out.data_ptr<float>();
  int64_t work = 0;
  for (int64_t s = 0; s < S; ++s) work += b.lens[s];
  // a (sequence, query head) pair per task, >= ~256K multiply-adds per thread's chunk: one
  // decode's heads at a short context (~20 us) stay on one thread rather than wait for a second one
  at::parallel_for(0, S * Hq, std::max<int64_t>(1, S * 262144 / std::max<int64_t>(1, work * D)),
                   [&](int64_t t0, int64_t t1) {
    HeadScratch w;
    for (int64_t t = t0; t < t1; ++t) b.attend(qp, q.stride(0), kc, vc, t / Hq, t % Hq, nullptr, nullptr, w, o + t * D);
  });
  return out;
}

// The phases of one decode step, worked by a team of threads that claim chunks of each phase:
// a phase ends when all its chunks are done, not when every thread has arrived, so a thread
// the OS has descheduled (a loaded machine) holds the others up only while it holds a chunk,
// where a barrier per phase would make every phase wait for it. A thread that arrives late
// finds the finished phases' chunks all claimed and catches up.
//
// Timing (DecodeStack.set_profile, off by default): per thread and kind of phase, the ticks
// spent claiming and working chunks, the ticks spent waiting for the others, the chunks.
inline uint64_t ticks() {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#else
  return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
}

class Phases {
 public:
  // times: [threads][stride][3] (busy, wait, chunks), or null
  explicit Phases(int64_t n, uint64_t* times = nullptr, int64_t stride = 1)
      : phases_(new Phase[n]), times_(times), stride_(stride) {}
  // claims and runs chunks of phase i (first() before this thread's first chunk, then work(c),
  // c < chunks) until none is left, then waits until the other threads' chunks are done
  template <typename Work, typename First>
  void run(int64_t i, int64_t kind, int64_t chunks, Work&& work, First&& first) {
    Phase& p = phases_[i];
    const uint64_t t0 = times_ ? ticks() : 0;
    int64_t claimed = 0;
    for (int64_t c; (c = p.next.fetch_add(1, std::memory_order_relaxed)) < chunks; ++claimed) {
      if (claimed == 0) first();
      work(c);
      p.done.fetch_add(1, std::memory_order_release);
    }
    const uint64_t t1 = times_ ? ticks() : 0;
    wait(p, chunks);
    if (times_) {
      uint64_t* t = times_ + (omp_get_thread_num() * stride_ + kind) * 3;
      t[0] += t1 - t0;
      t[1] += ticks() - t1;
      t[2] += claimed;
    }
  }
  template <typename Work>
  void run(int64_t i, int64_t kind, int64_t chunks, Work&& work) { run(i, kind, chunks, work, [] {}); }

 private:
  struct alignas(64) Phase { std::atomic<int64_t> next{0}, done{0}; };
  static void wait(Phase& p, int64_t chunks) {
    for (int spins = 0; p.done.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
        _mm_pause();
#endif
      }
      else std::this_thread::yield();   // the holder may be waiting for this core
    }
  }
  std::unique_ptr<Phase[]> phases_;
  uint64_t* times_;
  int64_t stride_;
};

// [begin, end) of chunk c of n over [0, N)
inline std::pair<int64_t, int64_t> chunk(int64_t N, int64_t c, int64_t n) { return {N * c / n, N * (c + 1) / n}; }

// The decoder layers of a Llama stack (no biases, no q/k norm, one rank) for all-decode steps
// of <= 16 rows: per layer the calls the modules make (gemv_normed, decode_attention, gemv,
// gemv_normed, gemv_silu), with their arithmetic, so the same values; but one call for the
// whole stack and one parallel region (Phases: 6 a layer), instead of a fork-join per product
// and a Python call per layer. A norm is no phase of its own: each thread computes it (M x H
// values, ~1-2 us) before its first chunk of the product that reads it, and the thread that
// works chunk 0 of that product writes the residual stream (two buffers, alternating: a
// thread may still read the previous one while it is written).
class DecodeStack {
 public:
  // per layer: norm1, norm2, qkv, o, gate_up, down (raw blocks), k_cache, v_cache; types:
  // per layer the GGUF type ids of qkv, o, gate_up, down; q8: Q8 activations (as the modules')
  DecodeStack(std::vector<torch::Tensor> tensors, std::vector<int64_t> types, int64_t Hq, int64_t Hkv, int64_t D,
              double eps, torch::Tensor cos_cache, torch::Tensor sin_cache, double scale, bool q8)
      : tensors_(std::move(tensors)), Hq_(Hq), Hkv_(Hkv), D_(D), eps_(static_cast<float>(eps)),
        cos_(std::move(cos_cache)), sin_(std::move(sin_cache)), scale_(scale) {
    TORCH_CHECK(tensors_.size() % 8 == 0 && types.size() * 2 == tensors_.size() && !tensors_.empty(),
                "8 tensors and 4 types per layer");
    for (size_t l = 0; l < tensors_.size() / 8; ++l) {
      const torch::Tensor* t = &tensors_[8 * l];
      Layer L{as_f32(t[0]), as_f32(t[1]), weight_of(t[2], types[4 * l], q8), weight_of(t[3], types[4 * l + 1], q8),
              weight_of(t[4], types[4 * l + 2], q8), weight_of(t[5], types[4 * l + 3], q8), t[6], t[7]};
      H_ = L.norm1.numel();
      I_ = L.gate_up.N / 2;
      TORCH_CHECK(L.qkv.N == (Hq + 2 * Hkv) * D && features(L.qkv) == H_ && L.o.N == H_ &&
                  features(L.o) == Hq * D && features(L.gate_up) == H_ && L.gate_up.N == 2 * I_ &&
                  L.down.N == H_ && features(L.down) == I_ && L.norm2.numel() == H_,
                  "layer ", l, ": weights do not chain");
      TORCH_CHECK(L.v_cache.sizes() == L.k_cache.sizes() && L.v_cache.is_contiguous() &&
                  L.v_cache.scalar_type() == torch::kFloat32, "v_cache: as k_cache");
      q8_ = q8_ || L.qkv.q8 || L.gate_up.q8;
      layers_.push_back(std::move(L));
    }
  }

  // hidden [M, H] fp32 (the embeddings), residual: None -> (the last layer's output, residual);
  // with final_norm (the model's last norm): (rms_norm(output + residual) * final_norm, output +
  // residual), as rms_norm() computes it
  std::tuple<torch::Tensor, torch::Tensor> run(const torch::Tensor& hidden, const c10::optional<torch::Tensor>& residual,
                                               const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                                               const torch::Tensor& slot_mapping, const torch::Tensor& positions,
                                               const c10::optional<torch::Tensor>& final_norm) {
    TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) == H_ && hidden.scalar_type() == torch::kFloat32,
                "hidden: fp32 [M, ", H_, "]");
    const int64_t M = hidden.size(0);
    const auto x0 = hidden.contiguous();
    const auto res_in = residual.has_value() ? as_f32(*residual) : torch::Tensor();
    TORCH_CHECK(!res_in.defined() || res_in.sizes() == x0.sizes(), "residual: as hidden");
    const auto norm_w = final_norm.has_value() ? as_f32(*final_norm) : torch::Tensor();
    TORCH_CHECK(!norm_w.defined() || norm_w.numel() == H_, "final_norm: [", H_, "]");
    auto out = torch::empty({M, H_}, x0.options());
    auto res = torch::empty({M, H_}, x0.options());   // the residual stream's last value
    if (M == 0) return {out, res};
    const StepTensors step(block_tables, seq_lens, slot_mapping, positions);
    std::vector<DecodeBatch> batches;
    for (const Layer& L : layers_) batches.push_back(step.batch(M, Hq_, Hkv_, D_, L.k_cache, cos_, sin_, scale_));
    const int threads = at::get_num_threads();
    if (profile_ && times_.size() != static_cast<size_t>(threads * KINDS * 3)) times_.assign(threads * KINDS * 3, 0);
    uint64_t* times = profile_ ? times_.data() : nullptr;
    // the residual stream alternates between two buffers; the last norm (odd) writes res
    std::vector<float> h_even(M * H_);
    Step st{M, x0.data_ptr<float>(), res_in.defined() ? res_in.data_ptr<float>() : nullptr, {h_even.data(),
            res.data_ptr<float>()}, out.data_ptr<float>(), norm_w.defined() ? norm_w.data_ptr<float>() : nullptr,
            std::vector<float>(M * (Hq_ + 2 * Hkv_) * D_), std::vector<float>(M * Hq_ * D_), std::vector<float>(M * H_),
            std::vector<float>(M * 2 * I_), std::vector<float>(M * I_), std::vector<float>(M * H_), {}, {},
            Phases(PHASES * static_cast<int64_t>(layers_.size()) + 1, times, KINDS), 4 * threads};
    st.qattn.resize(M, Hq_ * D_);
    st.qact.resize(M, I_);
    const auto wall0 = std::chrono::steady_clock::now();
    const uint64_t tick0 = ticks();
    auto team = [&] {   // entry: from the call to this thread's first phase, in the busy column
      if (times) times[(omp_get_thread_num() * KINDS + KINDS - 1) * 3] += ticks() - tick0;
      work(st, batches);
    };
    if (threads <= 1) {
      team();
    } else {
#pragma omp parallel num_threads(threads)
      team();
    }
    if (profile_) {
      runs_ += 1;
      run_ticks_ += ticks() - tick0;
      run_ns_ += std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - wall0).count();
    }
    if (!norm_w.defined()) std::memcpy(out.data_ptr<float>(), st.down.data(), M * H_ * sizeof(float));
    return {out, res};
  }

  // Debug timing of run() (off by default): on / off (clears the counters)
  void set_profile(bool on) {
    profile_ = on;
    times_.clear();
    runs_ = run_ticks_ = 0;
    run_ns_ = 0;
  }
  // since set_profile(true): ([threads, KINDS, 3] float64: per thread and kind of phase (the
  // 6 of a layer, the final norm, the entry into the team) us working, us waiting, chunks;
  // runs, wall us)
  std::tuple<torch::Tensor, int64_t, double> timings() const {
    const int64_t threads = static_cast<int64_t>(times_.size()) / (KINDS * 3);
    auto t = torch::empty({threads, KINDS, 3}, torch::kFloat64);
    const double us = run_ticks_ ? run_ns_ / 1e3 / run_ticks_ : 0;
    for (size_t i = 0; i < times_.size(); ++i)
      t.data_ptr<double>()[i] = i % 3 == 2 ? times_[i] : times_[i] * us;
    return {t, runs_, run_ns_ / 1e3};
  }

 private:
  struct Layer {
    torch::Tensor norm1, norm2;
    Weight qkv, o, gate_up, down;
    torch::Tensor k_cache, v_cache;
  };
  // one step's state, shared by the team
  struct Step {
    int64_t M;
    const float *x0, *res_in;   // the embeddings, the residual given (or null)
    float* h[2];                // the residual stream after an even / odd norm
    float* out;                 // the output (with the final norm)
    const float* final_norm;    // or null
    std::vector<float> qkv, attn, o, gate_up, act, down;
    Q8Rows qattn, qact;   // attn, act as Q8 blocks (for the products with q8 weights)
    Phases phases;
    int64_t chunks;   // per product
  };
  // one thread's own: a norm's input + residual and output, as Q8 blocks too; a head's scratch
  struct Own {
    std::vector<float> sum, normed;
    Q8Rows qnormed;
    std::vector<float> kr;
    HeadScratch head;
  };

  static constexpr int64_t PHASES = 6;   // per layer: qkv, attention, attention's Q8, o, gate_up, down
  static constexpr int64_t KINDS = PHASES + 2;   // timed: those, the final norm, the entry

  // norm n of the step (two a layer): sum = x + the residual stream after norm n - 1 (x alone
  // for the first without a residual), normed = rms_norm(sum) * g and its Q8 blocks
  void add_norm(const Step& st, int64_t n, const float* x, const float* g, Own& own) const {
    const float* prev = n > 0 ? st.h[(n - 1) % 2] : st.res_in;
    const int64_t size = st.M * H_;
    for (int64_t i = 0; i < size; ++i) own.sum[i] = prev ? x[i] + prev[i] : x[i];
    rms_norm_rows(own.sum.data(), g, eps_, st.M, H_, own.normed.data());
    if (q8_)
      for (int64_t m = 0; m < st.M; ++m) own.qnormed.quantize(own.normed.data(), m, 0, H_ / 32);
  }

  // out [M, N] = x @ w.T in st.chunks chunks of w's rows, norm n of the step before (each
  // thread its own), its sum into the residual stream by chunk 0 (sums of x per chunk: only the
  // K-quants without AVX-512 need them); a q8 weight reads xq, x quantized by an earlier phase
  template <typename Rows>
  void normed_product(Step& st, int64_t phase, int64_t kind, int64_t n, const float* x, const torch::Tensor& g,
                      Own& own, Rows&& rows) const {
    st.phases.run(phase, kind, st.chunks, [&](int64_t c) {
      if (c == 0) std::memcpy(st.h[n % 2], own.sum.data(), st.M * H_ * sizeof(float));
      rows(c);
    }, [&] { add_norm(st, n, x, g.data_ptr<float>(), own); });
  }
  void product(Step& st, int64_t phase, int64_t kind, const Weight& w, const float* x, const Q8Rows& xq, int64_t K,
               float* out) const {
    st.phases.run(phase, kind, st.chunks, [&](int64_t c) {
      auto [n0, n1] = chunk(w.N, c, st.chunks);
      if (w.q8) w.rows_q8(xq, st.M, out, n0, n1);
      else w.rows(x, st.M, K, w.sums(x, st.M, K).data(), out, n0, n1);
    });
  }

  // every thread of the team runs this (or the caller alone)
  void work(Step& st, const std::vector<DecodeBatch>& batches) const {
    const int64_t M = st.M, H = H_, I = I_, QKV = (Hq_ + 2 * Hkv_) * D_, A = Hq_ * D_, G = Hq_ / Hkv_;
    Own own{std::vector<float>(M * H), std::vector<float>(M * H), {}, std::vector<float>(D_), {}};
    if (q8_) own.qnormed.resize(M, H);
    const float* x = st.x0;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const Layer& L = layers_[l];
      const DecodeBatch& b = batches[l];
      const int64_t phase = PHASES * static_cast<int64_t>(l), n = 2 * static_cast<int64_t>(l);
      float *kc = L.k_cache.data_ptr<float>(), *vc = L.v_cache.data_ptr<float>();
      normed_product(st, phase, 0, n, x, L.norm1, own, [&](int64_t c) {
        auto [n0, n1] = chunk(L.qkv.N, c, st.chunks);
        if (L.qkv.q8) L.qkv.rows_q8(own.qnormed, M, st.qkv.data(), n0, n1);
        else L.qkv.rows(own.normed.data(), M, H, L.qkv.sums(own.normed.data(), M, H).data(), st.qkv.data(), n0, n1);
      });
      const float* q = st.qkv.data();
      const bool head_blocks = D_ % 32 == 0;   // a head's output is whole Q8 blocks
      // a query head of a sequence, with its kv head's k (rotated) and v from this step's qkv
      // in place of the cache's row at the slot; the first head of each kv head stores them
      st.phases.run(phase + 1, 1, M * Hq_, [&](int64_t t) {
        const int64_t s = t / Hq_, h = t % Hq_, g = h / G;
        const float* v = q + s * QKV + A + Hkv_ * D_ + g * D_;
        b.rotate_k(q + s * QKV + A + g * D_, s, own.kr.data());
        if (h % G == 0) b.store(own.kr.data(), v, kc, vc, s, g);
        b.attend(q, QKV, kc, vc, s, h, own.kr.data(), v, own.head, st.attn.data() + (s * Hq_ + h) * D_);
        if (L.o.q8 && head_blocks) st.qattn.quantize(st.attn.data(), s, h * D_ / 32, (h + 1) * D_ / 32);
      });
      st.phases.run(phase + 2, 2, L.o.q8 && !head_blocks ? 1 : 0, [&](int64_t) {
        for (int64_t m = 0; m < M; ++m) st.qattn.quantize(st.attn.data(), m, 0, A / 32);
      });
      product(st, phase + 3, 3, L.o, st.attn.data(), st.qattn, A, st.o.data());
      normed_product(st, phase + 4, 4, n + 1, st.o.data(), L.norm2, own, [&](int64_t c) {
        // gate and up rows of the same i, then the activation
        auto [b0, b1] = chunk(I / 32, c, st.chunks);   // in whole Q8 blocks of act
        const int64_t i0 = 32 * b0, i1 = 32 * b1;
        if (L.gate_up.q8) {
          L.gate_up.rows_q8(own.qnormed, M, st.gate_up.data(), i0, i1);
          L.gate_up.rows_q8(own.qnormed, M, st.gate_up.data(), I + i0, I + i1);
        } else {
          const std::vector<float> sums = L.gate_up.sums(own.normed.data(), M, H);
          L.gate_up.rows(own.normed.data(), M, H, sums.data(), st.gate_up.data(), i0, i1);
          L.gate_up.rows(own.normed.data(), M, H, sums.data(), st.gate_up.data(), I + i0, I + i1);
        }
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t i = i0; i < i1; ++i)
            st.act[m * I + i] = silu_mul(st.gate_up[m * 2 * I + i], st.gate_up[m * 2 * I + I + i]);
          if (L.down.q8) st.qact.quantize(st.act.data(), m, b0, b1);
        }
      });
      product(st, phase + 5, 5, L.down, st.act.data(), st.qact, I, st.down.data());
      x = st.down.data();   // the next layer's input
    }
    if (st.final_norm)   // out = rms_norm(down + residual) * final_norm, and the sum into the residual
      st.phases.run(PHASES * static_cast<int64_t>(layers_.size()), PHASES, 1, [&](int64_t) {
        const int64_t size = M * H;
        float* h = st.h[1];
        for (int64_t i = 0; i < size; ++i) h[i] = x[i] + h[i];
        rms_norm_rows(h, st.final_norm, eps_, M, H, st.out);
      });
  }

  std::vector<torch::Tensor> tensors_;
  std::vector<Layer> layers_;
  int64_t Hq_, Hkv_, D_, H_ = 0, I_ = 0;
  bool q8_ = false;   // a product of normed has Q8 activations
  float eps_;
  torch::Tensor cos_, sin_;
  double scale_;
  bool profile_ = false;
  std::vector<uint64_t> times_;
  int64_t runs_ = 0;
  uint64_t run_ticks_ = 0;
  double run_ns_ = 0;
};

}  // namespace

// The GIL is released while the kernels run (torch's own ops release it too): the server's
// event loop and detokenizer keep running beside a step on the engine thread.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("dequantize", &dequantize, "GGUF blocks -> fp32 or bf16 [N, K]", no_gil());
  m.def("gemv", &gemv, "x @ w.T on GGUF blocks (fp32 accumulate)", no_gil());
  m.def("gemv_normed", &gemv_normed, "rms_norm(x + residual) @ w.T on GGUF blocks, and x + residual", no_gil());
  m.def("rms_norm", &rms_norm, "(rms_norm(x + residual) * weight, x + residual)", no_gil());
  m.def("gemv_silu", &gemv_silu, "(silu(gate) * up) @ w.T on GGUF blocks", no_gil());
  m.def("decode_attention", &decode_attention, "rotary, KV store and paged attention of an all-decode step",
        no_gil());
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<std::vector<torch::Tensor>, std::vector<int64_t>, int64_t, int64_t, int64_t, double,
                          torch::Tensor, torch::Tensor, double, bool>())
      .def("run", &DecodeStack::run, "the stack's layers of an all-decode step -> (output, residual)", no_gil())
      .def("set_profile", &DecodeStack::set_profile, "debug: time run() per thread and phase (clears the counters)")
      .def("timings", &DecodeStack::timings, "debug: (us working / waiting, chunks per thread and phase; runs; wall us)");
}
