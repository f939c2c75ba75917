// Runs the CUDA kernels of this directory on the CPU, for tests on machines without a GPU.
//
// Not part of any build: tests/test_sampling.py compiles sampling.cu with g++ and
// -DFASTRL_SIMT_EMULATION, which swaps the CUDA headers for this file. Each CUDA thread is a fiber
// (ucontext) with its own stack; blocks run one after another. A fiber runs until it reaches a
// barrier (__syncthreads) or a warp collective (shuffle, ballot), and the scheduler releases a
// barrier once every thread of the block waits at it, a collective once all 32 lanes of the warp
// do. So the kernel source runs unchanged, with CUDA's synchronisation rules enforced: a barrier
// or collective that not every thread reaches is reported as a deadlock and aborts. Shared memory
// starts as garbage (0xA5 bytes), as on the GPU. Only what sampling.cu uses is provided: full-warp
// collectives (shuffles, votes, __match_any_sync), the group reductions __reduce_*_sync with the masks
// __match_any_sync returns, shared/global atomics on 32/64-bit integers (counted), and a few intrinsics
// (among them the unfused __fadd_rn / __fsub_rn / __fmul_rn of the guidance mix).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint4 {
  unsigned x, y, z, w;
};

namespace simt {

enum State { kRunnable, kWaitBlock, kWaitWarp, kDone };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  State state = kRunnable;
  uint64_t lanes[32];  // what the warp's lanes deposited at the last collective
};

struct Machine {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned current = 0, block = 0;
  std::vector<unsigned char> shared;
  std::vector<uint64_t> deposit;  // one slot per thread
  const std::function<void()>* body = nullptr;
};

inline Machine& machine() {
  static Machine m;
  return m;
}

struct Index {
  unsigned x, y, z;
};

inline Index thread_index() { return {machine().current, 0, 0}; }
inline Index block_index() { return {machine().block, 0, 0}; }
inline void* shared_memory() { return machine().shared.data(); }

inline void wait(State s) {
  Machine& m = machine();
  Fiber& f = m.fibers[m.current];
  f.state = s;
  swapcontext(&f.ctx, &m.scheduler);
}

// Every lane of the warp deposits v; returns the 32 deposits.
inline const uint64_t* exchange(uint64_t v) {
  Machine& m = machine();
  m.deposit[m.current] = v;
  wait(kWaitWarp);
  return m.fibers[m.current].lanes;
}

inline void fiber_main() {
  Machine& m = machine();
  (*m.body)();
  m.fibers[m.current].state = kDone;
  swapcontext(&m.fibers[m.current].ctx, &m.scheduler);
}

[[noreturn]] inline void deadlock(const char* why) {
  Machine& m = machine();
  std::fprintf(stderr, "simt emulation: %s in block %u; thread states:", why, m.block);
  for (size_t t = 0; t < m.fibers.size(); ++t) std::fprintf(stderr, " %zu:%d", t, static_cast<int>(m.fibers[t].state));
  std::fprintf(stderr, "\n");
  std::abort();
}

// Runs body as `grid` blocks of `threads` threads with `shared_bytes` of dynamic shared memory.
inline void launch(unsigned grid, unsigned threads, size_t shared_bytes, const std::function<void()>& body) {
  constexpr size_t kStack = 64 * 1024;
  if (threads % 32 != 0) deadlock("block size not a multiple of 32");
  Machine& m = machine();
  m.body = &body;
  m.fibers.resize(threads);
  m.deposit.assign(threads, 0);
  m.shared.resize(shared_bytes);
  for (unsigned b = 0; b < grid; ++b) {
    m.block = b;
    std::memset(m.shared.data(), 0xA5, shared_bytes);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = m.fibers[t];
      f.stack.resize(kStack);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, fiber_main, 0);
      f.state = kRunnable;
    }
    for (;;) {
      for (unsigned t = 0; t < threads; ++t) {
        if (m.fibers[t].state == kRunnable) {
          m.current = t;
          swapcontext(&m.scheduler, &m.fibers[t].ctx);
        }
      }
      bool released = false;
      for (unsigned w = 0; w < threads / 32; ++w) {
        unsigned waiting = 0;
        for (unsigned l = 0; l < 32; ++l) waiting += m.fibers[w * 32 + l].state == kWaitWarp;
        if (waiting == 0) continue;
        if (waiting != 32) {
          bool others_blocked = true;  // lanes still runnable would have run; so this never completes
          for (unsigned l = 0; l < 32; ++l) others_blocked &= m.fibers[w * 32 + l].state != kRunnable;
          if (others_blocked) deadlock("a warp collective that not every lane of the warp reaches");
          continue;
        }
        for (unsigned l = 0; l < 32; ++l) {
          Fiber& f = m.fibers[w * 32 + l];
          std::memcpy(f.lanes, &m.deposit[w * 32], sizeof(f.lanes));
          f.state = kRunnable;
        }
        released = true;
      }
      if (released) continue;
      unsigned at_barrier = 0, done = 0;
      for (const Fiber& f : m.fibers) {
        at_barrier += f.state == kWaitBlock;
        done += f.state == kDone;
      }
      if (done == threads) break;
      if (at_barrier == threads) {
        for (Fiber& f : m.fibers) f.state = kRunnable;
        continue;
      }
      deadlock(done > 0 ? "a barrier after some threads returned" : "a barrier that not every thread reaches");
    }
  }
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "8 bytes at most");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}

template <class T>
inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

inline void require_full(unsigned mask) {
  if (mask != 0xFFFFFFFFu) deadlock("a warp collective with a partial mask (not emulated)");
}

inline float half_to_float(unsigned short h) {
  const unsigned sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  unsigned bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: a normal float
    int e = -1;
    unsigned mm = man;
    do {
      ++e;
      mm <<= 1;
    } while ((mm & 0x400u) == 0);
    bits = sign | ((112u - static_cast<unsigned>(e)) << 23) | ((mm & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// PTX ex2.approx.ftz.f32, whose exact rounding is not specified: exp2f moved by FASTRL_SIMT_EX2_ULPS
// ulp (default 0; tests set a systematic bias of a few ulp either way), subnormal results flushed to 0.
#ifndef FASTRL_SIMT_EX2_ULPS
#define FASTRL_SIMT_EX2_ULPS 0
#endif
inline float ex2_approx(float a) {
  float r = std::exp2(a);
  for (int i = 0; i < (FASTRL_SIMT_EX2_ULPS < 0 ? -FASTRL_SIMT_EX2_ULPS : FASTRL_SIMT_EX2_ULPS) && r > 0.0f; ++i) {
    r = std::nextafter(r, FASTRL_SIMT_EX2_ULPS < 0 ? 0.0f : INFINITY);
  }
  return r < 1.17549435e-38f ? 0.0f : r;
}

}  // namespace simt

#define threadIdx (::simt::thread_index())
#define blockIdx (::simt::block_index())

inline void __syncthreads() { simt::wait(simt::kWaitBlock); }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  simt::require_full(mask);
  return simt::from_bits<T>(simt::exchange(simt::to_bits(v))[src & 31]);
}

template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  simt::require_full(mask);
  const uint64_t* lanes = simt::exchange(simt::to_bits(v));
  const unsigned lane = simt::machine().current & 31u;
  return lane >= delta ? simt::from_bits<T>(lanes[lane - delta]) : v;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  simt::require_full(mask);
  const uint64_t* lanes = simt::exchange(simt::to_bits(v));
  return simt::from_bits<T>(lanes[(simt::machine().current & 31u) ^ static_cast<unsigned>(lane_mask)]);
}

inline int __any_sync(unsigned mask, int predicate) {
  simt::require_full(mask);
  const uint64_t* lanes = simt::exchange(predicate != 0);
  for (unsigned l = 0; l < 32; ++l) {
    if (lanes[l] != 0) return 1;
  }
  return 0;
}

// The lanes whose value equals this lane's (every lane of the warp must call it).
inline unsigned __match_any_sync(unsigned mask, unsigned v) {
  simt::require_full(mask);
  const uint64_t* lanes = simt::exchange(v);
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l) out |= static_cast<unsigned>(lanes[l] == v) << l;
  return out;
}

namespace simt {
// A reduction over the lanes of `mask`, a group that this lane belongs to. Emulated for warps whose
// 32 lanes all make the call, each with its own group's mask (as after __match_any_sync); a mask
// without this lane, or lanes of one group that disagree on it, abort.
template <class Op>
inline unsigned reduce_group(unsigned mask, unsigned v, Op op) {
  const uint64_t* lanes = exchange((uint64_t{mask} << 32) | v);
  const unsigned me = machine().current & 31u;
  if (!((mask >> me) & 1u)) deadlock("a warp reduction whose mask leaves out the calling lane");
  bool first = true;
  unsigned r = 0;
  for (unsigned l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    if (static_cast<unsigned>(lanes[l] >> 32) != mask) deadlock("a warp reduction whose lanes disagree on the mask");
    const unsigned x = static_cast<unsigned>(lanes[l]);
    r = first ? x : op(r, x);
    first = false;
  }
  return r;
}
}  // namespace simt

inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  return simt::reduce_group(mask, v, [](unsigned a, unsigned b) { return a + b; });
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v) {
  return simt::reduce_group(mask, v, [](unsigned a, unsigned b) { return a < b ? a : b; });
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v) {
  return simt::reduce_group(mask, v, [](unsigned a, unsigned b) { return a > b ? a : b; });
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  simt::require_full(mask);
  const uint64_t* lanes = simt::exchange(predicate != 0);
  unsigned out = 0;
  for (unsigned l = 0; l < 32; ++l) out |= static_cast<unsigned>(lanes[l] != 0) << l;
  return out;
}

template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline unsigned __float_as_uint(float x) { return simt::from_bits<unsigned>(simt::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return simt::from_bits<float>(simt::to_bits(x)); }
inline float __int_as_float(int x) { return simt::from_bits<float>(simt::to_bits(x)); }
inline long long __double_as_longlong(double x) { return simt::from_bits<long long>(simt::to_bits(x)); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t{a} * b) >> 32); }
inline unsigned long long __float2ull_rn(float x) { return static_cast<unsigned long long>(std::nearbyint(x)); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// Round-to-nearest float arithmetic that CUDA never contracts into a fused multiply-add. Out of line
// (noinline): the host compiler cannot fuse what it does not see together.
__attribute__((noinline)) inline float __fadd_rn(float a, float b) { return a + b; }
__attribute__((noinline)) inline float __fsub_rn(float a, float b) { return a - b; }
__attribute__((noinline)) inline float __fmul_rn(float a, float b) { return a * b; }

namespace simt {
// Atomic operations made since the counter was last reset (tests read it to see how many the
// kernel issues, e.g. on the shared histograms).
inline uint64_t& atomic_count() {
  static uint64_t n = 0;
  return n;
}
}  // namespace simt

// One fiber runs at a time, so plain read-modify-writes are atomic.
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  ++simt::atomic_count();
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  ++simt::atomic_count();
  const unsigned long long old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
  ++simt::atomic_count();
  const unsigned old = *p;
  *p = v < old ? v : old;
  return old;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
  ++simt::atomic_count();
  const unsigned old = *p;
  *p = v > old ? v : old;
  return old;
}
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  ++simt::atomic_count();
  const unsigned long long old = *p;
  *p = v < old ? v : old;
  return old;
}
