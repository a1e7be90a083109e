// torch.ops.sharedllm.cross_inject_attention / cross_inject_attention_backward on CUDA: checks and
// allocation shared with the CPU binding, the device guard and current stream, index values checked on
// the device by default (no host synchronisation).
#include "cross_inject_attention_binding.h"
#include "cuda_stream.h"
#include "ops.h"

namespace sharedllm::binding {
namespace {

// Called from the launchers, after the shared checks have validated the shapes.
void check_cuda_head_dims(const AttentionParams& p) {
  SHAREDLLM_CHECK(p.head_dim + p.v_dim <= cuda::kMaxHeadDims,
                  "the CUDA cross_inject_attention takes head dims with q.shape[2] + v.shape[2] <= ",
                  cuda::kMaxHeadDims, ", got ", p.head_dim, " + ", p.v_dim,
                  "; use backend='triton' or backend='reference'");
}

}  // namespace

std::tuple<Tensor, Tensor> cross_inject_attention_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin) {
  const DeviceGuard guard = device_guard(q);
  const int64_t nq = q.size(0), nk = k.size(0);
  return run_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, q_positions, k_positions,
                               rotary_cos, rotary_sin, cuda_value_checks(q),
                               [&](auto tag, const AttentionForwardParams& checked) {
                                 using T = typename decltype(tag)::type;
                                 check_cuda_head_dims(checked);
                                 AttentionForwardParams p = checked;
                                 const auto k_rotated = attach_k_rotated(p, k, cuda::rotates_k_once<T>(p));
                                 const int splits = cuda::attention_forward_splits<T>(p, nq, nk);
                                 const auto split = attach_split_scratch(p, q, splits);
                                 cuda::cross_inject_attention_forward<T>(p, nq, nk, current_stream(q));
                               });
}

std::tuple<Tensor, Tensor, Tensor> cross_inject_attention_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin) {
  const DeviceGuard guard = device_guard(q);
  const int64_t nq = q.size(0), nk = k.size(0);
  Tensor delta;  // float32 [Nq, Hq] scratch
  return run_attention_backward(
      grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale, q_positions, k_positions,
      rotary_cos, rotary_sin, cuda_value_checks(q), [&](auto tag, const AttentionBackwardParams& checked) {
        using T = typename decltype(tag)::type;
        check_cuda_head_dims(checked);
        AttentionBackwardParams p = checked;
        const auto k_rotated = attach_k_rotated(p, k, cuda::rotates_k_once<T>(p));
        const auto split = attach_backward_split_scratch(p, k, cuda::attention_backward_splits<T>(p, nq, nk));
        delta = new_tensor({nq, q.size(1)}, ScalarType::Float, q);
        cuda::cross_inject_attention_backward<T>(p, nq, nk, ptr<float>(delta), current_stream(q));
      });
}

}  // namespace sharedllm::binding
