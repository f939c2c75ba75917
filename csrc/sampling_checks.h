// The argument checks of fastrl::sample shared by its CPU op (csrc/sampling.cpp) and its CUDA glue
// (csrc/cuda/sampling_ops.cpp): both devices raise the same ValueError messages.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

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

}  // namespace fastrl
