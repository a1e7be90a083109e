// csrc/cuda/cross_inject_attention.cu compiled as host C++ against the CPU emulator in include/,
// behind torch.ops.sharedllm_emulated.cross_inject_attention(_backward) on CPU tensors, with the
// checks, allocation and scratch of the real binding and its choice of where index values are checked.
// Built by tests/test_cuda_emulated.py.
#include "cross_inject_attention_binding.h"

// after every torch header: the emulator's macros (__shared__, __device__, ...) are for the kernels
#include <cuda_runtime.h>

#include "../../csrc/cuda/cross_inject_attention.cu"

namespace {

using namespace sharedllm;
using binding::Tensor;

std::tuple<Tensor, Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const Tensor& cu_q, const Tensor& cu_k, double scale,
                                           const std::optional<Tensor>& q_pos,
                                           const std::optional<Tensor>& k_pos,
                                           const std::optional<Tensor>& cos,
                                           const std::optional<Tensor>& sin) {
  const int64_t nq = q.size(0), nk = k.size(0);
  return binding::run_attention_forward(q, k, v, cu_q, cu_k, scale, q_pos, k_pos, cos, sin,
                                        binding::cuda_value_checks_outside_graphs(),
                                        [&](auto tag, const AttentionForwardParams& checked) {
                                          using T = typename decltype(tag)::type;
                                          AttentionForwardParams p = checked;
                                          const auto k_rotated = binding::attach_k_rotated(p, k, cuda::rotates_k_once<T>(p));
                                          const auto split = binding::attach_split_scratch(
                                              p, q, cuda::attention_forward_splits<T>(p, nq, nk));
                                          cuda::cross_inject_attention_forward<T>(p, nq, nk, nullptr);
                                        });
}

std::tuple<Tensor, Tensor, Tensor> backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k,
    double scale, const std::optional<Tensor>& q_pos, const std::optional<Tensor>& k_pos,
    const std::optional<Tensor>& cos, const std::optional<Tensor>& sin) {
  const int64_t nq = q.size(0), nk = k.size(0);
  Tensor delta = torch::stable::full({nq, q.size(1)}, NAN, binding::ScalarType::Float, std::nullopt, q.device());
  return binding::run_attention_backward(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, scale, q_pos, k_pos, cos,
                                         sin, binding::cuda_value_checks_outside_graphs(),
                                         [&](auto tag, const AttentionBackwardParams& checked) {
                                           using T = typename decltype(tag)::type;
                                           AttentionBackwardParams p = checked;
                                           const auto k_rotated = binding::attach_k_rotated(p, k, cuda::rotates_k_once<T>(p));
                                           const auto split = binding::attach_backward_split_scratch(
                                               p, k, cuda::attention_backward_splits<T>(p, nq, nk));
                                           cuda::cross_inject_attention_backward<T>(p, nq, nk, binding::ptr<float>(delta),
                                                                                    nullptr);
                                         });
}

// Value reads on the host by the bindings of this build, so far (each a device-to-host copy on a GPU).
int64_t host_value_reads(const Tensor&) { return binding::host_value_reads().load(); }

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(SHAREDLLM_EMULATED_OPS, m) {
  m.def("cross_inject_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "float softmax_scale, Tensor? q_positions, Tensor? k_positions, Tensor? rotary_cos, Tensor? rotary_sin) -> "
      "(Tensor out, Tensor lse)");
  m.def("cross_inject_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float softmax_scale, "
      "Tensor? q_positions, Tensor? k_positions, Tensor? rotary_cos, Tensor? rotary_sin) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("host_value_reads(Tensor any) -> int");
}

STABLE_TORCH_LIBRARY_IMPL(SHAREDLLM_EMULATED_OPS, CPU, m) {
  m.impl("cross_inject_attention", TORCH_BOX(&forward));
  m.impl("cross_inject_attention_backward", TORCH_BOX(&backward));
  m.impl("host_value_reads", TORCH_BOX(&host_value_reads));
}
