// torch.ops.sharedllm.cross_inject_attention / cross_inject_attention_backward on CPU.
#include "cross_inject_attention_binding.h"
#include "ops.h"

namespace sharedllm::binding {

std::tuple<Tensor, Tensor> cross_inject_attention_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin) {
  return run_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, q_positions, k_positions,
                               rotary_cos, rotary_sin, ValueChecks::kHost, [](auto tag, const AttentionForwardParams& p) {
                                 cpu::cross_inject_attention_forward<typename decltype(tag)::type>(p);
                               });
}

std::tuple<Tensor, Tensor, Tensor> cross_inject_attention_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin) {
  return run_attention_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                q_positions, k_positions, rotary_cos, rotary_sin, ValueChecks::kHost,
                                [](auto tag, const AttentionBackwardParams& p) {
                                  cpu::cross_inject_attention_backward<typename decltype(tag)::type>(p);
                                });
}

}  // namespace sharedllm::binding
