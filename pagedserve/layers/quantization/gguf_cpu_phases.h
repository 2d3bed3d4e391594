// DecodeStack's work sharing (gguf_cpu.cpp): the phases of a step as chunks that a team of
// threads claims, and the chunks' ranges.
#pragma once
#include <omp.h>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace gguf {

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

}  // namespace gguf
