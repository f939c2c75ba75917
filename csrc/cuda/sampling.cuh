// The CUDA token sampler's launcher API: plain pointers and numbers, no torch and no CUDA headers.
//
// sampling.cu (the kernel) needs only the CUDA toolkit; sampling_ops.cpp (the torch glue: checks,
// stream, TORCH_LIBRARY_IMPL) includes this file. The split lets nvcc compile-check the kernel on
// machines whose torch is a CPU build (its wheel lacks c10/cuda/impl/cuda_cmake_macros.h).
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace fastrl {
namespace gpu {

enum class LogitsType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Probability masses are summed as 40-bit fixed point in 64-bit integers (exact and
// order-independent, hence deterministic); V * 2^40 must fit in 64 bits.
constexpr int64_t kMaxVocab = int64_t{1} << 23;

// What went wrong, reported as the minimum over rows of (kind << 60) | (row << 3) | which, so that a
// bad setting in any row is reported before bad logits, and the first row first (as the CPU
// sampler does). kNoError when every row was fine. The error word is two 64-bit words: [0] that
// code, [1] the bits of the bad setting's value (a double; top_k: the int64 itself) when [0] is a
// setting error. The CPU op writes the same two words (csrc/sampling_checks.h decodes them).
constexpr unsigned long long kNoError = ~0ull;
constexpr int kErrorSetting = 0;  // which: 0 temperature, 1 top_k, 2 top_p, 3 min_p
constexpr int kErrorLogits = 1;   // which: 4 NaN or +inf, 5 no finite value
constexpr int kWhichNonFinite = 4;
constexpr int kWhichNoFinite = 5;

struct SampleArgs {
  const void* logits;  // [rows, vocab], element stride 1, row stride row_stride (elements)
  LogitsType dtype;
  int64_t rows, vocab, row_stride;
  const int64_t* seed_ptr;  // device pointer to the seed, or nullptr: seed_value
  uint64_t seed_value;
  double temperature;  // per-row arrays (device, may be nullptr) override these scalars
  int64_t top_k;
  double top_p, min_p;
  const double* temperatures;
  const int64_t* top_ks;
  const double* top_ps;
  const double* min_ps;
  int64_t* tokens;  // outputs [rows] (device); a bad row gets token -1 and NaN log-probs
  float* logprobs;
  float* filtered_logprobs;
  // Two words (device, see kNoError). Word 0 is lowered by bad rows (atomicMin), word 1 written with
  // it for a setting error. Without `accumulate` launch_sample first resets word 0 to kNoError (one
  // call's errors, read back by an eager call); with it the caller's word keeps the smallest code
  // over every call since the caller reset it (a deferred check: no host sync per call).
  unsigned long long* error;
  bool accumulate;
  // Rows split into `chunks` column chunks for the first pass (1: not split; see sample_chunks).
  // A split launch runs a first kernel with rows * chunks blocks, each writing the partial results of
  // its chunk (maximum, normaliser, first maximum and ties, invalid entries: one record per warp) to
  // `workspace` (sample_workspace_bytes), which the per-row kernel then combines instead of reading
  // the row a first time.
  int chunks;
  void* workspace;
  // Classifier-free guidance: with `uncond` (device, logits' dtype and shape, element stride 1, row
  // stride uncond_stride) every element read is the fp32 mix u + (c - u) * cfg_weight (c from logits),
  // rounded step by step; nullptr: the plain sampler. `cond_logprobs` (device [rows] or nullptr; only
  // with uncond) receives each token's log-prob under softmax(c / T), the conditional branch alone.
  const void* uncond;
  int64_t uncond_stride;
  float cfg_weight;
  float* cond_logprobs;
};

// How many chunks to split each row into for a launch of `rows` rows on a GPU with `sm_count` SMs:
// 1 when the rows alone fill the SMs, else enough to give every SM a few blocks, chunks no shorter
// than a minimum length (at most 128). And the workspace a split launch needs (bytes; 0 when 1 chunk).
// A split launch of a guided call that asks for cond_logprobs (`cond`) keeps a second set of records,
// the conditional branch's.
int sample_chunks(int64_t rows, int64_t vocab, int sm_count);
int64_t sample_workspace_bytes(int64_t rows, int chunks, bool cond = false);

// Enqueues the error reset and the kernel on `stream`; returns a cudaError_t (0 = success).
int launch_sample(const SampleArgs& args, CUstream_st* stream);

// Bytes of dynamic shared memory per block and threads per block (for tests and reports).
int sample_shared_bytes();
int sample_threads();

}  // namespace gpu
}  // namespace fastrl
