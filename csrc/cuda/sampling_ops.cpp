// Torch glue of the CUDA sampler: the checks of the CPU sampler, the current stream, errors raised
// as ValueError (eager calls: one small device-to-host copy; with an error word: none, the caller
// checks the word later), and the registration of fastrl::sample for CUDA tensors. The kernel and its launcher
// are in sampling.cu (CUDA toolkit only); this file needs torch's CUDA headers, so it is compiled in
// CUDA builds only (setup.py adds csrc/cuda/*.cpp with the .cu files).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../sampling_checks.h"
#include "sampling.cuh"

namespace fastrl {
namespace {

// Scalar settings (those without a per-row tensor) are checked here, before the launch.
void check_scalar_settings(int64_t rows, double temperature, int64_t top_k, double top_p, double min_p,
                           bool per_row_t, bool per_row_k, bool per_row_p, bool per_row_mp) {
  if (rows == 0) return;
  if (!per_row_t) check_temperature(temperature, 0);
  if (!per_row_k) check_top_k(top_k, 0);
  if (!per_row_p) check_top_p(top_p, 0);
  if (!per_row_mp) check_min_p(min_p, 0);
}

// Streaming multiprocessors of a device (looked up once per device; a benign race).
int sm_count(int device) {
  static int known[64] = {};
  if (device >= 0 && device < 64 && known[device] > 0) return known[device];
  int n = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) == cudaSuccess,
              "fastrl.sample: cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount) failed");
  if (device >= 0 && device < 64) known[device] = n;
  return n;
}

// An eager call raises like the CPU sampler: one 16-byte device-to-host copy (a sync), the only one
// of the call. Not while the stream is captured into a CUDA graph, where a bad row shows as token -1
// and NaN log-probs instead (pass an error word to check it later).
void raise_if_error(const at::Tensor& error, cudaStream_t stream) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  TORCH_CHECK(cudaStreamIsCapturing(stream, &capture) == cudaSuccess, "fastrl.sample: cudaStreamIsCapturing failed");
  if (capture != cudaStreamCaptureStatusNone) return;
  const at::Tensor word = error.cpu();
  raise_error_word(static_cast<uint64_t>(word.data_ptr<int64_t>()[0]), word.data_ptr<int64_t>()[1]);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cuda(
    const at::Tensor& logits_in, const at::Tensor& seed, double temperature, int64_t top_k, double top_p,
    double min_p, const std::optional<at::Tensor>& temperatures, const std::optional<at::Tensor>& top_ks,
    const std::optional<at::Tensor>& top_ps, const std::optional<at::Tensor>& min_ps,
    const std::optional<at::Tensor>& error_word, const std::optional<at::Tensor>& uncond_in, double cfg_weight,
    const std::optional<at::Tensor>& cond_logprobs) {
  check_logits(logits_in);
  check_cfg_weight(cfg_weight);
  if (uncond_in.has_value()) check_uncond(*uncond_in, logits_in);
  const bool cfg = uncond_in.has_value() && cfg_weight != 1.0;  // w == 1: the plain path, uncond unread
  float* clp = cond_logprobs_out(cond_logprobs, logits_in);
  const auto dtype = logits_in.scalar_type();
  TORCH_CHECK_VALUE(logits_in.is_cuda(), "logits must be a CUDA tensor here, got ", logits_in.device());
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() >= 1 &&
                        (seed.device().is_cpu() || seed.device() == logits_in.device()),
                    "seed must be an int64 tensor with one element, on the cpu or on logits' device");
  const int64_t rows = logits_in.size(0), v = logits_in.size(1);
  TORCH_CHECK_VALUE(v >= 1, "logits must have a non-empty vocabulary dimension");
  TORCH_CHECK_VALUE(v <= gpu::kMaxVocab, "the CUDA sampler takes vocabularies of at most ", gpu::kMaxVocab,
                    " tokens, got ", v);
  TORCH_CHECK_VALUE(rows <= INT32_MAX, "the CUDA sampler takes at most 2^31 - 1 rows, got ", rows);

  const c10::cuda::CUDAGuard guard(logits_in.device());
  const double* t_row = row_setting<double>(temperatures, logits_in, at::kDouble, "temperature");
  const int64_t* k_row = row_setting<int64_t>(top_ks, logits_in, at::kLong, "top_k");
  const double* p_row = row_setting<double>(top_ps, logits_in, at::kDouble, "top_p");
  const double* mp_row = row_setting<double>(min_ps, logits_in, at::kDouble, "min_p");
  check_scalar_settings(rows, temperature, top_k, top_p, min_p, t_row, k_row, p_row, mp_row);
  const bool deferred = error_word.has_value();
  if (deferred) check_error_word(*error_word, logits_in);

  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor uncond;  // guided: read as it is too (a row-strided view, e.g. a vocabulary range, is not copied)
  if (cfg) uncond = uncond_in->stride(1) == 1 ? *uncond_in : uncond_in->contiguous();
  auto tokens = at::empty({rows}, logits.options().dtype(at::kLong));
  auto logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  auto filtered_logprobs = at::empty({rows}, logits.options().dtype(at::kFloat));
  if (rows == 0) return {tokens, logprobs, filtered_logprobs};
  // Deferred: the caller's word, lowered in place. Eager: this call's own, reset by launch_sample.
  const at::Tensor error = deferred ? *error_word : at::empty({2}, logits.options().dtype(at::kLong));

  gpu::SampleArgs a{};
  a.logits = logits.const_data_ptr();
  a.dtype = dtype == at::kFloat      ? gpu::LogitsType::kFloat32
            : dtype == at::kBFloat16 ? gpu::LogitsType::kBFloat16
                                     : gpu::LogitsType::kFloat16;
  a.rows = rows;
  a.vocab = v;
  a.row_stride = logits.stride(0);
  if (seed.device().is_cpu()) {
    a.seed_value = static_cast<uint64_t>(seed.contiguous().const_data_ptr<int64_t>()[0]);  // host memory
  } else {
    a.seed_ptr = seed.const_data_ptr<int64_t>();  // read by the kernel: no sync, graph-capturable
  }
  a.temperature = temperature;
  a.top_k = top_k;
  a.top_p = top_p;
  a.min_p = min_p;
  a.temperatures = t_row;
  a.top_ks = k_row;
  a.top_ps = p_row;
  a.min_ps = mp_row;
  a.tokens = tokens.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr<float>();
  a.filtered_logprobs = filtered_logprobs.data_ptr<float>();
  a.error = reinterpret_cast<unsigned long long*>(error.data_ptr<int64_t>());
  a.accumulate = deferred;
  if (cfg) {
    a.uncond = uncond.const_data_ptr();
    a.uncond_stride = uncond.stride(0);
    a.cfg_weight = static_cast<float>(cfg_weight);
    a.cond_logprobs = clp;
  }
  // Fewer rows than SMs: the first pass runs over row chunks on many blocks (workspace for its records).
  a.chunks = gpu::sample_chunks(rows, v, sm_count(logits.device().index()));
  at::Tensor workspace;
  if (a.chunks > 1) {
    workspace = at::empty({gpu::sample_workspace_bytes(rows, a.chunks, a.cond_logprobs != nullptr)},
                          logits.options().dtype(at::kByte));
    a.workspace = workspace.data_ptr();
  }

  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int rc = gpu::launch_sample(a, stream);
  TORCH_CHECK(rc == 0, "fastrl.sample: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(rc)));

  if (clp && !cfg) cond_logprobs->copy_(logprobs);  // no guidance: the conditional branch is what was sampled
  // Deferred: nothing more here; the caller reads the word when it checks (fastrl.sampling.SampleErrors).
  if (deferred) return {tokens, logprobs, filtered_logprobs};
  raise_if_error(error, stream);
  return {tokens, logprobs, filtered_logprobs};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrl, CUDA, m) { m.impl("sample", &sample_cuda); }

}  // namespace fastrl
