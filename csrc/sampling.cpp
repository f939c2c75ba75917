// CPU token sampler: temperature, top-k, top-p and min-p per row, without sorting the vocabulary.
//
// Per row, with m = max x, s = (x - m) / T and e = exp(s) (the largest e is exactly 1), each filter
// keeps the logits at or above a threshold, ties included, so together they keep x >= thr:
//   1. top-k: the k-th largest x. Candidates are first cut to the e >= the k-th largest block
//      maximum (k distinct blocks reach it), then nth_element runs on those few;
//   2. top-p: among the top-k set, token i is kept when the mass (sum of e) of the tokens with a
//      larger logit is < p * (mass of the set): a mass-weighted quickselect, expected linear work.
//      Without top-k, a histogram of e first finds the bucket the threshold lies in, and only that
//      bucket is searched;
//   3. min-p: s >= log(min_p), i.e. p >= min_p * p_max.
// Order is decided on x itself (full input resolution), masses come from e. The token is drawn by
// inverse CDF: one uniform u per row from Philox4x32-10 keyed by (seed, row), target u * Z_kept,
// found with per-block partial sums. Rows run in parallel (at::parallel_for); a row's result
// depends only on (seed, row, its data), not on the thread count.
//
// Classifier-free guidance (an `uncond` tensor and cfg_weight w != 1): each row is first mixed into
// x = u + (c - u) * w (fp32), then sampled as above; the conditional branch's log-prob of the drawn
// token (softmax(c / T)) is computed from c afterwards when asked for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "sampling_checks.h"

namespace fastrl {
namespace {

constexpr int64_t kBlock = 64;  // elements per block: partial sums (inverse CDF), maxima (top-k bound)
// Histogram buckets over the bits of e in [0, 1]: exponent and 3 mantissa bits, a factor 2^(1/8) each.
constexpr int kBucketShift = 20;
constexpr int64_t kBuckets = (0x3F800000 >> kBucketShift) + 1;
constexpr float kInf = std::numeric_limits<float>::infinity();

// The hot loops are compiled for several instruction sets and picked at load time (GCC/Clang
// function multi-versioning), so one build is fast on any x86-64 machine.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTRL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTRL_MULTIVERSION
#endif

// exp(x) for x <= 0 (x may be -inf), 0 below -87 where fp32 would go subnormal. Cody-Waite range
// reduction to |g| <= ln2/2, then a degree-6 Taylor polynomial: relative error ~2e-7 (the fp32
// rounding level). Written with plain arithmetic so that the loops around it vectorise.
inline __attribute__((always_inline)) float exp_nonpositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const float g = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720.0f;
  p = p * g + 1.0f / 120.0f;
  p = p * g + 1.0f / 24.0f;
  p = p * g + 1.0f / 6.0f;
  p = p * g + 0.5f;
  p = p * g + 1.0f;
  p = p * g + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// Largest value of x[0..n) and the number of entries that are NaN or +inf.
FASTRL_MULTIVERSION
float max_and_count_invalid(const float* x, int64_t n, int64_t* n_invalid) {
  float m = -kInf;
  int64_t bad = 0;
#pragma omp simd reduction(max : m) reduction(+ : bad)
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    bad += !(v <= FLT_MAX);  // NaN compares false, +inf is above FLT_MAX
    m = v > m ? v : m;
  }
  *n_invalid = bad;
  return m;
}

// e[i] = exp((x[i] - m) * inv_t); per block of kBlock, the sum into block_sums and the maximum into
// block_max; returns the total.
FASTRL_MULTIVERSION
double exp_and_block_stats(const float* x, float m, float inv_t, float* e, double* block_sums, float* block_max,
                           int64_t n) {
  double total = 0.0;
  for (int64_t lo = 0, b = 0; lo < n; lo += kBlock, ++b) {
    const int64_t hi = std::min(n, lo + kBlock);
    double s = 0.0;
    float bm = 0.0f;
#pragma omp simd reduction(+ : s) reduction(max : bm)
    for (int64_t i = lo; i < hi; ++i) {
      const float v = exp_nonpositive((x[i] - m) * inv_t);
      e[i] = v;
      s += v;
      bm = v > bm ? v : bm;
    }
    block_sums[b] = s;
    block_max[b] = bm;
    total += s;
  }
  return total;
}

// Block sums of the e[i] whose x[i] >= thr; returns the total. Blocks whose maximum e is below
// e_floor hold no such entry and are skipped (after top-k or top-p, nearly all of them).
FASTRL_MULTIVERSION
double kept_block_sums(const float* x, const float* e, const float* block_max, float thr, float e_floor,
                       double* block_sums, int64_t n) {
  double total = 0.0;
  for (int64_t lo = 0, b = 0; lo < n; lo += kBlock, ++b) {
    block_sums[b] = 0.0;
    if (block_max[b] < e_floor) continue;
    const int64_t hi = std::min(n, lo + kBlock);
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = lo; i < hi; ++i) s += x[i] >= thr ? e[i] : 0.0f;
    block_sums[b] = s;
    total += s;
  }
  return total;
}

// A candidate token: its logit (the order) and its unnormalised probability e (the mass).
struct Cand {
  float x, e;
};

// Copies the tokens with lower <= e < upper (lower > 0) into out; returns how many. Only the blocks
// whose maximum reaches lower are read. Branch-free inside a block: whether an entry falls in a
// histogram bucket is close to a coin flip, which a branch would mispredict.
int64_t compact_between(const float* x, const float* e, const float* block_max, int64_t n, float lower, float upper,
                        Cand* out) {
  int64_t c = 0;
  for (int64_t lo = 0, b = 0; lo < n; lo += kBlock, ++b) {
    if (block_max[b] < lower) continue;
    const int64_t hi = std::min(n, lo + kBlock);
    for (int64_t i = lo; i < hi; ++i) {
      const float v = e[i];
      out[c] = {x[i], v};
      c += static_cast<int64_t>(v >= lower) & static_cast<int64_t>(v < upper);
    }
  }
  return c;
}

float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t bucket_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return std::min<uint32_t>(bits >> kBucketShift, kBuckets - 1);
}

// Histogram of e in [0, 1] by its leading bits (mass per bucket), over the blocks whose maximum
// reaches `floor`. Returns the highest bucket at which the mass from the top reaches `mass`;
// *above gets the mass of the buckets above it. When the tokens with e >= floor carry at least
// `mass`, the skipped blocks cannot change that answer (they only add to buckets at or below
// floor's). The top-p threshold lies in the returned bucket. `hist` holds 4 * kBuckets doubles.
int64_t top_p_bucket(const float* e, const float* block_max, int64_t n, float floor, double mass, double* hist,
                     double* above) {
  // Four interleaved histograms: neighbouring values often share a bucket, and one histogram
  // would chain every add on the previous store.
  std::fill(hist, hist + 4 * kBuckets, 0.0);
  for (int64_t lo = 0, b = 0; lo < n; lo += kBlock, ++b) {
    if (block_max[b] < floor) continue;
    const int64_t hi = std::min(n, lo + kBlock);
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4) {
      hist[bucket_of(e[i])] += e[i];
      hist[kBuckets + bucket_of(e[i + 1])] += e[i + 1];
      hist[2 * kBuckets + bucket_of(e[i + 2])] += e[i + 2];
      hist[3 * kBuckets + bucket_of(e[i + 3])] += e[i + 3];
    }
    for (; i < hi; ++i) hist[bucket_of(e[i])] += e[i];
  }
  for (int64_t b = 0; b < kBuckets; ++b) hist[b] += hist[kBuckets + b] + hist[2 * kBuckets + b] + hist[3 * kBuckets + b];
  double cum = 0.0;
  int64_t b = kBuckets - 1;
  for (; b > 1; --b) {
    if (cum + hist[b] >= mass) break;
    cum += hist[b];
  }
  *above = cum;
  return b;
}

// The top-p threshold: the smallest logit x among a[0..n) whose "mass above" (the e of the
// candidates with a larger logit, plus `above`, the mass of larger tokens outside a) is below
// `mass`; +inf if there is none. Mass-weighted quickselect with a three-way partition on x; each
// step drops the pivot's equal run, so it ends, and expected work is linear in n. Reorders a.
float top_p_threshold(Cand* a, int64_t n, double mass, double above) {
  float best = kInf;
  int64_t lo = 0, hi = n;
  while (lo < hi) {  // invariant: `above` = mass of the candidates above every one in [lo, hi)
    const float x = a[lo].x, y = a[lo + (hi - lo) / 2].x, z = a[hi - 1].x;
    const float pivot = std::max(std::min(x, y), std::min(std::max(x, y), z));  // median of three
    int64_t lt = lo, i = lo, gt = hi;
    double greater = 0.0, equal = 0.0;
    while (i < gt) {
      const float v = a[i].x;
      if (v > pivot) {
        greater += a[i].e;
        std::swap(a[lt++], a[i++]);
      } else if (v < pivot) {
        std::swap(a[i], a[--gt]);
      } else {
        equal += a[i].e;
        ++i;
      }
    }
    if (above + greater < mass) {  // the pivot is kept: look for a smaller kept value below it
      best = pivot;
      above += greater + equal;
      lo = gt;
    } else {  // the pivot is dropped, and so is everything below it
      hi = lt;
    }
  }
  return best;
}

// A floor on e below which no token survives top-p: the smallest block maximum L such that the
// block maxima >= L alone carry `mass` (each is a token with e >= L, so the tokens >= L carry at
// least as much). 0 when all block maxima together fall short (a flat distribution).
float top_p_floor(const float* block_max, int64_t n_blocks, double mass, Cand* scratch) {
  double total = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    scratch[b] = {block_max[b], block_max[b]};
    total += block_max[b];
  }
  if (total < mass) return 0.0f;
  // the smallest maximum whose mass above is < `mass`; the maxima >= it then carry >= `mass`
  return top_p_threshold(scratch, n_blocks, mass, 0.0);
}

// Index of the draw: the first kept i (x[i] >= thr, e[i] > 0) whose running sum of kept e exceeds
// target. block_sums are the per-block kept sums. If rounding leaves target at or past the total,
// the last kept entry is taken.
int64_t inverse_cdf(const float* x, const float* e, const double* block_sums, int64_t n, float thr, double target) {
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  double cum = 0.0;
  int64_t last_block = -1;
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (block_sums[b] > 0.0) last_block = b;
    if (cum + block_sums[b] > target) {
      const int64_t hi = std::min(n, (b + 1) * kBlock);
      for (int64_t i = b * kBlock; i < hi; ++i) {
        if (e[i] > 0.0f && x[i] >= thr) {
          cum += e[i];
          if (cum > target) return i;
        }
      }
      last_block = b;  // rounding inside the block: fall back to its last kept entry
      break;
    }
    cum += block_sums[b];
  }
  for (int64_t i = std::min(n, (last_block + 1) * kBlock) - 1; i >= last_block * kBlock && i >= 0; --i) {
    if (e[i] > 0.0f && x[i] >= thr) return i;
  }
  return -1;  // unreachable: the row maximum (e = 1) is always kept
}

// Philox4x32-10 keyed by the seed, counter = row: a uniform double in [0, 1) with 53 random bits.
double philox_uniform(uint64_t seed, uint64_t row) {
  uint32_t c0 = static_cast<uint32_t>(row), c1 = static_cast<uint32_t>(row >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const uint64_t hi27 = c0 >> 5, lo26 = c1 >> 6;
  return static_cast<double>((hi27 << 26) | lo26) * (1.0 / 9007199254740992.0);
}

struct RowParams {
  double temperature;
  int64_t top_k;
  double top_p;
  double min_p;
};

struct RowResult {
  int64_t token;
  float logprob;
  float filtered_logprob;
};

// Per-thread buffers, grown on demand and kept between calls (a decode loop calls every step).
struct Workspace {
  std::vector<float> x, e, block_max, small;
  std::vector<Cand> cand;
  std::vector<double> block_sums, hist = std::vector<double>(4 * kBuckets);
  void reserve(int64_t v, bool need_x) {
    const size_t n = static_cast<size_t>(v);
    if (need_x && x.size() < n) x.resize(n);
    if (e.size() < n) e.resize(n);
    if (cand.size() < n) cand.resize(n);
    const size_t nb = static_cast<size_t>((v + kBlock - 1) / kBlock);
    if (block_sums.size() < nb) block_sums.resize(nb);
    if (block_max.size() < nb) block_max.resize(nb);
    if (small.size() < nb) small.resize(nb);
  }
};

enum RowError : int64_t { kOk = 0, kNonFinite = 1, kNoFinite = 2 };

// The logit threshold of top-k and top-p together (tokens with x >= it survive both); -inf when
// neither is active.
float top_k_top_p_threshold(const float* x, const float* e, int64_t v, double z, const RowParams& prm,
                            Workspace& ws) {
  const bool use_k = prm.top_k > 0 && prm.top_k < v;
  Cand* cand = ws.cand.data();
  float thr = -kInf;
  int64_t kept = 0;
  double kept_mass = z;
  if (use_k) {
    const int64_t k = prm.top_k;
    const int64_t n_blocks = (v + kBlock - 1) / kBlock;
    float lower = FLT_MIN;  // every e > 0 is >= FLT_MIN (exp_nonpositive flushes below e^-87)
    if (k <= n_blocks) {
      float* bmax = ws.small.data();
      std::copy(ws.block_max.data(), ws.block_max.data() + n_blocks, bmax);
      std::nth_element(bmax, bmax + (k - 1), bmax + n_blocks, std::greater<float>());
      // exp_nonpositive may step down by an ulp where x steps up: the margin keeps every token of
      // the top k among the candidates (nth_element on x then cuts exactly).
      lower = std::max(lower, bmax[k - 1] * (1.0f - 1e-6f));
    }
    // Every token with x >= the smallest candidate x is a candidate (up to the margin above).
    const int64_t c = compact_between(x, e, ws.block_max.data(), v, lower, kInf, cand);
    kept = c;
    if (k < c) {
      std::nth_element(cand, cand + (k - 1), cand + c, [](const Cand& p, const Cand& q) { return p.x > q.x; });
      kept = k;
      for (int64_t j = k; j < c; ++j) {  // tokens tied with the k-th largest logit are kept too
        if (cand[j].x == cand[k - 1].x) std::swap(cand[kept++], cand[j]);
      }
    }
    kept_mass = 0.0;
    thr = kInf;
    for (int64_t j = 0; j < kept; ++j) {
      kept_mass += cand[j].e;
      thr = std::min(thr, cand[j].x);
    }
  }
  if (prm.top_p < 1.0) {
    const double mass = prm.top_p * kept_mass;
    float t = kInf;
    if (use_k) {
      t = top_p_threshold(cand, kept, mass, 0.0);
    } else {  // top-p over the whole vocabulary: search only the bucket the threshold falls in
      double above = 0.0;
      const int64_t n_blocks = (v + kBlock - 1) / kBlock;
      const float floor = top_p_floor(ws.block_max.data(), n_blocks, mass, cand) * (1.0f - 1e-6f);
      const int64_t b = top_p_bucket(e, ws.block_max.data(), v, floor, mass, ws.hist.data(), &above);
      if (b >= static_cast<int64_t>(bucket_of(floor))) {  // else rounding ran the scan past the floor
        const float lower = float_from_bits(static_cast<uint32_t>(b) << kBucketShift);
        const float upper = float_from_bits(static_cast<uint32_t>(b + 1) << kBucketShift);
        t = top_p_threshold(cand, compact_between(x, e, ws.block_max.data(), v, lower, upper, cand), mass, above);
      }
      if (std::isinf(t)) {  // rounding between the histogram and the search: search every token
        t = top_p_threshold(cand, compact_between(x, e, ws.block_max.data(), v, FLT_MIN, kInf, cand), mass, 0.0);
      }
    }
    thr = std::max(thr, t);
  }
  return thr;
}

RowResult sample_row(const float* x, int64_t v, const RowParams& prm, uint64_t seed, int64_t row,
                     Workspace& ws, int64_t* error) {
  int64_t n_invalid = 0;
  const float m = max_and_count_invalid(x, v, &n_invalid);
  if (n_invalid > 0) {
    *error = kNonFinite;
    return {0, 0.0f, 0.0f};
  }
  if (!(m > -kInf)) {
    *error = kNoFinite;
    return {0, 0.0f, 0.0f};
  }

  if (prm.temperature == 0.0) {
    // Greedy: the T -> 0 limit puts equal mass on the tied maxima; return the first of them.
    int64_t first = -1, ties = 0;
    for (int64_t i = 0; i < v; ++i) {
      if (x[i] == m) {
        if (first < 0) first = i;
        ++ties;
      }
    }
    const float lp = -std::log(static_cast<float>(ties));
    return {first, lp, lp};
  }

  // (x - m) <= 0 or -inf; a scale kept within [FLT_MIN, FLT_MAX] (not 0, not inf, whatever
  // T is and whether denormals are flushed) never turns it into NaN.
  const float inv_t = static_cast<float>(std::clamp(1.0 / prm.temperature, static_cast<double>(FLT_MIN),
                                                    static_cast<double>(FLT_MAX)));
  float* e = ws.e.data();
  double* block_sums = ws.block_sums.data();
  const double z = exp_and_block_stats(x, m, inv_t, e, block_sums, ws.block_max.data(), v);

  float thr = -kInf;
  if ((prm.top_k > 0 && prm.top_k < v) || prm.top_p < 1.0) thr = top_k_top_p_threshold(x, e, v, z, prm, ws);
  if (prm.min_p > 0.0) {  // s >= log(min_p), i.e. x >= m + T log(min_p); min_p = 1 keeps the maxima
    const double exact = m + std::log(prm.min_p) * prm.temperature;
    float rounded = static_cast<float>(exact);
    if (static_cast<double>(rounded) < exact) rounded = std::nextafter(rounded, kInf);  // x >= it iff x >= exact
    thr = std::max(thr, rounded);
  }

  double z_kept = z;
  if (thr > -kInf) {
    // every kept token has e >= exp(s(thr)); the margin covers the last-bit wobble of exp_nonpositive
    const float e_floor = exp_nonpositive(std::min(0.0f, (thr - m) * inv_t)) * (1.0f - 1e-5f);
    z_kept = kept_block_sums(x, e, ws.block_max.data(), thr, e_floor, block_sums, v);
  }
  const double target = philox_uniform(seed, static_cast<uint64_t>(row)) * z_kept;
  const int64_t token = inverse_cdf(x, e, block_sums, v, thr, target);
  const float s = (x[token] - m) * inv_t;
  return {token, static_cast<float>(s - std::log(z)), static_cast<float>(s - std::log(z_kept))};
}

// Classifier-free guidance: the mixed row x = u + (c - u) * w, in fp32 in that order (Hugging Face's
// ClassifierFreeGuidanceLogitsProcessor), written into the workspace. A -inf in either branch bans the
// token (-inf); NaN or +inf in either branch gives NaN, which the row check reports. No fused
// multiply-add (the CUDA kernel and the torch reference round the product and the sum separately).
#if defined(__GNUC__) && !defined(__clang__)
#define FASTRL_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define FASTRL_NO_CONTRACT
#endif

template <typename T>
FASTRL_NO_CONTRACT const float* mixed_row(const T* c, const T* u, int64_t n, float w, Workspace& ws) {
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif
  float* dst = ws.x.data();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t i = 0; i < n; ++i) {
    const float ci = static_cast<float>(c[i]), ui = static_cast<float>(u[i]);
    const float d = ci - ui;
    const float mixed = ui + d * w;
    dst[i] = !(ci <= FLT_MAX && ui <= FLT_MAX) ? nan : (ci == -kInf || ui == -kInf) ? -kInf : mixed;
  }
  return dst;
}

// Log-prob of `token` under softmax(c / T) over the row (the conditional branch of a guided draw),
// with the exp and the double sum of the sampler's own log-probs. Greedy (T = 0): the T -> 0 limit,
// -log(number of tied maxima of c) when c[token] is one of them, else -inf. Every entry is finite or
// -inf and c[token] is finite (the caller checked the row).
template <typename T>
float cond_logprob(const T* c, int64_t n, double temperature, int64_t token) {
  float m = -kInf;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<float>(c[i]));
  const float ct = static_cast<float>(c[token]);
  if (temperature == 0.0) {
    if (ct != m) return -kInf;
    int64_t ties = 0;
    for (int64_t i = 0; i < n; ++i) ties += static_cast<float>(c[i]) == m;
    return -std::log(static_cast<float>(ties));
  }
  const float inv_t =
      static_cast<float>(std::clamp(1.0 / temperature, static_cast<double>(FLT_MIN), static_cast<double>(FLT_MAX)));
  double z = 0.0;
  for (int64_t i = 0; i < n; ++i) z += exp_nonpositive((static_cast<float>(c[i]) - m) * inv_t);
  return static_cast<float>((ct - m) * inv_t - std::log(z));
}

// A row as fp32: fp32 rows are read in place, bf16/fp16 rows converted into the workspace.
const float* row_as_float(const float* src, int64_t, Workspace&) { return src; }

template <typename T>
const float* row_as_float(const T* src, int64_t n, Workspace& ws) {
  float* dst = ws.x.data();
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  return dst;
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(
    const at::Tensor& logits_in, const at::Tensor& seed, double temperature, int64_t top_k, double top_p,
    double min_p, const std::optional<at::Tensor>& temperatures, const std::optional<at::Tensor>& top_ks,
    const std::optional<at::Tensor>& top_ps, const std::optional<at::Tensor>& min_ps,
    const std::optional<at::Tensor>& error, const std::optional<at::Tensor>& uncond_in, double cfg_weight,
    const std::optional<at::Tensor>& cond_logprobs) {
  check_logits(logits_in);
  check_cfg_weight(cfg_weight);
  if (uncond_in.has_value()) check_uncond(*uncond_in, logits_in);
  const bool cfg = uncond_in.has_value() && cfg_weight != 1.0;  // w == 1: the plain path, uncond unread
  float* clp = cond_logprobs_out(cond_logprobs, logits_in);
  const auto dtype = logits_in.scalar_type();
  TORCH_CHECK_VALUE(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() >= 1,
                    "seed must be a cpu int64 tensor with one element");
  // With an error word the row checks are deferred (as on CUDA): a bad row gets token -1 and NaN
  // log-probs and lowers the word; settings given as numbers are still checked here.
  const bool deferred = error.has_value();
  if (deferred) check_error_word(*error, logits_in);
  const int64_t rows = logits_in.size(0), v = logits_in.size(1);
  TORCH_CHECK_VALUE(v >= 1, "logits must have a non-empty vocabulary dimension");

  const double* t_row = row_setting<double>(temperatures, logits_in, at::kDouble, "temperature");
  const int64_t* k_row = row_setting<int64_t>(top_ks, logits_in, at::kLong, "top_k");
  const double* p_row = row_setting<double>(top_ps, logits_in, at::kDouble, "top_p");
  const double* mp_row = row_setting<double>(min_ps, logits_in, at::kDouble, "min_p");
  if (deferred && rows > 0) {
    if (!t_row) check_temperature(temperature, 0);
    if (!k_row) check_top_k(top_k, 0);
    if (!p_row) check_top_p(top_p, 0);
    if (!mp_row) check_min_p(min_p, 0);
  }
  std::vector<RowParams> params(static_cast<size_t>(rows));
  std::vector<char> bad_setting(static_cast<size_t>(rows), 0);
  uint64_t setting_code = gpu::kNoError;  // the first bad row's, when deferred
  int64_t setting_bits = 0;
  for (int64_t r = 0; r < rows; ++r) {
    RowParams prm{t_row ? t_row[r] : temperature, k_row ? k_row[r] : top_k, p_row ? p_row[r] : top_p,
                  mp_row ? mp_row[r] : min_p};
    if (deferred) {
      const int which = !(prm.temperature >= 0.0 && std::isfinite(prm.temperature)) ? 0
                        : prm.top_k < 0                                            ? 1
                        : !(prm.top_p > 0.0 && prm.top_p <= 1.0)                   ? 2
                        : !(prm.min_p >= 0.0 && prm.min_p <= 1.0)                  ? 3
                                                                                   : -1;
      if (which >= 0) {
        bad_setting[static_cast<size_t>(r)] = 1;
        if (setting_code == gpu::kNoError) {
          setting_code = error_code(gpu::kErrorSetting, r, which);
          const double value = which == 0 ? prm.temperature : which == 2 ? prm.top_p : prm.min_p;
          if (which == 1) {
            setting_bits = prm.top_k;
          } else {
            std::memcpy(&setting_bits, &value, sizeof(value));
          }
        }
      }
    } else {
      check_temperature(prm.temperature, r);
      check_top_k(prm.top_k, r);
      check_top_p(prm.top_p, r);
      check_min_p(prm.min_p, r);
    }
    params[static_cast<size_t>(r)] = prm;
  }

  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor uncond;
  if (cfg) uncond = uncond_in->stride(1) == 1 ? *uncond_in : uncond_in->contiguous();
  const float w = static_cast<float>(cfg_weight);
  auto tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto filtered_logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {tokens, logprobs, filtered_logprobs};

  const uint64_t seed_value = static_cast<uint64_t>(seed.data_ptr<int64_t>()[0]);
  const int64_t row_stride = logits.stride(0), uncond_stride = cfg ? uncond.stride(0) : 0;
  int64_t* tok = tokens.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
  float* flp = filtered_logprobs.data_ptr<float>();
  // The first row with bad logits and what is wrong with it (error_code), kept as a minimum.
  std::atomic<uint64_t> first_error{gpu::kNoError};
  auto mark_bad = [&](int64_t r) {
    tok[r] = -1;
    lp[r] = std::numeric_limits<float>::quiet_NaN();
    flp[r] = std::numeric_limits<float>::quiet_NaN();
    if (clp) clp[r] = std::numeric_limits<float>::quiet_NaN();
  };

  auto run = [&](auto* base, auto* ubase) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(base)>>;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      static thread_local Workspace ws;
      ws.reserve(v, cfg || !std::is_same_v<scalar_t, float>);
      for (int64_t r = begin; r < end; ++r) {
        if (bad_setting[static_cast<size_t>(r)]) {
          mark_bad(r);
          continue;
        }
        const scalar_t* c = base + r * row_stride;
        const float* x = cfg ? mixed_row(c, ubase + r * uncond_stride, v, w, ws) : row_as_float(c, v, ws);
        int64_t err = kOk;
        const RowResult res = sample_row(x, v, params[static_cast<size_t>(r)], seed_value, r, ws, &err);
        if (err != kOk) {
          const uint64_t code =
              error_code(gpu::kErrorLogits, r, err == kNonFinite ? gpu::kWhichNonFinite : gpu::kWhichNoFinite);
          uint64_t cur = first_error.load();
          while (code < cur && !first_error.compare_exchange_weak(cur, code)) {
          }
          mark_bad(r);
          if (!deferred) return;  // eager: the call raises, the other rows of this chunk do not matter
          continue;
        }
        tok[r] = res.token;
        lp[r] = res.logprob;
        flp[r] = res.filtered_logprob;
        if (clp) clp[r] = cfg ? cond_logprob(c, v, params[static_cast<size_t>(r)].temperature, res.token) : res.logprob;
      }
    });
  };
  if (dtype == at::kFloat) {
    run(logits.const_data_ptr<float>(), cfg ? uncond.const_data_ptr<float>() : nullptr);
  } else if (dtype == at::kBFloat16) {
    run(logits.const_data_ptr<at::BFloat16>(), cfg ? uncond.const_data_ptr<at::BFloat16>() : nullptr);
  } else {
    run(logits.const_data_ptr<at::Half>(), cfg ? uncond.const_data_ptr<at::Half>() : nullptr);
  }

  const uint64_t code = first_error.load();
  if (deferred) {
    int64_t* word = error->data_ptr<int64_t>();
    lower_error_word(word, setting_code, setting_bits);  // a bad setting comes before bad logits
    lower_error_word(word, code, 0);
  } else {
    raise_error_word(code, 0);
  }
  return {tokens, logprobs, filtered_logprobs};
}

// Raises the error recorded in a word written by fastrl::sample (a cpu copy of it), if any.
void sample_check(const at::Tensor& error) {
  TORCH_CHECK_VALUE(error.device().is_cpu() && error.scalar_type() == at::kLong && error.numel() == 2,
                    "error must be a cpu int64 tensor of two elements, got ", error.scalar_type(), " of shape ",
                    error.sizes(), " on ", error.device());
  const at::Tensor w = error.contiguous();
  raise_error_word(static_cast<uint64_t>(w.data_ptr<int64_t>()[0]), w.data_ptr<int64_t>()[1]);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrl, CPU, m) {
  m.impl("sample", &sample_cpu);
  m.impl("sample_check", &sample_check);
}

}  // namespace fastrl
