// Schemas of every fastrl C++ op, and the Python module `fastrl._C` that loads them.
//
// Kernels register against these schemas per backend with TORCH_LIBRARY_IMPL (the CPU sampler in
// sampling.cpp, CUDA kernels under csrc/cuda/). Fake (meta) implementations, for torch.compile,
// live next to the Python face of each op.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(fastrl, m) {
  // Draw one token per row of `logits` [B, V] after temperature, top-k, top-p and min-p filtering.
  // Scalars apply to every row unless the matching per-row tensor ([B]) is given. `seed` is an int64
  // tensor of one element (a fresh draw from a torch.Generator per call). Returns tokens [B] int64,
  // the log-prob of each token under softmax(logits / T), and its log-prob under the filtered,
  // renormalised distribution it was drawn from (both fp32). Bad rows raise ValueError, unless an
  // `error` word (int64 [2] on logits' device) is given: then a bad row gets token -1 and NaN log-probs,
  // the word keeps the smallest error code (no host sync), and sample_check on a cpu copy raises it.
  // Classifier-free guidance: with `uncond` (the unconditional logits, logits' shape and dtype) and
  // cfg_weight w != 1 the op samples from the mix u + (c - u) * w, formed in fp32 per element as it
  // reads the rows (a -inf in either branch bans the token; NaN or +inf in either makes the row bad);
  // w == 1 ignores uncond. `cond_logprobs` (fp32 [B], written in place, if given) receives the log-prob
  // of each token under softmax(logits / T), the conditional branch alone (the log-prob output when
  // there is no mix). Rows may be strided views (element stride 1), e.g. a range of the vocabulary.
  m.def(
      "sample(Tensor logits, Tensor seed, float temperature, int top_k, float top_p, float min_p, "
      "Tensor? temperatures, Tensor? top_ks, Tensor? top_ps, Tensor? min_ps, Tensor(a!)? error=None, "
      "Tensor? uncond=None, float cfg_weight=1.0, Tensor(b!)? cond_logprobs=None) "
      "-> (Tensor, Tensor, Tensor)",
      {at::Tag::nondeterministic_seeded});
  // Raises the ValueError recorded in a (cpu) error word of fastrl::sample, if any.
  m.def("sample_check(Tensor error) -> ()");
}

// Sampling has no gradient: its outputs never join the autograd graph, whatever the logits are.
TORCH_LIBRARY_IMPL(fastrl, Autograd, m) { m.impl("sample", torch::CppFunction::makeFallthrough()); }

namespace {

bool cuda_enabled() {
#ifdef FASTRL_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The widest instruction set the vectorised CPU loops dispatch to on this machine.
std::string cpu_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "sse2";
#else
  return "generic";
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastrl C++ extension: registers the torch.ops.fastrl.* operators";
  m.def("cuda_enabled", &cuda_enabled, "True when the extension was built with its CUDA kernels");
  m.def("cpu_isa", &cpu_isa, "Instruction set the CPU kernels use on this machine");
}
