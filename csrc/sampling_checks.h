// The argument checks of fastrl::sample shared by its CPU op (csrc/sampling.cpp) and its CUDA glue
// (csrc/cuda/sampling_ops.cpp): both devices raise the same ValueError messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cuda/sampling.cuh"  // the error word's encoding (plain constants, no CUDA headers)

namespace fastrl {

// logits: 2-D [rows, vocab], float32 / bfloat16 / float16.
inline void check_logits(const at::Tensor& logits) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must be 2-D [rows, vocab], got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    "logits must be float32, bfloat16 or float16, got ", dtype);
}

// The per-row override of a setting (one value per row of logits, on logits' device), or nullptr.
template <typename T>
const T* row_setting(const std::optional<at::Tensor>& t, const at::Tensor& logits, at::ScalarType dtype,
                     const char* name) {
  if (!t.has_value()) return nullptr;
  const int64_t rows = logits.size(0);
  TORCH_CHECK_VALUE(t->device() == logits.device(), name, " must be on the same device as logits (",
                    logits.device(), "), got ", t->device());
  TORCH_CHECK_VALUE(t->scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == rows, name, " must have shape [", rows,
                    "] (one value per row of logits), got ", t->sizes());
  TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
  return t->const_data_ptr<T>();
}

// The unconditional logits of classifier-free guidance: the shape, dtype and device of logits.
inline void check_uncond(const at::Tensor& uncond, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(uncond.device() == logits.device(), "uncond must be on the same device as logits (",
                    logits.device(), "), got ", uncond.device());
  TORCH_CHECK_VALUE(uncond.scalar_type() == logits.scalar_type(), "uncond must have the dtype of logits (",
                    logits.scalar_type(), "), got ", uncond.scalar_type());
  TORCH_CHECK_VALUE(uncond.sizes() == logits.sizes(), "uncond must have the shape of logits ", logits.sizes(),
                    ", got ", uncond.sizes());
}

inline void check_cfg_weight(double w) {
  TORCH_CHECK_VALUE(std::isfinite(w) && w >= 0.0, "cfg_weight must be finite and >= 0, got ", w);
}

// The output of the conditional branch's log-probs: fp32 [rows], contiguous, on logits' device.
inline float* cond_logprobs_out(const std::optional<at::Tensor>& out, const at::Tensor& logits) {
  if (!out.has_value()) return nullptr;
  TORCH_CHECK_VALUE(out->device() == logits.device(), "cond_logprobs must be on the same device as logits (",
                    logits.device(), "), got ", out->device());
  TORCH_CHECK_VALUE(out->scalar_type() == at::kFloat && out->dim() == 1 && out->size(0) == logits.size(0) &&
                        out->is_contiguous(),
                    "cond_logprobs must be a contiguous float32 tensor of shape [", logits.size(0), "], got ",
                    out->scalar_type(), " of shape ", out->sizes());
  return out->data_ptr<float>();
}

// One setting's value for `row`.
inline void check_temperature(double value, int64_t row) {
  TORCH_CHECK_VALUE(value >= 0.0 && std::isfinite(value), "temperature must be finite and >= 0, got ", value,
                    " for row ", row);
}
inline void check_top_k(int64_t value, int64_t row) {
  TORCH_CHECK_VALUE(value >= 0, "top_k must be >= 0 (0 disables it), got ", value, " for row ", row);
}
inline void check_top_p(double value, int64_t row) {
  TORCH_CHECK_VALUE(value > 0.0 && value <= 1.0, "top_p must be in (0, 1], got ", value, " for row ", row);
}
inline void check_min_p(double value, int64_t row) {
  TORCH_CHECK_VALUE(value >= 0.0 && value <= 1.0, "min_p must be in [0, 1], got ", value, " for row ", row);
}

// The error word of fastrl::sample (two int64: the code and a bad setting's value bits; see
// csrc/cuda/sampling.cuh), written by both devices' ops. An error word passed in defers the checks
// of a call's rows: it must be int64 with two elements on logits' device.
inline void check_error_word(const at::Tensor& error, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(error.device() == logits.device(), "error must be on the same device as logits (",
                    logits.device(), "), got ", error.device());
  TORCH_CHECK_VALUE(error.scalar_type() == at::kLong && error.numel() == 2 && error.is_contiguous(),
                    "error must be a contiguous int64 tensor of two elements (fastrl.sampling.SampleErrors), got ",
                    error.scalar_type(), " of shape ", error.sizes());
}

inline uint64_t error_code(int kind, int64_t row, int which) {
  return (static_cast<uint64_t>(kind) << 60) | (static_cast<uint64_t>(row) << 3) | static_cast<uint64_t>(which);
}

// Lowers the word [code, value bits] (host memory) with one call's first error.
inline void lower_error_word(int64_t* word, uint64_t code, int64_t value_bits) {
  if (code < static_cast<uint64_t>(word[0])) {
    word[0] = static_cast<int64_t>(code);
    word[1] = value_bits;
  }
}

// Raises the ValueError an eager call gives for the error recorded in the word; nothing if none.
inline void raise_error_word(uint64_t code, int64_t value_bits) {
  if (code == gpu::kNoError) return;
  const int kind = static_cast<int>(code >> 60), which = static_cast<int>(code & 7u);
  const int64_t row = static_cast<int64_t>((code >> 3) & ((uint64_t{1} << 57) - 1));
  if (kind == gpu::kErrorSetting) {
    double value;
    std::memcpy(&value, &value_bits, sizeof(value));
    switch (which) {  // each raises for the out-of-range value it was recorded with
      case 0:
        check_temperature(value, row);
        break;
      case 1:
        check_top_k(value_bits, row);
        break;
      case 2:
        check_top_p(value, row);
        break;
      default:
        check_min_p(value, row);
    }
    TORCH_CHECK_VALUE(false, "sampling setting ", which, " of row ", row, " is out of range");
  }
  TORCH_CHECK_VALUE(which != gpu::kWhichNonFinite, "logits must not contain NaN or +inf (row ", row, ")");
  TORCH_CHECK_VALUE(false, "logits row ", row, " has no finite value (every entry is -inf)");
}

}  // namespace fastrl
