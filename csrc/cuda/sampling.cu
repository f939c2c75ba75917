// CUDA token sampler: temperature, top-k, top-p and min-p per row, without sorting the vocabulary.
// The same op, semantics and random stream as the CPU sampler (csrc/sampling.cpp).
//
// One block of 256 threads per row, two blocks per SM (one row's barriers overlap the other's
// loads); rows are read with 16-byte vector loads, four in flight per thread, and converted to fp32.
// With fewer rows than SMs (B = 1 would leave 131 of 132 SMs idle) the first pass is split: a first
// kernel reads each row in chunks on rows x chunks blocks and writes per-warp partial results
// (maximum, normaliser, first maximum and ties, invalid entries), which the per-row kernel merges
// instead of reading the row (sample_chunks picks the split). The later passes stay per row.
// Order is decided on the logits x themselves through a monotone 32-bit key of x (ties are equal
// keys); masses are e = exp((x - m) / T) (m the row maximum, so e <= 1), rounded to 40-bit fixed
// point and summed in 64-bit integers: sums are exact, so every result is independent of the
// summation order (bit-for-bit reproducible) and the passes agree with each other. Each filter keeps
// the keys at or above a threshold:
//   1. pass over the row: m, the softmax normaliser z (online, with the hardware exp: exp_fast),
//      NaN/inf, and the greedy answer;
//   2. top-k: the k-th largest key. A lower bound comes free from the thread maxima (k threads
//      hold a value >= the k-th largest of them); a pass copies the keys above it into shared
//      memory (usually about k of them) and a radix select finds the threshold there. When more
//      than the shared buffer holds are above, the pass histograms them instead (linearly in
//      s = (x - m) / T, 64 bins per unit), and the next pass copies only the bin the threshold
//      lies in; a bin still too full is split by key bits, 10 bits a pass;
//   3. top-p: the same search with masses instead of counts: the largest key t whose mass at or
//      above reaches p * (mass of the top-k set), i.e. the tokens whose "mass above" is < p * Z.
//      With top-k done in shared memory it needs no pass at all;
//   4. min-p: keys >= key(m + T log min_p), rounded as on the CPU.
// The token is drawn by inverse CDF in index order: target = u * Z_kept with one uniform u per row
// from Philox4x32-10 keyed by (seed, row), exactly as the CPU sampler draws it; the first index
// whose running kept mass exceeds the target. When the kept set is in shared memory the draw is a
// radix select over (inverted) indices; otherwise a last pass scans the row and stops where the
// target is crossed. Passes over a 151936-token row (emulated, randn logits): top-k + top-p 2,
// plain 1.7, top-p 3.7, greedy 1.
//
// Classifier-free guidance (SampleArgs::uncond): the kernels are instantiated for Mix<D> rows, whose
// every element read (vector loads of both branches) is the fp32 mix u + (c - u) * w, so each pass
// above runs on the mix unchanged; the first pass also keeps the conditional branch's maximum and
// normaliser, for its log-prob of the drawn token.
//
// This file needs only the CUDA toolkit (no torch): sampling_ops.cpp is the torch glue. With
// FASTRL_SIMT_EMULATION defined it compiles as plain C++ against simt_emulation.cuh, which runs
// the kernel on the CPU (one fiber per thread), how the tests check it on machines without a GPU.
#include "sampling.cuh"

#ifdef FASTRL_SIMT_EMULATION
#include "simt_emulation.cuh"
#else
#include <cuda_runtime.h>
#endif

#include <cfloat>
#include <cmath>
#include <cstdint>

// Block shape and shared buffers (overridable: the emulation tests shrink them to reach every path
// with small vocabularies).
#ifndef FASTRL_SAMPLE_THREADS
#define FASTRL_SAMPLE_THREADS 256
#endif
#ifndef FASTRL_SAMPLE_CAPACITY
#define FASTRL_SAMPLE_CAPACITY 4096
#endif
#ifndef FASTRL_SAMPLE_BINS_LOG2
#define FASTRL_SAMPLE_BINS_LOG2 11
#endif
#ifndef FASTRL_SAMPLE_MIN_CHUNK
#define FASTRL_SAMPLE_MIN_CHUNK 2048
#endif

namespace fastrl {
namespace gpu {
namespace {

using u32 = uint32_t;
using u64 = unsigned long long;

constexpr int kThreads = FASTRL_SAMPLE_THREADS;
constexpr int kWarps = kThreads / 32;
constexpr int kCapacity = FASTRL_SAMPLE_CAPACITY;  // candidates held in shared memory
constexpr int kBinsLog2 = FASTRL_SAMPLE_BINS_LOG2;  // histogram of a key window (passes over the row)
constexpr int kBins = 1 << kBinsLog2;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kRadixBins = 256;  // radix select over the candidates: 8 bits a round
constexpr int kUnroll = 4;       // 16-byte loads in flight per thread in the passes over the row
constexpr int kMinChunk = FASTRL_SAMPLE_MIN_CHUNK;  // elements of a row chunk at least (split first pass)
constexpr int kMaxChunks = 128;
static_assert(kMinChunk % 8 == 0, "chunks start on 16-byte boundaries");
// The first histogram of a search is linear in s = (x - m) / T over [-32, 0] (masses down to e^-32),
// where the top-p threshold and most top-k thresholds lie; later ones split a key range.
constexpr float kBinsPerLogMass = static_cast<float>(kBins) / 32.0f;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr u32 kNoKey = 0xFFFFFFFFu;  // above every key of a non-NaN float
constexpr float kMassScale = 1099511627776.0f;  // 2^40
constexpr double kInvMassScale = 1.0 / 1099511627776.0;
static_assert(kThreads % 32 == 0 && kWarps <= 32, "whole warps, at most 32 of them");
static_assert(kBins % kThreads == 0, "every thread owns the same number of histogram bins");
static_assert(kRadixBins == 256 && kThreads >= 32, "warp 0 scans the radix bins, 8 a lane");

// ---------------------------------------------------------------------------------------------
// Numbers

// exp(x) for x <= 0 (x may be -inf), 0 below -87: the CPU sampler's exp_nonpositive (Cody-Waite
// reduction, degree-6 Taylor polynomial, relative error ~2e-7), so both draw from the same masses up
// to fused-multiply-add rounding.
__device__ __forceinline__ float exp_nonpositive(float x) {
  const float xc = fmaxf(x, -87.0f);
  const float n = rintf(xc * 1.44269504088896341f);
  const float g = fmaf(-n, 1.428606765330187e-06f, fmaf(-n, 0.693145751953125f, xc));
  float p = 1.0f / 720.0f;
  p = fmaf(p, g, 1.0f / 120.0f);
  p = fmaf(p, g, 1.0f / 24.0f);
  p = fmaf(p, g, 1.0f / 6.0f);
  p = fmaf(p, g, 0.5f);
  p = fmaf(p, g, 1.0f);
  p = fmaf(p, g, 1.0f);
  const float scale = __int_as_float((static_cast<int>(n) + 127) << 23);  // 2^n, n in [-126, 0]
  return x < -87.0f ? 0.0f : p * scale;
}

// exp(x) for x <= 0 (x may be -inf) in the first pass: the hardware's ex2.approx (one MUFU op instead
// of the ~12 of exp_nonpositive), with subnormal results flushed to 0. It feeds only the normaliser z
// of the first pass (the log-probs' softmax denominator, and the draw target of plain and top-p-only
// rows); every mass that a filter or the draw compares is still mass_of's exp_nonpositive, the CPU
// sampler's function, rounded to exact fixed point. ex2.approx is a few ulp from exp2 (its error is not
// specified to the bit, so the SIMT emulation does not pretend to reproduce it: it takes exp2f, moved
// by FASTRL_SIMT_EX2_ULPS ulp, and the tests run it at a systematic +-4 ulp): with top-k, or min-p,
// the drawn token does not depend on it at all; otherwise a row's token could change only where
// u * Z lies within that relative error (~1e-6) of a CDF boundary, as the fp32 accumulation of z
// already allows.
__device__ __forceinline__ float exp_fast(float x) {
#ifdef FASTRL_SIMT_EMULATION
  return simt::ex2_approx(x * 1.44269504088896341f);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
#endif
}

// A monotone key: x < y iff key(x) < key(y) for non-NaN floats, -0 and +0 alike.
__device__ __forceinline__ u32 key_of(float x) {
  u32 b = __float_as_uint(x);
  b = b == 0x80000000u ? 0u : b;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// The float of a key (exact: -0 comes back as +0, which has the same mass).
__device__ __forceinline__ float float_of(u32 k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Philox4x32-10 keyed by the seed, counter = row: the CPU sampler's uniform, bit for bit.
__device__ __forceinline__ double philox_uniform(uint64_t seed, uint64_t row) {
  u32 c0 = static_cast<u32>(row), c1 = static_cast<u32>(row >> 32), c2 = 0, c3 = 0;
  u32 k0 = static_cast<u32>(seed), k1 = static_cast<u32>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c1 = lo1;
    c3 = lo0;
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const u64 hi27 = c0 >> 5, lo26 = c1 >> 6;
  return static_cast<double>((hi27 << 26) | lo26) * (1.0 / 9007199254740992.0);
}

// ---------------------------------------------------------------------------------------------
// Logits: 16-byte vector loads, converted to fp32

struct F32 {
  using T = float;
  static constexpr int N = 4;
  __device__ static float load1(const T* p) { return __ldg(p); }
  __device__ static void unpack(const uint4& v, float (&x)[N]) {
    x[0] = __uint_as_float(v.x);
    x[1] = __uint_as_float(v.y);
    x[2] = __uint_as_float(v.z);
    x[3] = __uint_as_float(v.w);
  }
};

struct BF16 {
  using T = unsigned short;
  static constexpr int N = 8;
  __device__ static float load1(const T* p) { return __uint_as_float(static_cast<u32>(__ldg(p)) << 16); }
  __device__ static void unpack(const uint4& v, float (&x)[N]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = __uint_as_float(w[i] << 16);
      x[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  }
};

__device__ __forceinline__ float half_to_float(unsigned short h) {
#ifdef FASTRL_SIMT_EMULATION
  return simt::half_to_float(h);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

struct F16 {
  using T = unsigned short;
  static constexpr int N = 8;
  __device__ static float load1(const T* p) { return half_to_float(__ldg(p)); }
  __device__ static void unpack(const uint4& v, float (&x)[N]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      x[2 * i] = half_to_float(static_cast<unsigned short>(w[i] & 0xFFFFu));
      x[2 * i + 1] = half_to_float(static_cast<unsigned short>(w[i] >> 16));
    }
  }
};

// A row as an unaligned head (< N elements), 16-byte vectors, and a tail (< N elements). Only the
// pointer and length are kept (registers are scarce at two blocks of 512 threads per SM); the
// layout is recomputed where it is used.
template <class D>
struct Row {
  const typename D::T* p;
  u32 v;
  __device__ u32 head() const {
    const u32 mis = static_cast<u32>((reinterpret_cast<uintptr_t>(p) & 15u) / sizeof(typename D::T));
    return mis == 0 ? 0u : (v < D::N - mis ? v : D::N - mis);
  }
};

template <class D>
struct Layout {
  u32 head, nvec, tail0, tail_n;
  const uint4* vp;
  __device__ explicit Layout(const Row<D>& r) {
    head = r.head();
    nvec = (r.v - head) / D::N;
    tail0 = head + nvec * D::N;
    tail_n = r.v - tail0;
    vp = reinterpret_cast<const uint4*>(r.p + head);
  }
};

// The element reads of a row: one element (load1), one 16-byte vector of the layout (load_vec, a
// Vec<D>), its elements as fp32 (unpack); cond1 / unpack_cond give the conditional branch's values
// (on a plain row, the same ones).
template <class D>
struct Vec {
  uint4 c;
};

template <class D>
__device__ __forceinline__ float load1(const Row<D>& r, u32 i) {
  return D::load1(r.p + i);
}
template <class D>
__device__ __forceinline__ float cond1(const Row<D>& r, u32 i) {
  return D::load1(r.p + i);
}
template <class D>
__device__ __forceinline__ Vec<D> load_vec(const Row<D>&, const Layout<D>& l, u32 i) {
  return {__ldg(l.vp + i)};
}
template <class D>
__device__ __forceinline__ void unpack(const Row<D>&, const Vec<D>& v, float (&x)[D::N], float (&c)[D::N]) {
  D::unpack(v.c, x);
#pragma unroll
  for (int j = 0; j < D::N; ++j) c[j] = x[j];
}

// Classifier-free guidance: rows of Mix<B> read two rows of B (the conditional p, the unconditional
// q) and see their mix, u + (c - u) * w in fp32, each operation rounded (no fused multiply-add: the
// CPU sampler's arithmetic). A -inf in either branch bans the token (-inf); NaN or +inf in either
// gives NaN, which the first pass reports as a bad row.
template <class B>
struct Mix {
  using T = typename B::T;
  static constexpr int N = B::N;
};

__device__ __forceinline__ float cfg_mix(float c, float u, float w) {
  const float mixed = __fadd_rn(u, __fmul_rn(__fsub_rn(c, u), w));
  return !(c <= FLT_MAX && u <= FLT_MAX) ? NAN : (c == -INFINITY || u == -INFINITY) ? -INFINITY : mixed;
}

template <class B>
struct Row<Mix<B>> {
  const typename B::T* p;  // the conditional row (its alignment sets the layout)
  u32 v;
  const typename B::T* q;  // the unconditional row
  float w;
  bool q_vectors;  // q has p's alignment: whole vectors of q line up with p's
  __device__ u32 head() const { return Row<B>{p, v}.head(); }
};

template <class B>
struct Vec<Mix<B>> {
  uint4 c, u;
};

// N elements from p, an address that need not be 16-byte aligned, packed as one vector would hold them.
template <class B>
__device__ __forceinline__ uint4 gather_vec(const typename B::T* p) {
  u32 w[4] = {0u, 0u, 0u, 0u};
  if constexpr (sizeof(typename B::T) == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = __float_as_uint(__ldg(p + j));
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) w[j / 2] |= static_cast<u32>(__ldg(p + j)) << (16 * (j & 1));
  }
  return {w[0], w[1], w[2], w[3]};
}

template <class B>
__device__ __forceinline__ float load1(const Row<Mix<B>>& r, u32 i) {
  return cfg_mix(B::load1(r.p + i), B::load1(r.q + i), r.w);
}
template <class B>
__device__ __forceinline__ float cond1(const Row<Mix<B>>& r, u32 i) {
  return B::load1(r.p + i);
}
template <class B>
__device__ __forceinline__ Vec<Mix<B>> load_vec(const Row<Mix<B>>& r, const Layout<Mix<B>>& l, u32 i) {
  const typename B::T* q = r.q + l.head;
  return {__ldg(l.vp + i), r.q_vectors ? __ldg(reinterpret_cast<const uint4*>(q) + i) : gather_vec<B>(q + i * B::N)};
}
template <class B>
__device__ __forceinline__ void unpack(const Row<Mix<B>>& r, const Vec<Mix<B>>& v, float (&x)[B::N],
                                       float (&c)[B::N]) {
  B::unpack(v.c, c);
  B::unpack(v.u, x);
#pragma unroll
  for (int j = 0; j < B::N; ++j) x[j] = cfg_mix(c[j], x[j], r.w);
}

template <class D>
struct IsMix {
  static constexpr bool value = false;
};
template <class B>
struct IsMix<Mix<B>> {
  static constexpr bool value = true;
};

// Vectors in flight per thread in the passes over a row: a mixed row's vector is two loads, so half
// as many (the same bytes in flight, and registers for the rest of the kernel).
template <class D>
struct UnrollOf {
  static constexpr int value = kUnroll;
};
template <class B>
struct UnrollOf<Mix<B>> {
  static constexpr int value = kUnroll / 2;
};

// Row `row` of the call's logits (and, guided, of uncond), elements [c0, c0 + n).
template <class D>
__device__ __forceinline__ Row<D> row_of(const SampleArgs& a, int64_t row, int64_t c0, u32 n) {
  return {static_cast<const typename D::T*>(a.logits) + row * a.row_stride + c0, n};
}
template <class B>
__device__ __forceinline__ Row<Mix<B>> row_of_mix(const SampleArgs& a, int64_t row, int64_t c0, u32 n) {
  const typename B::T* p = static_cast<const typename B::T*>(a.logits) + row * a.row_stride + c0;
  const typename B::T* q = static_cast<const typename B::T*>(a.uncond) + row * a.uncond_stride + c0;
  return {p, n, q, a.cfg_weight, ((reinterpret_cast<uintptr_t>(p) ^ reinterpret_cast<uintptr_t>(q)) & 15u) == 0};
}
template <class D>
struct RowMaker {
  __device__ static Row<D> make(const SampleArgs& a, int64_t row, int64_t c0, u32 n) { return row_of<D>(a, row, c0, n); }
};
template <class B>
struct RowMaker<Mix<B>> {
  __device__ static Row<Mix<B>> make(const SampleArgs& a, int64_t row, int64_t c0, u32 n) {
    return row_of_mix<B>(a, row, c0, n);
  }
};

// f(x, c, index, valid) for every element of the row, in no particular order (x the element, c its
// conditional branch: x itself on a plain row). Every thread makes the same calls (invalid ones with
// valid = false), so f may use full-warp intrinsics.
template <class D, class F>
__device__ __forceinline__ void for_each_with_cond(const Row<D>& r, F&& f) {
  constexpr int N = D::N;
  const u32 t = threadIdx.x;
  const Layout<D> l(r);
  {
    const bool ok = t < l.head;
    const float x = ok ? load1(r, t) : 0.0f;
    f(x, IsMix<D>::value && ok ? cond1(r, t) : x, t, ok);
  }
  {
    const bool ok = t < l.tail_n;
    const float x = ok ? load1(r, l.tail0 + t) : 0.0f;
    f(x, IsMix<D>::value && ok ? cond1(r, l.tail0 + t) : x, l.tail0 + t, ok);
  }
  constexpr int U = UnrollOf<D>::value;
#pragma unroll 1
  for (u32 base = 0; base < l.nvec; base += U * kThreads) {  // U loads in flight per thread
    Vec<D> v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const u32 i = base + u * kThreads + t;
      v[u] = i < l.nvec ? load_vec(r, l, i) : Vec<D>{};
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const u32 i = base + u * kThreads + t;
      float x[N], c[N];
      unpack(r, v[u], x, c);
#pragma unroll
      for (int j = 0; j < N; ++j) f(x[j], c[j], l.head + i * N + j, i < l.nvec);
    }
  }
}

// f(x, index, valid) for every element of the row, in no particular order. Every thread makes the
// same calls (invalid ones with valid = false), so f may use full-warp intrinsics.
template <class D, class F>
__device__ __forceinline__ void for_each(const Row<D>& r, F&& f) {
  for_each_with_cond(r, [&](float x, float, u32 i, bool ok) { f(x, i, ok); });
}

// ---------------------------------------------------------------------------------------------
// The first pass's partial results: maximum m, normaliser z = sum exp((x - m) / T) (online), the
// first index of the maximum and its ties, and the number of invalid (NaN, +inf) entries. A thread
// adds elements; partials of disjoint parts merge (a split row's chunks, the lanes of a warp).

struct Partial {
  float m = -INFINITY, z = 0.0f;
  u32 first = 0xFFFFFFFFu, ties = 0, bad = 0;

  __device__ __forceinline__ void add(float x, u32 i, float inv_t) {
    bad += !(x <= FLT_MAX);  // NaN compares false, +inf is above FLT_MAX
    if (x > m) {
      z = m > -INFINITY ? z * exp_fast((m - x) * inv_t) + 1.0f : 1.0f;
      m = x;
      first = i;
      ties = 1;
    } else {
      if (x == m) {
        ++ties;
        first = i < first ? i : first;
      }
      if (x > -INFINITY) z += exp_fast((x - m) * inv_t);
    }
  }

  __device__ __forceinline__ void merge(float m2, float z2, u32 first2, u32 ties2, u32 bad2, float inv_t) {
    bad += bad2;
    if (m2 > m) {
      z = z2 + (m > -INFINITY ? z * exp_fast((m - m2) * inv_t) : 0.0f);
      m = m2;
      first = first2;
      ties = ties2;
    } else if (m2 == m) {
      z += z2;
      ties += ties2;
      first = first2 < first ? first2 : first;
    } else if (m2 > -INFINITY) {
      z += z2 * exp_fast((m2 - m) * inv_t);
    }
  }

  __device__ bool seen() const { return first != 0xFFFFFFFFu; }
};

// One warp's partial of a chunk, as the split first pass writes it.
struct Record {
  float m, z;
  u32 first, ties, bad;
};

// ---------------------------------------------------------------------------------------------
// Shared memory and block-wide collectives

struct Shared {
  u32 cand_key[kCapacity];  // candidates: elements of a key window, in no order (masses recomputed)
  u32 cand_idx[kCapacity];
  u64 bin_mass[kBins];  // histogram of a key window
  u32 bin_count[kBins];
  u32 bin_min[kBins];   // smallest and largest key in each bin
  u32 bin_max[kBins];
  u64 radix[kRadixBins];
  u64 warp_a[2][kWarps];  // per-warp partials of collectives, double-buffered
  u64 warp_b[2][kWarps];
  u32 n_cand;
  double z_row, z_filtered;  // thread 0's, kept here over the draw
  u32 pick, pick_key_hi;  // one thread's answer, read by all after a barrier
  u64 pick_a, pick_b, pick_c, pick_d;
  double z_cond;   // guided: the conditional branch's normaliser (greedy: its tied maxima), thread 0's
  float cond_max;  // and its maximum
};

__device__ __forceinline__ Shared& shared_memory() {
#ifdef FASTRL_SIMT_EMULATION
  return *reinterpret_cast<Shared*>(simt::shared_memory());
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return *reinterpret_cast<Shared*>(smem);
#endif
}

__device__ __forceinline__ u32 lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ u32 warp_id() { return threadIdx.x >> 5; }

struct Pair {
  u64 a, b;
};

// Block-wide collectives in a fixed order (deterministic), one barrier each: the partials go to
// one of two buffers in turn, so a buffer is rewritten only after the barrier of the collective in
// between, which every thread reaches after reading it. All threads call them alike.
struct Block {
  Shared& sm;
  int parity = 0;

  __device__ explicit Block(Shared& s) : sm(s) {}

  template <class T, class Op>
  __device__ T reduce(T v, Op op) {
    static_assert(sizeof(T) <= sizeof(u64), "8 bytes at most");
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
    const int b = parity;
    parity ^= 1;
    if (lane_id() == 0) *reinterpret_cast<T*>(&sm.warp_a[b][warp_id()]) = v;
    __syncthreads();
    T r = *reinterpret_cast<const T*>(&sm.warp_a[b][0]);
    for (int w = 1; w < kWarps; ++w) r = op(r, *reinterpret_cast<const T*>(&sm.warp_a[b][w]));
    return r;
  }

  __device__ Pair sum(Pair v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      v.a += __shfl_xor_sync(kFullMask, v.a, o);
      v.b += __shfl_xor_sync(kFullMask, v.b, o);
    }
    const int b = parity;
    parity ^= 1;
    if (lane_id() == 0) {
      sm.warp_a[b][warp_id()] = v.a;
      sm.warp_b[b][warp_id()] = v.b;
    }
    __syncthreads();
    Pair r = {0, 0};
    for (int w = 0; w < kWarps; ++w) {
      r.a += sm.warp_a[b][w];
      r.b += sm.warp_b[b][w];
    }
    return r;
  }

  // Exclusive prefix sum in thread order, and the total.
  __device__ u64 exclusive_scan(u64 v, u64& total) {
    u64 inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 a = __shfl_up_sync(kFullMask, inc, o);
      if (static_cast<int>(lane_id()) >= o) inc += a;
    }
    const int b = parity;
    parity ^= 1;
    if (lane_id() == 31) sm.warp_a[b][warp_id()] = inc;
    __syncthreads();
    u64 before = 0, all = 0;
    for (int w = 0; w < kWarps; ++w) {
      const u64 a = sm.warp_a[b][w];
      before += w < static_cast<int>(warp_id()) ? a : 0;
      all += a;
    }
    total = all;
    return before + inc - v;
  }

  // Exclusive prefix sums in thread order, and the totals.
  __device__ Pair exclusive_scan(Pair v, Pair& total) {
    Pair inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 a = __shfl_up_sync(kFullMask, inc.a, o), c = __shfl_up_sync(kFullMask, inc.b, o);
      if (static_cast<int>(lane_id()) >= o) {
        inc.a += a;
        inc.b += c;
      }
    }
    const int b = parity;
    parity ^= 1;
    if (lane_id() == 31) {
      sm.warp_a[b][warp_id()] = inc.a;
      sm.warp_b[b][warp_id()] = inc.b;
    }
    __syncthreads();
    Pair before = {0, 0}, all = {0, 0};
    for (int w = 0; w < kWarps; ++w) {
      const u64 a = sm.warp_a[b][w], c = sm.warp_b[b][w];
      if (w < static_cast<int>(warp_id())) {
        before.a += a;
        before.b += c;
      }
      all.a += a;
      all.b += c;
    }
    total = all;
    return {before.a + inc.a - v.a, before.b + inc.b - v.b};
  }
};

__device__ __forceinline__ u64 mass_of(float x, float m, float inv_t) {
  return static_cast<u64>(__float2ull_rn(exp_nonpositive((x - m) * inv_t) * kMassScale));
}

__device__ __forceinline__ u64 candidate_mass(const Shared& sm, int i, float m, float inv_t) {
  return mass_of(float_of(sm.cand_key[i]), m, inv_t);
}

// ---------------------------------------------------------------------------------------------
// Threshold searches

struct Pick {
  bool found;
  u32 key;
  u64 w_ge;  // weight of the items with key >= key
};

// The largest key t such that the items in the set with key >= t weigh >= need (need >= 1), by
// 8-bit radix rounds over a shared histogram. item(i, key, w) -> whether item i is in the set; its
// key and weight. Items are i in [0, n), each read by thread i % kThreads.
template <class Item>
__device__ Pick radix_select(Shared& sm, int n, Item&& item, u64 need) {
  const u32 t = threadIdx.x;
  u32 prefix = 0;
  u64 above = 0, bin = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (u32 b = t; b < kRadixBins; b += kThreads) sm.radix[b] = 0;
    __syncthreads();
    for (int i = static_cast<int>(t); i < n; i += kThreads) {
      u32 key;
      u64 w;
      if (item(i, key, w) && w != 0 && (shift == 24 || (key >> (shift + 8)) == prefix)) {
        atomicAdd(&sm.radix[(key >> shift) & 255u], w);
      }
    }
    __syncthreads();
    if (warp_id() == 0) {  // lane l holds bins 255 - 8l down to 248 - 8l; lane 0 the top ones
      const u32 lane = lane_id();
      const u64* h = sm.radix + 255 - 8 * lane;  // h[-j]: this lane's j-th bin from the top
      u64 s = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) s += h[-j];
      u64 inc = s;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const u64 v = __shfl_up_sync(kFullMask, inc, o);
        if (static_cast<int>(lane) >= o) inc += v;
      }
      const u64 rem = need - above;
      const unsigned hit = __ballot_sync(kFullMask, inc >= rem);
      if (lane == 0) sm.pick_d = hit != 0;
      if (hit != 0 && lane == static_cast<u32>(__ffs(static_cast<int>(hit)) - 1)) {
        u64 c = inc - s;
        int j = 0;
        for (; j < 7; ++j) {
          if (c + h[-j] >= rem) break;
          c += h[-j];
        }
        sm.pick = 255 - 8 * lane - j;
        sm.pick_a = c;
        sm.pick_b = h[-j];
      }
    }
    __syncthreads();
    if (sm.pick_d == 0) return {false, 0, 0};
    prefix = (prefix << 8) | sm.pick;
    above += sm.pick_a;
    bin = sm.pick_b;
  }
  return {true, prefix, above + bin};
}

// Count and mass of the candidates with key >= lo.
__device__ Pair candidates_at_or_above(Block& blk, int n, u32 lo, float m, float inv_t) {
  Pair own = {0, 0};
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    if (blk.sm.cand_key[i] >= lo) {
      own.a += 1;
      own.b += candidate_mass(blk.sm, i, m, inv_t);
    }
  }
  return blk.sum(own);
}

// One pass over the row for the elements with lo <= key < hi: copies them into the candidates
// (when want_cand; n_cand counts them even past the capacity) and histograms them (when want_bins):
// with shift >= 0 by (key >> shift) - (lo >> shift), with shift < 0 linearly in s = (x - m) / T
// (the top bin holds s in [-1 / kBinsPerLogMass, 0], the lowest everything below -32). Both are
// monotone in x, so a bin is a key range: the bin's smallest and largest keys are recorded too.
// Returns the count and mass of the window.
template <class D>
__device__ Pair window_pass(Block& blk, const Row<D>& row, u32 lo, u32 hi, int shift, bool want_cand, bool want_bins,
                            float m, float inv_t) {
  Shared& sm = blk.sm;
  const u32 t = threadIdx.x;
  if (want_bins) {
    for (u32 b = t; b < kBins; b += kThreads) {
      sm.bin_count[b] = 0;
      sm.bin_mass[b] = 0;
      sm.bin_min[b] = 0xFFFFFFFFu;
      sm.bin_max[b] = 0;
    }
  }
  if (t == 0) sm.n_cand = 0;
  __syncthreads();
  const u32 bin0 = shift >= 0 ? lo >> shift : 0u;
  const u32 lanes_below = (1u << lane_id()) - 1u;
  Pair own = {0, 0};
  // Histogram updates, aggregated per warp: the lanes whose elements fall in the same bin (found with
  // __match_any_sync) sum their counts and masses and take the min / max of their keys with warp
  // reductions, and one of them makes the four shared-memory atomics for all. On a mostly -inf row
  // (whose -inf entries all land in bin 0 of a first histogram) this turns 32 lanes' atomics on one
  // address into one lane's; when no two lanes share a bin, the lanes update alone as before.
  // Masses (< 2^41) are summed as two 20-bit halves, each sum within 32 bits.
  auto bin_add = [&](u32 b, bool in, u32 k, u64 w) {
    const unsigned peers = __match_any_sync(kFullMask, b);
    if (__any_sync(kFullMask, in && peers != (1u << lane_id()))) {
      const u32 n = static_cast<u32>(__popc(peers));
      const u32 w_lo = __reduce_add_sync(peers, static_cast<u32>(w & 0xFFFFFu));
      const u32 w_hi = __reduce_add_sync(peers, static_cast<u32>(w >> 20));
      const u32 k_min = __reduce_min_sync(peers, k), k_max = __reduce_max_sync(peers, k);
      if (in && lane_id() == static_cast<u32>(__ffs(static_cast<int>(peers)) - 1)) {
        atomicAdd(&sm.bin_count[b], n);
        atomicAdd(&sm.bin_mass[b], (static_cast<u64>(w_hi) << 20) + w_lo);
        atomicMin(&sm.bin_min[b], k_min);
        atomicMax(&sm.bin_max[b], k_max);
      }
    } else if (in) {
      atomicAdd(&sm.bin_count[b], 1u);
      atomicAdd(&sm.bin_mass[b], w);
      atomicMin(&sm.bin_min[b], k);
      atomicMax(&sm.bin_max[b], k);
    }
  };
  for_each(row, [&](float x, u32 i, bool ok) {
    const u32 k = key_of(x);
    const bool in = ok && k >= lo && k < hi;
    const unsigned ballot = __ballot_sync(kFullMask, in);
    if (ballot == 0) return;
    u32 base = 0;
    if (want_cand) {
      if (lane_id() == 0) base = atomicAdd(&sm.n_cand, static_cast<u32>(__popc(ballot)));
      base = __shfl_sync(kFullMask, base, 0);
    }
    const float s = (x - m) * inv_t;
    const u64 w = in ? static_cast<u64>(__float2ull_rn(exp_nonpositive(s) * kMassScale)) : 0ull;
    if (want_bins) {
      const u32 b = !in         ? static_cast<u32>(kBins)  // outside the window: a group of its own
                    : shift >= 0 ? (k >> shift) - bin0
                                 : kBins - 1 - static_cast<u32>(fminf(-s * kBinsPerLogMass, kBins - 1.0f));
      bin_add(b, in, k, w);
    }
    if (!in) return;
    own.a += 1;
    own.b += w;
    if (want_cand) {
      const u32 pos = base + static_cast<u32>(__popc(ballot & lanes_below));
      if (pos < kCapacity) {
        sm.cand_key[pos] = k;
        sm.cand_idx[pos] = i;
      }
    }
  });
  return blk.sum(own);  // its barrier also publishes the candidates and the histogram
}

struct BinPick {
  bool found;
  u32 lo, hi;      // the picked bin's keys: [lo, hi)
  Pair above, in;  // (count, mass) of the bins above the picked one, and of the picked one
};

// The highest bin at which the (count or mass) weight from the top reaches need.
__device__ BinPick bin_select(Block& blk, bool by_mass, u64 need) {
  Shared& sm = blk.sm;
  const u32 t = threadIdx.x;
  const u32 top = kBins - 1 - kBinsPerThread * t;  // this thread's bins: top, top - 1, ...
  Pair own = {0, 0};
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    own.a += sm.bin_count[top - j];
    own.b += sm.bin_mass[top - j];
  }
  Pair total;
  const Pair ex = blk.exclusive_scan(own, total);
  if ((by_mass ? total.b : total.a) < need) return {false, 0, 0, {0, 0}, {0, 0}};
  const u64 before = by_mass ? ex.b : ex.a, mine = by_mass ? own.b : own.a;
  if (before < need && need <= before + mine) {
    Pair c = ex;
    for (int j = 0; j < kBinsPerThread; ++j) {
      const Pair h = {sm.bin_count[top - j], sm.bin_mass[top - j]};
      if ((by_mass ? c.b + h.b : c.a + h.a) >= need || j == kBinsPerThread - 1) {
        sm.pick = sm.bin_min[top - j];
        sm.pick_key_hi = sm.bin_max[top - j] + 1;
        sm.pick_a = c.a;
        sm.pick_b = c.b;
        sm.pick_c = h.a;
        sm.pick_d = h.b;
        break;
      }
      c.a += h.a;
      c.b += h.b;
    }
  }
  __syncthreads();
  return {true, sm.pick, sm.pick_key_hi, {sm.pick_a, sm.pick_b}, {sm.pick_c, sm.pick_d}};
}

struct Search {
  u32 t;          // the threshold key
  Pair ge;        // (count, mass) of the row's elements with key >= t
  u32 shared_lo;  // the candidates hold every element with key >= shared_lo (kNoKey: not so)
  int n;          // number of candidates
};

// The largest key t in [lo, hi) such that the elements with key >= t weigh (by count or mass) at
// least target, given that the elements with key >= hi weigh nothing and the window [lo, hi)
// reaches target. Falls back to t = lo when the window weighs less (rounding of a mass target).
// Each round is a pass over the row: if the window's elements fit in shared memory, the answer is
// found there; otherwise the window shrinks to the histogram bin the answer lies in.
template <class D>
__device__ Search search(Block& blk, const Row<D>& row, u32 lo, u32 hi, bool by_mass, u64 target, float m,
                         float inv_t) {
  Shared& sm = blk.sm;
  Pair acc = {0, 0};   // elements above the window
  u64 known = ~0ull;   // elements in the window, when known
  for (int round = 0;; ++round) {
    int shift = -1;  // the first round bins by s
    if (round > 0) {
      const u32 range_bits = 32u - static_cast<u32>(__clz(static_cast<int>(hi - lo - 1u)));
      shift = range_bits > kBinsLog2 - 1 ? static_cast<int>(range_bits) - (kBinsLog2 - 1) : 0;
    }
    const bool want_cand = known <= static_cast<u64>(kCapacity) || round == 0;
    const bool want_bins = known > static_cast<u64>(kCapacity);
    const Pair window = window_pass(blk, row, lo, hi, shift, want_cand, want_bins, m, inv_t);
    const u64 need = target - (by_mass ? acc.b : acc.a);
    if (want_cand && window.a <= static_cast<u64>(kCapacity)) {
      const int n = static_cast<int>(window.a);
      const Pick p = radix_select(sm, n, [&](int i, u32& key, u64& w) {
        key = sm.cand_key[i];
        w = by_mass ? candidate_mass(sm, i, m, inv_t) : 1;
        return true;
      }, need);
      const u32 t = p.found ? p.key : lo;
      const Pair ge = candidates_at_or_above(blk, n, t, m, inv_t);
      return {t, {acc.a + ge.a, acc.b + ge.b}, acc.a == 0 ? lo : kNoKey, n};
    }
    const BinPick b = bin_select(blk, by_mass, need);
    if (!b.found) return {lo, {acc.a + window.a, acc.b + window.b}, kNoKey, 0};
    acc.a += b.above.a;
    acc.b += b.above.b;
    lo = b.lo;
    hi = b.hi;
    if (hi - lo == 1) return {lo, {acc.a + b.in.a, acc.b + b.in.b}, kNoKey, 0};
    known = b.in.a;
  }
}

// The first index whose running kept mass (key >= thr) exceeds target, scanning the row in index
// order and stopping in the batch of tiles that crosses it: UnrollOf<D> vectors per thread are loaded
// at once, one block sum tells whether the batch crosses, and only that batch is scanned tile by
// tile (a tile: one vector per thread, in thread order). If rounding leaves the target at or past
// the kept total, the last kept index.
template <class D>
__device__ u32 scan_draw(Block& blk, const Row<D>& r, u32 thr, float m, float inv_t, u64 target) {
  constexpr int N = D::N;
  Shared& sm = blk.sm;
  const u32 t = threadIdx.x;
  u64 acc = 0;   // kept mass before the current batch (<= target)
  u32 last = 0;  // 1 + the last kept index this thread saw
  auto kept = [&](float x) -> u64 { return key_of(x) >= thr ? mass_of(x, m, inv_t) : 0; };
  // One tile: xs[0..cnt) are the elements idx0, idx0 + 1, ... of this thread, s their kept mass.
  // True when it crosses the target (the token is then in sm.pick).
  auto tile = [&](const float (&xs)[N], u32 idx0, int cnt, u64 s) -> bool {
    u64 total;
    const u64 ex = blk.exclusive_scan(s, total);
    if (target - acc >= total) {
      acc += total;
      return false;
    }
    if (acc + ex <= target && target < acc + ex + s) {
      u64 c = acc + ex;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        c += j < cnt ? kept(xs[j]) : 0;
        if (c > target) {
          sm.pick = idx0 + j;
          break;
        }
      }
    }
    __syncthreads();
    return true;
  };
  float xs[N], cs[N];
  const Layout<D> l(r);
  {  // the unaligned head: one element per thread at most
    for (int j = 0; j < N; ++j) xs[j] = 0.0f;
    const bool ok = t < l.head;
    xs[0] = ok ? load1(r, t) : 0.0f;
    const u64 s = ok ? kept(xs[0]) : 0;
    if (s != 0) last = t + 1;
    if (tile(xs, t, ok ? 1 : 0, s)) return sm.pick;
  }
  constexpr int U = UnrollOf<D>::value;
#pragma unroll 1
  for (u32 base = 0; base < l.nvec; base += U * kThreads) {
    Vec<D> v[U];
    u64 s[U], batch = 0;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const u32 i = base + u * kThreads + t;
      v[u] = i < l.nvec ? load_vec(r, l, i) : Vec<D>{};
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const u32 i = base + u * kThreads + t;
      unpack(r, v[u], xs, cs);
      s[u] = 0;
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const u64 w = i < l.nvec ? kept(xs[j]) : 0;
        s[u] += w;
        if (w != 0) last = l.head + i * N + j + 1;
      }
      batch += s[u];
    }
    const u64 total = blk.reduce(batch, [](u64 p, u64 q) { return p + q; });
    if (target - acc >= total) {
      acc += total;
      continue;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {  // the batch crosses: find the tile
      const u32 i = base + u * kThreads + t;
      unpack(r, v[u], xs, cs);
      if (tile(xs, l.head + i * N, i < l.nvec ? N : 0, s[u])) return sm.pick;
    }
  }
  {  // the tail: one element per thread at most
    for (int j = 0; j < N; ++j) xs[j] = 0.0f;
    const bool ok = t < l.tail_n;
    xs[0] = ok ? load1(r, l.tail0 + t) : 0.0f;
    const u64 s = ok ? kept(xs[0]) : 0;
    if (s != 0) last = l.tail0 + t + 1;
    if (tile(xs, l.tail0 + t, ok ? 1 : 0, s)) return sm.pick;
  }
  const u32 lk = blk.reduce(last, [](u32 p, u32 q) { return p > q ? p : q; });
  return lk == 0 ? 0u : lk - 1;
}

// ---------------------------------------------------------------------------------------------
// The kernel

// A bad row's outputs: token -1 and NaN log-probs.
__device__ __forceinline__ void mark_bad(const SampleArgs& a, int64_t row) {
  a.tokens[row] = -1;
  a.logprobs[row] = NAN;
  a.filtered_logprobs[row] = NAN;
  if (a.cond_logprobs) a.cond_logprobs[row] = NAN;
}

__device__ __forceinline__ void report(const SampleArgs& a, int64_t row, int kind, int which) {
  const u64 code = (static_cast<u64>(kind) << 60) | (static_cast<u64>(row) << 3) | static_cast<u64>(which);
  atomicMin(a.error, code);
  mark_bad(a, row);
}

// A row's settings: read again where needed rather than held in registers across the passes.
__device__ __forceinline__ double temperature_of(const SampleArgs& a, int64_t r) {
  return a.temperatures ? a.temperatures[r] : a.temperature;
}
__device__ __forceinline__ int64_t top_k_of(const SampleArgs& a, int64_t r) { return a.top_ks ? a.top_ks[r] : a.top_k; }
__device__ __forceinline__ double top_p_of(const SampleArgs& a, int64_t r) { return a.top_ps ? a.top_ps[r] : a.top_p; }
__device__ __forceinline__ double min_p_of(const SampleArgs& a, int64_t r) { return a.min_ps ? a.min_ps[r] : a.min_p; }

// Which setting of row r is out of range (0 temperature, 1 top_k, 2 top_p, 3 min_p; the first of
// them), or -1; and the bits of its value (error word 1).
__device__ __forceinline__ int bad_setting(const SampleArgs& a, int64_t r) {
  const double temperature = temperature_of(a, r), top_p = top_p_of(a, r), min_p = min_p_of(a, r);
  return !(temperature >= 0.0 && temperature <= DBL_MAX) ? 0
         : top_k_of(a, r) < 0                            ? 1
         : !(top_p > 0.0 && top_p <= 1.0)                ? 2
         : !(min_p >= 0.0 && min_p <= 1.0)               ? 3
                                                         : -1;
}
__device__ __forceinline__ u64 setting_bits(const SampleArgs& a, int64_t r, int which) {
  if (which == 1) return static_cast<u64>(top_k_of(a, r));
  const double v = which == 0 ? temperature_of(a, r) : which == 2 ? top_p_of(a, r) : min_p_of(a, r);
  return static_cast<u64>(__double_as_longlong(v));
}

// Block 0 reports the first row with a bad setting, with its value: one writer of error word 1, so
// the value is the reported row's. (Settings given as numbers are the same for every row: row 0.)
__device__ void report_settings(Block& blk, const SampleArgs& a) {
  const bool per_row = a.temperatures || a.top_ks || a.top_ps || a.min_ps;
  const int64_t rows = per_row ? a.rows : 1;
  u64 code = kNoError;
  for (int64_t r = threadIdx.x; r < rows; r += kThreads) {  // increasing rows: a thread's first is its least
    const int which = bad_setting(a, r);
    if (which >= 0) {
      code = (static_cast<u64>(kErrorSetting) << 60) | (static_cast<u64>(r) << 3) | static_cast<u64>(which);
      break;
    }
  }
  code = blk.reduce(code, [](u64 p, u64 q) { return p < q ? p : q; });
  if (threadIdx.x == 0 && code != kNoError) {
    const u64 old = atomicMin(a.error, code);
    if (code < old) a.error[1] = setting_bits(a, static_cast<int64_t>((code >> 3) & ((1ull << 57) - 1)),
                                              static_cast<int>(code & 7u));
  }
}

// A record's maximum as a key (0 when its warp saw no element), for the top-k / top-p bounds.
__device__ __forceinline__ u32 record_key(const Record& r) { return r.first != 0xFFFFFFFFu ? key_of(r.m) : 0u; }

// The inverse temperature of a row, as the per-row kernel computes it (greedy rows: 1).
__device__ __forceinline__ float inv_temperature(const SampleArgs& a, int64_t r) {
  const double temperature = temperature_of(a, r);
  const double q = temperature == 0.0 ? 1.0 : 1.0 / temperature;
  return static_cast<float>(q < FLT_MIN ? FLT_MIN : q > FLT_MAX ? FLT_MAX : q);  // NaN for a bad one: unused
}

// Elements of a split row's chunks: a multiple of 8, so that every chunk starts 16-byte aligned
// when the row does.
__device__ __host__ __forceinline__ int64_t chunk_length(int64_t vocab, int chunks) {
  return ((vocab + chunks - 1) / chunks + 7) / 8 * 8;
}

// Merges the partials of a warp's lanes (every lane gets the warp's).
__device__ __forceinline__ void warp_merge(Partial& own, float inv_t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, own.m, o), z2 = __shfl_xor_sync(kFullMask, own.z, o);
    const u32 f2 = __shfl_xor_sync(kFullMask, own.first, o), t2 = __shfl_xor_sync(kFullMask, own.ties, o);
    const u32 b2 = __shfl_xor_sync(kFullMask, own.bad, o);
    own.merge(m2, z2, f2, t2, b2, inv_t);
  }
}

// The split first pass: block b handles chunk b % chunks of row b / chunks and writes one Record per
// warp (no shared memory, no barriers: warp shuffles only); a guided call asking for the conditional
// log-probs writes the conditional branch's records after all of those.
template <class D>
__global__ void __launch_bounds__(kThreads) partial_kernel(const SampleArgs a) {
  const int64_t row_index = blockIdx.x / a.chunks;
  const int chunk = static_cast<int>(blockIdx.x % a.chunks);
  const float inv_t = inv_temperature(a, row_index);
  const int64_t len = chunk_length(a.vocab, a.chunks), c0 = chunk * len;
  const int64_t n = c0 >= a.vocab ? 0 : (a.vocab - c0 < len ? a.vocab - c0 : len);
  const Row<D> part = RowMaker<D>::make(a, row_index, c0, static_cast<u32>(n));
  const bool want_cond = IsMix<D>::value && a.cond_logprobs != nullptr;
  Partial own, cond;
  for_each_with_cond(part, [&](float x, float c, u32 i, bool ok) {
    if (ok) own.add(x, static_cast<u32>(c0) + i, inv_t);
    if (IsMix<D>::value && want_cond && ok) cond.add(c, static_cast<u32>(c0) + i, inv_t);
  });
  warp_merge(own, inv_t);
  if (IsMix<D>::value && want_cond) warp_merge(cond, inv_t);
  if (lane_id() == 0) {
    Record* out = static_cast<Record*>(a.workspace) + (row_index * a.chunks + chunk) * kWarps + warp_id();
    *out = {own.m, own.z, own.first, own.ties, own.bad};
    if (IsMix<D>::value && want_cond) out[a.rows * a.chunks * kWarps] = {cond.m, cond.z, cond.first, cond.ties, cond.bad};
  }
}

template <class D>
__global__ void __launch_bounds__(kThreads, 2) sample_kernel(const SampleArgs a) {
  Shared& sm = shared_memory();
  Block blk(sm);
  const int64_t row_index = blockIdx.x;
  const u32 t = threadIdx.x;

  if (row_index == 0) report_settings(blk, a);
  if (bad_setting(a, row_index) >= 0) {
    if (t == 0) mark_bad(a, row_index);
    return;
  }
  const bool greedy = temperature_of(a, row_index) == 0.0;
  // (x - m) <= 0 or -inf; a scale within [FLT_MIN, FLT_MAX] never turns it into NaN
  const float inv_t = inv_temperature(a, row_index);
  const Row<D> row = RowMaker<D>::make(a, row_index, 0, static_cast<u32>(a.vocab));
  const bool want_cond = IsMix<D>::value && a.cond_logprobs != nullptr;  // the conditional branch's log-prob

  // Pass 1: maximum, online normaliser, first maximum and its ties, invalid entries; or, for a split
  // row, the merge of its chunks' records (thread t takes records t, t + kThreads, ...).
  const int n_records = a.chunks > 1 ? a.chunks * kWarps : 0;
  const Record* records = static_cast<const Record*>(a.workspace) + row_index * n_records;
  Partial own, cond;  // cond: the conditional branch's (want_cond only)
  if (n_records > 0) {
    for (int i = static_cast<int>(t); i < n_records; i += kThreads) {
      const Record r = records[i];
      own.merge(r.m, r.z, r.first, r.ties, r.bad, inv_t);
      if (IsMix<D>::value && want_cond) {
        const Record c = records[a.rows * n_records + i];
        cond.merge(c.m, c.z, c.first, c.ties, c.bad, inv_t);
      }
    }
  } else {
    for_each_with_cond(row, [&](float x, float c, u32 i, bool ok) {
      if (ok) own.add(x, i, inv_t);
      if (IsMix<D>::value && want_cond && ok) cond.add(c, i, inv_t);
    });
  }
  const float m = own.m, z = own.z;
  const u32 first = own.first, ties = own.ties, bad = own.bad;
  const bool seen = own.seen();
  if (blk.reduce(bad, [](u32 p, u32 q) { return p + q; }) != 0) {
    if (t == 0) report(a, row_index, kErrorLogits, kWhichNonFinite);
    return;
  }
  const float row_max = blk.reduce(m, [](float p, float q) { return fmaxf(p, q); });
  if (!(row_max > -INFINITY)) {
    if (t == 0) report(a, row_index, kErrorLogits, kWhichNoFinite);
    return;
  }
  if (IsMix<D>::value && want_cond) {  // the conditional branch's maximum, and its ties or normaliser
    const float cond_max = blk.reduce(cond.m, [](float p, float q) { return fmaxf(p, q); });
    const double cond_z =
        greedy ? static_cast<double>(blk.reduce(cond.m == cond_max ? cond.ties : 0u, [](u32 p, u32 q) { return p + q; }))
               : blk.reduce(cond.m > -INFINITY ? static_cast<double>(cond.z * exp_fast((cond.m - cond_max) * inv_t)) : 0.0,
                            [](double p, double q) { return p + q; });
    if (t == 0) {
      sm.cond_max = cond_max;
      sm.z_cond = cond_z;
    }
  }
  if (greedy) {
    const bool at_max = m == row_max;
    const u32 first_max = blk.reduce(at_max ? first : 0xFFFFFFFFu, [](u32 p, u32 q) { return p < q ? p : q; });
    const u32 n_ties = blk.reduce(at_max ? ties : 0u, [](u32 p, u32 q) { return p + q; });
    if (t == 0) {
      // the T -> 0 limit puts equal mass on the tied maxima; return the first of them
      const float lp = -logf(static_cast<float>(n_ties));
      a.tokens[row_index] = first_max;
      a.logprobs[row_index] = lp;
      a.filtered_logprobs[row_index] = lp;
      if (IsMix<D>::value && want_cond) {  // T -> 0 of the conditional branch: its tied maxima
        a.cond_logprobs[row_index] = cond1(row, first_max) == sm.cond_max ? -logf(static_cast<float>(sm.z_cond))
                                                                          : -INFINITY;
      }
    }
    return;
  }
  const double z_row = blk.reduce(m > -INFINITY ? static_cast<double>(z * exp_fast((m - row_max) * inv_t)) : 0.0,
                                  [](double p, double q) { return p + q; });
  // A thread's maximum, for the top-k / top-p bounds (key 0: the thread saw no element).
  const u32 thread_max_key = seen ? key_of(m) : 0u;

  const u32 hi = key_of(row_max) + 1;  // no element has a larger key
  const int64_t top_k = top_k_of(a, row_index);
  const bool use_k = top_k > 0 && top_k < a.vocab;
  const bool use_p = top_p_of(a, row_index) < 1.0;
  const bool use_min_p = min_p_of(a, row_index) > 0.0;
  u32 thr = 0;             // the kept tokens: key >= thr
  u64 z_kept = 0;          // their mass, when z_known
  bool z_known = false;
  u32 shared_lo = kNoKey;  // the candidates hold every element with key >= shared_lo
  int n_cand = 0;

  if (use_k) {
    u32 lo = 0;
    // the k-th largest thread maximum (split row: record maximum) is <= the k-th largest element
    if (top_k <= (n_records > 0 ? n_records : kThreads)) {
      const Pick b = radix_select(sm, n_records > 0 ? n_records : kThreads, [&](int i, u32& key, u64& w) {
        key = n_records > 0 ? record_key(records[i]) : thread_max_key;
        w = 1;
        return true;
      }, static_cast<u64>(top_k));
      lo = b.found ? b.key : 0u;
    }
    const Search s = search(blk, row, lo, hi, false, static_cast<u64>(top_k), row_max, inv_t);
    thr = s.t;
    z_kept = s.ge.b;
    z_known = true;
    shared_lo = s.shared_lo;
    n_cand = s.n;
  }
  if (use_p) {
    // keep a token when the mass strictly above it is < p * Z, Z the mass of the top-k set:
    // in integers, when it is < ceil(p * Z) (>= 1, so the maximum is always kept)
    const double z_fixed = use_k ? static_cast<double>(z_kept) : z_row * static_cast<double>(kMassScale);
    const double want = ceil(top_p_of(a, row_index) * z_fixed);
    const u64 target = want < 1.0 ? 1ull : static_cast<u64>(want);
    if (use_k && shared_lo <= thr) {  // the top-k set is in shared memory: no pass
      const u32 floor_key = thr;
      const Pick q = radix_select(sm, n_cand, [&](int i, u32& key, u64& w) {
        key = sm.cand_key[i];
        w = candidate_mass(sm, i, row_max, inv_t);
        return key >= floor_key;
      }, target);
      if (q.found && q.key > thr) {
        thr = q.key;
        z_kept = q.w_ge;
      }
    } else {
      u32 lo = thr;
      if (!use_k) {  // the thread maxima at or above lo carry the target: so do the elements
        const u64 w_max = seen ? mass_of(m, row_max, inv_t) : 0ull;
        const Pick b = radix_select(sm, n_records > 0 ? n_records : kThreads, [&](int i, u32& key, u64& w) {
          if (n_records > 0) {
            const Record r = records[i];
            key = record_key(r);
            w = r.first != 0xFFFFFFFFu ? mass_of(r.m, row_max, inv_t) : 0ull;
          } else {
            key = thread_max_key;
            w = w_max;
          }
          return true;
        }, target);
        lo = b.found ? b.key : 0u;
      }
      const Search s = search(blk, row, lo, hi, true, target, row_max, inv_t);
      thr = s.t;
      z_kept = s.ge.b;
      z_known = true;
      shared_lo = s.shared_lo;
      n_cand = s.n;
    }
  }
  if (use_min_p) {  // x >= m + T log(min_p), rounded up to a float; min_p = 1 keeps the maxima
    const double exact = static_cast<double>(row_max) + log(min_p_of(a, row_index)) * temperature_of(a, row_index);
    float rounded = static_cast<float>(exact);
    if (static_cast<double>(rounded) < exact) rounded = nextafterf(rounded, INFINITY);
    const u32 t_min_p = key_of(rounded);
    if (t_min_p > thr) {
      thr = t_min_p;
      z_known = false;
    }
  }
  const bool plain = !use_k && !use_p && !use_min_p;
  if (!plain && !z_known) {
    if (shared_lo <= thr) {
      z_kept = candidates_at_or_above(blk, n_cand, thr, row_max, inv_t).b;
    } else {  // min-p above the other thresholds: one pass for the kept mass (and candidates)
      const Pair w = window_pass(blk, row, thr, hi, 0, true, false, row_max, inv_t);
      z_kept = w.b;
      n_cand = static_cast<int>(w.a <= static_cast<u64>(kCapacity) ? w.a : 0);
      shared_lo = w.a <= static_cast<u64>(kCapacity) ? thr : kNoKey;
    }
  }

  // Draw: the first kept index whose running mass exceeds u * Z_kept.
  const double u = philox_uniform(a.seed_ptr ? static_cast<uint64_t>(*a.seed_ptr) : a.seed_value,
                                  static_cast<uint64_t>(row_index));
  u64 target = static_cast<u64>(u * (plain ? z_row * static_cast<double>(kMassScale) : static_cast<double>(z_kept)));
  if (!plain && target >= z_kept) target = z_kept - 1;  // z_kept >= 2^40: the maximum is kept
  if (t == 0) {
    sm.z_row = z_row;
    sm.z_filtered = plain ? z_row : static_cast<double>(z_kept) * kInvMassScale;
  }
  u32 token;
  if (shared_lo <= thr) {
    const u32 floor_key = thr;
    const Pick q = radix_select(sm, n_cand, [&](int i, u32& key, u64& w) {
      key = ~sm.cand_idx[i];  // the largest inverted index is the smallest index
      w = candidate_mass(sm, i, row_max, inv_t);
      return sm.cand_key[i] >= floor_key;
    }, target + 1);
    token = q.found ? ~q.key : 0u;  // found always: the kept candidates weigh z_kept > target
  } else {
    token = scan_draw(blk, row, thr, row_max, inv_t, target);
  }
  if (t == 0) {
    const float x = load1(row, token);
    const float s = (x - row_max) * inv_t;
    a.tokens[row_index] = token;
    a.logprobs[row_index] = static_cast<float>(static_cast<double>(s) - log(sm.z_row));
    a.filtered_logprobs[row_index] = static_cast<float>(static_cast<double>(s) - log(sm.z_filtered));
    if (IsMix<D>::value && want_cond) {
      const float sc = (cond1(row, token) - sm.cond_max) * inv_t;
      a.cond_logprobs[row_index] = static_cast<float>(static_cast<double>(sc) - log(sm.z_cond));
    }
  }
}

template <class D>
int launch(const SampleArgs& a, CUstream_st* stream) {
  const unsigned split_blocks = a.chunks > 1 ? static_cast<unsigned>(a.rows * a.chunks) : 0u;
#ifdef FASTRL_SIMT_EMULATION
  if (split_blocks > 0) simt::launch(split_blocks, kThreads, 0, [&] { partial_kernel<D>(a); });
  simt::launch(static_cast<unsigned>(a.rows), kThreads, sizeof(Shared), [&] { sample_kernel<D>(a); });
  return 0;
#else
  if (split_blocks > 0) {
    partial_kernel<D><<<split_blocks, kThreads, 0, stream>>>(a);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  // More than 48 KiB of dynamic shared memory needs opting in, once per device (a benign race).
  static bool opted_in[64] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (device >= 64 || !opted_in[device]) {
    err = cudaFuncSetAttribute(sample_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(sizeof(Shared)));
    if (err != cudaSuccess) return static_cast<int>(err);
    if (device < 64) opted_in[device] = true;
  }
  sample_kernel<D><<<static_cast<unsigned>(a.rows), kThreads, sizeof(Shared), stream>>>(a);
  return static_cast<int>(cudaGetLastError());
#endif
}

}  // namespace

int launch_sample(const SampleArgs& args, CUstream_st* stream) {
  if (args.rows <= 0) return 0;
  if (!args.accumulate) {
#ifdef FASTRL_SIMT_EMULATION
    *args.error = kNoError;
#else
    const cudaError_t err = cudaMemsetAsync(args.error, 0xFF, sizeof(unsigned long long), stream);
    if (err != cudaSuccess) return static_cast<int>(err);
#endif
  }
  const bool mixed = args.uncond != nullptr;
  switch (args.dtype) {
    case LogitsType::kFloat32:
      return mixed ? launch<Mix<F32>>(args, stream) : launch<F32>(args, stream);
    case LogitsType::kBFloat16:
      return mixed ? launch<Mix<BF16>>(args, stream) : launch<BF16>(args, stream);
    default:
      return mixed ? launch<Mix<F16>>(args, stream) : launch<F16>(args, stream);
  }
}

int sample_chunks(int64_t rows, int64_t vocab, int sm_count) {
  if (rows <= 0 || rows >= sm_count) return 1;
  const int64_t want = (2 * static_cast<int64_t>(sm_count) + rows - 1) / rows;  // two blocks per SM
  const int64_t longest = vocab / kMinChunk;                                     // chunks >= kMinChunk
  int64_t c = want < longest ? want : longest;
  c = c < kMaxChunks ? c : kMaxChunks;
  if (rows * c > INT32_MAX) return 1;
  return c > 1 ? static_cast<int>(c) : 1;
}

int64_t sample_workspace_bytes(int64_t rows, int chunks, bool cond) {
  return chunks > 1 ? (cond ? 2 : 1) * rows * chunks * kWarps * static_cast<int64_t>(sizeof(Record)) : 0;
}

int sample_shared_bytes() { return static_cast<int>(sizeof(Shared)); }
int sample_threads() { return kThreads; }

}  // namespace gpu
}  // namespace fastrl
