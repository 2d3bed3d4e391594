// Q8 activations for the GGUF CPU kernels (one extension with gguf_cpu.cpp): x quantized per
// 32 values, integer dots (as llama.cpp's Q4_1 x Q8_1), for Q4_0, Q4_1 and Q8_0 weights.
// A row of x in blocks of 32: q = round_half_even(x * (127 / amax)), d = amax / 127 (fp32, not
// fp16 as ggml stores it), s = d * sum(q). A weight block (scale dw, offset mw: Q4_1; Q4_0 and
// Q8_0 as signed q with no offset) times an x block: the 8 lanes of
// isum[l] = sum of qw[j] * qx[j] over j = 4l..4l+3 (exact int32), then
//   acc[b % 2][l] = fma(dw * dx, float(isum[l]), acc[b % 2][l])     (two accumulators: even,
//   mins[b % 2] = fma(mw, s, mins[b % 2])                              odd blocks)
//   out = hsum8(acc[0] + acc[1]) + (mins[0] + mins[1]), hsum8 = ((0+4)+(2+6)) + ((1+5)+(3+7)).
// The same operations on AVX2 and in the scalar fallback (std::fma, one rounding), so one
// result bit for bit: tests/unit/test_gguf_cpu.py holds a torch reference of it.
//
// The GEMV (q8_rows) reads the weight once per 4 rows of x; the GEMM (q8_tile, more rows)
// unpacks each weight block once per 4 x 2 tile of (rows of x, weight rows) from L1. Both do
// the same operations per (row, output), in the same order: a row's result does not depend on
// how many rows share the product.
#include "gguf_cpu.h"

#include <c10/util/Half.h>
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gguf {

HalfTable::HalfTable() {
  for (int i = 0; i < 65536; ++i) values[i] = static_cast<float>(c10::Half(i, c10::Half::from_bits()));
}
const HalfTable HALF;

void Q8Rows::quantize(const float* x, int64_t m, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const float* v = x + m * K + 32 * b;
    int8_t* y = q.data() + m * K + 32 * b;
    int isum = 0;
#if defined(__AVX2__)
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
           v3 = _mm256_loadu_ps(v + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                              _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(mx, 1), _mm256_castps256_ps128(mx));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), R));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), R));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), R));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), R));
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s4 = _mm_add_epi32(_mm256_extracti128_si256(sum, 1), _mm256_castsi256_si128(sum));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    isum = _mm_cvtsi128_si32(s4);
    // int32 -> int8 in order: packs interleave 128-bit lanes, the permute undoes it
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), p);
#else
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    for (int j = 0; j < 32; ++j) {
      const float t = v[j] * id;
      y[j] = static_cast<int8_t>(std::nearbyint(t));   // the default rounding mode: half to even
      isum += y[j];
    }
#endif
    const float dx = amax / 127.0f;
    d[m * K / 32 + b] = dt[b * M + m] = dx;
    s[m * K / 32 + b] = st[b * M + m] = dx * static_cast<float>(isum);
  }
}

namespace {

#if defined(__AVX2__)
typedef __m256 Lanes;
inline Lanes lanes_zero() { return _mm256_setzero_ps(); }
// the weight block's 32 values as bytes: Q4_1 unsigned nibbles, Q4_0 nibbles - 8, Q8_0 as stored
template <int T>
inline __m256i weight_bytes(const uint8_t* b) {
  if constexpr (T == Q8_0) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
  } else {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (T == Q4_1 ? 4 : 2)));
    const __m256i v = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    return T == Q4_0 ? _mm256_sub_epi8(v, _mm256_set1_epi8(8)) : v;
  }
}
// acc = fma(d, float(isum lanes of qw . qx), acc); the products are exact (no int16 saturation:
// |qw| <= 128, |qx| <= 127)
template <int T>
inline Lanes dot_acc(__m256i qw, const int8_t* xq, float d, Lanes acc) {
  const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  __m256i pairs;
  if constexpr (T == Q4_1) pairs = _mm256_maddubs_epi16(qw, qx);
  else pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
  const __m256i isum = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
  return _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc);
}
inline float hsum8(Lanes a, Lanes b) {
  const __m256 x = _mm256_add_ps(a, b);
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}
#else
struct Lanes { float v[8]; };
inline Lanes lanes_zero() { return Lanes{}; }
struct WeightBytes { int8_t q[32]; };
template <int T>
inline WeightBytes weight_bytes(const uint8_t* b) {
  WeightBytes w;
  if constexpr (T == Q8_0) {
    std::memcpy(w.q, b + 2, 32);
  } else {
    const uint8_t* qs = b + (T == Q4_1 ? 4 : 2);
    for (int j = 0; j < 16; ++j) {
      w.q[j] = static_cast<int8_t>((qs[j] & 0xF) - (T == Q4_0 ? 8 : 0));
      w.q[j + 16] = static_cast<int8_t>((qs[j] >> 4) - (T == Q4_0 ? 8 : 0));
    }
  }
  return w;
}
template <int T>
inline Lanes dot_acc(const WeightBytes& qw, const int8_t* xq, float d, Lanes acc) {
  for (int l = 0; l < 8; ++l) {
    int32_t isum = 0;
    for (int j = 4 * l; j < 4 * l + 4; ++j) isum += qw.q[j] * xq[j];
    acc.v[l] = std::fma(d, static_cast<float>(isum), acc.v[l]);
  }
  return acc;
}
inline float hsum8(Lanes a, Lanes b) {
  float x[8];
  for (int l = 0; l < 8; ++l) x[l] = a.v[l] + b.v[l];
  const float r0 = x[0] + x[4], r1 = x[1] + x[5], r2 = x[2] + x[6], r3 = x[3] + x[7];
  return (r0 + r2) + (r1 + r3);
}
#endif

// out[m, n0:n1] for M rows of xq (row m0 + m): two blocks per iteration, even and odd blocks
// into their own accumulators
template <int T, int M>
void q8_rows(const uint8_t* w, int64_t blocks_per_row, const Q8Rows& xq, int64_t m0, float* out, int64_t N,
             int64_t n0, int64_t n1) {
  constexpr int NB = FORMATS[T].nbytes;
  const int64_t K = xq.K;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * blocks_per_row * NB;
    Lanes acc[M][2];
    float mins[M][2];
    for (int m = 0; m < M; ++m) { acc[m][0] = acc[m][1] = lanes_zero(); mins[m][0] = mins[m][1] = 0; }
    // block blk into accumulator p (a constant: the accumulators stay in registers)
    auto block = [&](int64_t blk, auto p) {
      const uint8_t* b = row + blk * NB;
      const auto qw = weight_bytes<T>(b);
      const float dw = f16(b);
      for (int m = 0; m < M; ++m) {
        const int64_t xb = (m0 + m) * (K / 32) + blk;
        acc[m][p] = dot_acc<T>(qw, xq.q.data() + (m0 + m) * K + 32 * blk, dw * xq.d[xb], acc[m][p]);
        if constexpr (T == Q4_1) mins[m][p] = std::fma(f16(b + 2), xq.s[xb], mins[m][p]);
      }
    };
    int64_t blk = 0;
    for (; blk + 1 < blocks_per_row; blk += 2) {
      block(blk, std::integral_constant<int, 0>());
      block(blk + 1, std::integral_constant<int, 1>());
    }
    if (blk < blocks_per_row) block(blk, std::integral_constant<int, 0>());
    for (int m = 0; m < M; ++m) out[m * N + n] = hsum8(acc[m][0], acc[m][1]) + (mins[m][0] + mins[m][1]);
  }
}


#if defined(__AVX2__)
constexpr int64_t GEMM_MAX_BLOCKS = 64;   // blocks a row for the GEMM (K <= 2048; longer: the GEMV)

// out[m0 + m, n + j] for a tile of MR rows of xq and NR weight rows, the GEMV's arithmetic:
// the even blocks into one set of MR x NR accumulators, then the odd ones into a second (the
// GEMV's acc[0] / acc[1]), so a tile's accumulators fit the 16 registers; each weight block
// is unpacked once for the MR rows, each x block loaded once for the NR weight rows. The
// mins (Q4_1's offsets) in their own loop afterwards, as the GEMV's chains.
template <int T, int MR, int NR>
void q8_tile(const uint8_t* w, int64_t blocks_per_row, const Q8Rows& xq, int64_t m0, int64_t n, float* out,
             int64_t N) {
  static_assert(MR == 4, "a lane of an xmm register per row of x");
  constexpr int NB = FORMATS[T].nbytes;
  const int64_t K = xq.K, KB = K / 32, M = xq.M;
  const uint8_t* rows[NR];
  for (int j = 0; j < NR; ++j) rows[j] = w + (n + j) * blocks_per_row * NB;
  const int8_t* xr = xq.q.data() + m0 * K;
  // dd[blk][j][m] = dw(j, blk) * dx(m, blk): the GEMV's per-block scale products, one 4-lane
  // multiply per weight row and block, read back by broadcast loads
  alignas(32) float dd[GEMM_MAX_BLOCKS][2][4];
  for (int64_t blk = 0; blk < blocks_per_row; ++blk) {
    const __m128 dx = _mm_loadu_ps(xq.dt.data() + blk * M + m0);
    for (int j = 0; j < NR; ++j) _mm_store_ps(dd[blk][j], _mm_mul_ps(_mm_broadcast_ss(f16_ptr(rows[j] + blk * NB)), dx));
  }
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 parts[2][MR][NR];
  for (int p = 0; p < 2; ++p) {
    __m256 acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) acc[m][j] = _mm256_setzero_ps();
    for (int64_t blk = p; blk < blocks_per_row; blk += 2) {
      __m256i qw[NR];
      for (int j = 0; j < NR; ++j) qw[j] = weight_bytes<T>(rows[j] + blk * NB);
      for (int m = 0; m < MR; ++m) {
        const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + m * K + 32 * blk));
        for (int j = 0; j < NR; ++j) {
          __m256i pairs;
          if constexpr (T == Q4_1) pairs = _mm256_maddubs_epi16(qw[j], qx);
          else pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw[j], qw[j]), _mm256_sign_epi8(qx, qw[j]));
          const __m256 isum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
          acc[m][j] = _mm256_fmadd_ps(_mm256_broadcast_ss(&dd[blk][j][m]), isum, acc[m][j]);
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int j = 0; j < NR; ++j) parts[p][m][j] = acc[m][j];
  }
  // mins[p][j] lane m: the GEMV's mins[m][p] chain of (row m, weight row j), 4 rows per lane
  alignas(16) float mins[2][NR][4] = {};
  if constexpr (T == Q4_1) {
    const float* st = xq.st.data() + m0;
    __m128 chain[2][NR];
    for (int p = 0; p < 2; ++p)
      for (int j = 0; j < NR; ++j) chain[p][j] = _mm_setzero_ps();
    auto block = [&](int64_t blk, auto p) {
      const __m128 sx = _mm_loadu_ps(st + blk * M);
      for (int j = 0; j < NR; ++j)
        chain[p][j] = _mm_fmadd_ps(_mm_broadcast_ss(f16_ptr(rows[j] + blk * NB + 2)), sx, chain[p][j]);
    };
    int64_t blk = 0;
    for (; blk + 1 < blocks_per_row; blk += 2) {
      block(blk, std::integral_constant<int, 0>());
      block(blk + 1, std::integral_constant<int, 1>());
    }
    if (blk < blocks_per_row) block(blk, std::integral_constant<int, 0>());
    for (int p = 0; p < 2; ++p)
      for (int j = 0; j < NR; ++j) _mm_store_ps(mins[p][j], chain[p][j]);
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j)
      out[(m0 + m) * N + n + j] = hsum8(parts[0][m][j], parts[1][m][j]) + (mins[0][j][m] + mins[1][j][m]);
}
#endif

// Weight rows per block of the GEMM's loop (their blocks stay in L1 while every tile of x
// passes over them), rows of x from which the GEMM runs instead of the GEMV's 4-row passes
constexpr int64_t GEMM_N_BLOCK = 16, GEMM_MIN_ROWS = 4;

template <int T>
void q8_range(const uint8_t* w, int64_t N, int64_t blocks_per_row, const Q8Rows& xq, int64_t M, float* out,
              int64_t n0, int64_t n1) {
  int64_t m_gemv = 0;   // rows from which the GEMV's passes take over
#if defined(__AVX2__)
  if (M >= GEMM_MIN_ROWS && blocks_per_row <= GEMM_MAX_BLOCKS) {
    constexpr int MR = 4, NR = 2;
    m_gemv = M - M % MR;
    for (int64_t b0 = n0; b0 < n1; b0 += GEMM_N_BLOCK) {
      const int64_t b1 = std::min(n1, b0 + GEMM_N_BLOCK);
      for (int64_t m0 = 0; m0 < m_gemv; m0 += MR) {
        int64_t n = b0;
        for (; n + NR <= b1; n += NR) q8_tile<T, MR, NR>(w, blocks_per_row, xq, m0, n, out, N);
        if (n < b1) q8_tile<T, MR, 1>(w, blocks_per_row, xq, m0, n, out, N);
      }
    }
  }
#endif
  for (int64_t m0 = m_gemv; m0 < M; m0 += 4) {
    float* om = out + m0 * N;
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: q8_rows<T, 1>(w, blocks_per_row, xq, m0, om, N, n0, n1); break;
      case 2: q8_rows<T, 2>(w, blocks_per_row, xq, m0, om, N, n0, n1); break;
      case 3: q8_rows<T, 3>(w, blocks_per_row, xq, m0, om, N, n0, n1); break;
      default: q8_rows<T, 4>(w, blocks_per_row, xq, m0, om, N, n0, n1); break;
    }
  }
}

}  // namespace

void q8_product(int64_t type, const uint8_t* w, int64_t N, int64_t blocks_per_row, const Q8Rows& xq, int64_t M,
                float* out, int64_t n0, int64_t n1) {
  switch (type) {
    case Q4_0: q8_range<Q4_0>(w, N, blocks_per_row, xq, M, out, n0, n1); break;
    case Q4_1: q8_range<Q4_1>(w, N, blocks_per_row, xq, M, out, n0, n1); break;
    case Q8_0: q8_range<Q8_0>(w, N, blocks_per_row, xq, M, out, n0, n1); break;
    default: throw std::invalid_argument("Q8 activations: not for this GGUF type");
  }
}

}  // namespace gguf
