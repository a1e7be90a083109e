// torch.ops.sharedllm.cross_inject_attention / cross_inject_attention_backward on CPU.
#include "attention_binding.h"
#include "ops.h"

namespace sharedllm::binding {

std::tuple<at::Tensor, at::Tensor> cross_inject_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, double softmax_scale, const std::optional<at::Tensor>& q_positions,
    const std::optional<at::Tensor>& k_positions, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin) {
  return run_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, q_positions, k_positions,
                               rotary_cos, rotary_sin, /*read_values=*/true, [](auto tag, const AttentionForwardParams& p) {
                                 cpu::cross_inject_attention_forward<typename decltype(tag)::type>(p);
                               });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_inject_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, double softmax_scale, const std::optional<at::Tensor>& q_positions,
    const std::optional<at::Tensor>& k_positions, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin) {
  return run_attention_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                q_positions, k_positions, rotary_cos, rotary_sin, /*read_values=*/true,
                                [](auto tag, const AttentionBackwardParams& p) {
                                  cpu::cross_inject_attention_backward<typename decltype(tag)::type>(p);
                                });
}

}  // namespace sharedllm::binding
