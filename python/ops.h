// The CPU (and, in CUDA builds, CUDA) implementations behind torch.ops.sharedllm.*, as registered
// in registration.cpp. Each wrapper validates its inputs, allocates outputs and calls the
// torch-free kernel in csrc/.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace sharedllm::binding {

at::Tensor chunk_pool_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t tokens_per_node,
                          c10::string_view mode);
at::Tensor chunk_pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& cu_seqlens, int64_t num_rows,
                                   int64_t tokens_per_node, c10::string_view mode);

std::tuple<at::Tensor, at::Tensor> tree_topk_cpu(const at::Tensor& query, const at::Tensor& node_emb, int64_t depth,
                                                 int64_t k, int64_t branching, c10::string_view score);

std::tuple<at::Tensor, at::Tensor> cross_inject_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, double softmax_scale, const std::optional<at::Tensor>& q_positions,
    const std::optional<at::Tensor>& k_positions, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin);

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_inject_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, double softmax_scale, const std::optional<at::Tensor>& q_positions,
    const std::optional<at::Tensor>& k_positions, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin);

#ifdef SHAREDLLM_WITH_CUDA
at::Tensor chunk_pool_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t tokens_per_node,
                           c10::string_view mode);
at::Tensor chunk_pool_backward_cuda(const at::Tensor& grad_out, const at::Tensor& cu_seqlens, int64_t num_rows,
                                    int64_t tokens_per_node, c10::string_view mode);
std::tuple<at::Tensor, at::Tensor> tree_topk_cuda(const at::Tensor& query, const at::Tensor& node_emb, int64_t depth,
                                                  int64_t k, int64_t branching, c10::string_view score);
std::tuple<at::Tensor, at::Tensor> cross_inject_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, double softmax_scale, const std::optional<at::Tensor>& q_positions,
    const std::optional<at::Tensor>& k_positions, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin);
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_inject_attention_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, double softmax_scale, const std::optional<at::Tensor>& q_positions,
    const std::optional<at::Tensor>& k_positions, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin);
#endif

std::string build_info();

}  // namespace sharedllm::binding
