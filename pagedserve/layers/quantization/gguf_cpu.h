// What the files of the GGUF CPU extension share (gguf_cpu.py builds gguf_cpu.cpp: the torch
// functions, DecodeStack and the bindings; gguf_cpu_gemv.cpp: the GEMV and dequantize kernels;
// gguf_cpu_q8.cpp: Q8 activations; gguf_cpu_attention.cpp: the decode attention): the GGUF
// block formats, the fp16 -> fp32 table, x quantized to Q8 blocks, the products on a Weight,
// and a decode step's attention inputs.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

namespace gguf {

enum Type { Q4_0 = 0, Q4_1 = 1, Q5_0 = 2, Q5_1 = 3, Q8_0 = 4, Q4_K = 5, Q5_K = 6, Q6_K = 7 };

struct Format { int elems, nbytes, run; };
constexpr Format FORMATS[] = {{32, 18, 32}, {32, 20, 32}, {32, 22, 32}, {32, 24, 32},
                              {32, 34, 32}, {256, 144, 32}, {256, 176, 32}, {256, 210, 16}};

// fp16 -> fp32 through a table (as ggml's ggml_table_f32_f16): a scale becomes a load, and
// its broadcast a load too, leaving the vector ALUs to the products
struct HalfTable {
  float values[65536];
  HalfTable();
};
extern const HalfTable HALF;

inline const float* f16_ptr(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return HALF.values + bits;
}
inline float f16(const uint8_t* p) { return *f16_ptr(p); }

// The types whose products can take Q8 activations (gguf_cpu_q8.cpp)
inline bool q8_type(int64_t t) { return t == Q4_0 || t == Q4_1 || t == Q8_0; }

struct Q8Rows {   // M rows of K values -> q [M, K], d / s [M, K / 32], and d / s as [K / 32, M] (dt / st)
  std::vector<int8_t> q;
  std::vector<float> d, s, dt, st;
  int64_t M = 0, K = 0;
  void resize(int64_t M_, int64_t K_) {
    M = M_, K = K_;
    q.resize(M * K);
    for (auto* v : {&d, &s, &dt, &st}) v->resize(M * K / 32);
  }
  // blocks [b0, b1) of row m of x (row stride K)
  void quantize(const float* x, int64_t m, int64_t b0, int64_t b1);
};

// out[:, n0:n1] (row stride N) of the M rows of xq @ w.T, w of a q8_type: each (row, output)
// computed with the same operations whatever M and [n0, n1) are (a request's values do not
// depend on its batch)
void q8_product(int64_t type, const uint8_t* w, int64_t N, int64_t blocks_per_row, const Q8Rows& xq, int64_t M,
                float* out, int64_t n0, int64_t n1);

// The kernels' vector type: GCC vector extensions, lowered to AVX-512, AVX2 or SSE
typedef float v16f __attribute__((vector_size(64)));
inline v16f loadf(const float* p) { v16f v; std::memcpy(&v, p, 64); return v; }
inline float hsum(v16f v) { float s = 0; for (int i = 0; i < 16; ++i) s += v[i]; return s; }

// Defined in gguf_cpu_gemv.cpp
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

// x [M, K] @ w.T -> out [M, N], output rows split across torch's threads (at::parallel_for)
void gemv_parallel(const Weight& w, const float* x, int64_t M, int64_t K, float* out);

// w uint8 [N, K / elems, nbytes] -> out [N, K], Out float or c10::BFloat16: value = scale * q + offset per run
template <typename Out>
void dequantize_any(int64_t type, const uint8_t* w, int64_t N, int64_t blocks_per_row, Out* out);

// Defined in gguf_cpu_attention.cpp
// neox rotary (rotate-half) of one head: y = x * cos + rotate_half(x) * sin; one compiled copy
// (not inlined), so a k rotated for the cache and the same k rotated for a query's own use
// have the same bits
void rotate(const float* x, const float* cos, const float* sin, float* y, int64_t D);

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
              const float* kr, const float* vr, HeadScratch& w, float* y) const;
};

}  // namespace gguf
