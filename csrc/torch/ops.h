// The CPU (and, in CUDA builds, CUDA) implementations behind torch.ops.sharedllm.*, as registered
// in registration.cpp. Each wrapper validates its inputs, allocates outputs and calls the
// torch-free kernel in csrc/cpu or csrc/cuda.
#pragma once

#include "torch_api.h"

#include <optional>
#include <string>
#include <tuple>

namespace sharedllm::binding {

Tensor chunk_pool_cpu(const Tensor& x, const Tensor& cu_seqlens, int64_t tokens_per_node,
                          const std::string& mode);
Tensor chunk_pool_backward_cpu(const Tensor& grad_out, const Tensor& cu_seqlens, int64_t num_rows,
                                   int64_t tokens_per_node, const std::string& mode);

std::tuple<Tensor, Tensor> tree_topk_cpu(const Tensor& query, const Tensor& node_emb, int64_t depth,
                                                 int64_t k, int64_t branching, const std::string& score);

std::tuple<Tensor, Tensor> cross_inject_attention_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin);

std::tuple<Tensor, Tensor, Tensor> cross_inject_attention_backward_cpu(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin);

#ifdef SHAREDLLM_WITH_CUDA
Tensor chunk_pool_cuda(const Tensor& x, const Tensor& cu_seqlens, int64_t tokens_per_node,
                           const std::string& mode);
Tensor chunk_pool_backward_cuda(const Tensor& grad_out, const Tensor& cu_seqlens, int64_t num_rows,
                                    int64_t tokens_per_node, const std::string& mode);
std::tuple<Tensor, Tensor> tree_topk_cuda(const Tensor& query, const Tensor& node_emb, int64_t depth,
                                                  int64_t k, int64_t branching, const std::string& score);
std::tuple<Tensor, Tensor> cross_inject_attention_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin);
std::tuple<Tensor, Tensor, Tensor> cross_inject_attention_backward_cuda(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin);
#endif

std::string build_info();

}  // namespace sharedllm::binding
