// What gguf_cpu.cpp and gguf_cpu_q8.cpp (two files of one extension) share: the GGUF block
// formats, the fp16 -> fp32 table, x quantized to Q8 blocks, and the Q8-activation product.
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

}  // namespace gguf
