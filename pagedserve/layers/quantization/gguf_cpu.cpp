// GGUF (llama.cpp) blocks on the CPU, the torch side: the module's functions on tensors (shapes
// checked, then the kernels of gguf_cpu_gemv.cpp, gguf_cpu_q8.cpp and gguf_cpu_attention.cpp,
// gguf_cpu.h between them), DecodeStack, and the bindings. gguf_cpu.py compiles the four files
// on first use (torch.utils.cpp_extension, -O3 -march=native) into one extension.
//
// Prologues (one call instead of the several torch ops around a decode GEMV):
//   norm: x <- rms_norm(x + residual) * weight (x + residual returned too)
//   silu: x = [gate | up] <- silu(gate) * up
//
// decode_attention: an all-decode step's attention of one layer in one call (rotary on q and
// k, k and v stored into the paged cache, softmax(q K^T * scale) V over the sequence's
// blocks), fp32, instead of ~40 small torch ops; the GGUF packed path uses it (its rounding
// already differs from the fp32 reference), the exact fp32 path keeps torch's SDPA.
// DecodeStack: the calls of a Llama stack's decoder layers for a decode step in one (no Python between).
#include "gguf_cpu.h"
#include "gguf_cpu_phases.h"

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <cmath>
#include <cstring>
#include <vector>
#include <omp.h>
#include <chrono>

namespace {

using namespace gguf;

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

// out [M, N] = x [M, K] @ wt [K, N] in fp32, every out[m, n] summed over k in order
// (out[m, :] += x[m, k] * wt[k, :], 16 columns a vector): a row's values depend neither on M nor
// on the rows' split among threads. The LoRA deltas beside the batch-invariant GGUF products
// (layers/lora.py); torch's CPU matmul rounds a row differently at M = 1 and M > 1.
__attribute__((noinline)) void row_matmul_rows(const float* x, const float* wt, int64_t K, int64_t N, int64_t m0,
                                               int64_t m1, float* out) {
  const int64_t vec = N / 16 * 16;
  for (int64_t m = m0; m < m1; ++m) {
    float* o = out + m * N;
    std::memset(o, 0, N * sizeof(float));
    for (int64_t k = 0; k < K; ++k) {
      const float a = x[m * K + k];
      const float* w = wt + k * N;
      for (int64_t n = 0; n < vec; n += 16) {
        v16f acc = loadf(o + n);
        acc += a * loadf(w + n);
        std::memcpy(o + n, &acc, 64);
      }
      for (int64_t n = vec; n < N; ++n) o[n] += a * w[n];
    }
  }
}

torch::Tensor row_matmul(const torch::Tensor& x, const torch::Tensor& wt) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0), "row_matmul: x [M, K], wt [K, N]");
  auto xf = as_f32(x), wf = as_f32(wt);
  const int64_t M = xf.size(0), K = xf.size(1), N = wf.size(1);
  auto out = torch::empty({M, N}, xf.options());
  if (M > 0 && N > 0) {
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K * N));
    at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
      row_matmul_rows(xf.data_ptr<float>(), wf.data_ptr<float>(), K, N, m0, m1, out.data_ptr<float>());
    });
  }
  return out.to(x.scalar_type());
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
  m.def("row_matmul", &row_matmul, "x @ wt in fp32, each row's values independent of the batch", no_gil());
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
