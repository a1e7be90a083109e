// The binding of cross_inject_attention shared by its CPU and CUDA implementations: argument checks
// (every failure names the argument), output allocation and kernel parameters.
// Each backend passes its launcher and where the index values are checked (ValueChecks: the CPU binding
// on the host, the CUDA binding on the device by default).
#pragma once

#include <optional>
#include <tuple>

#include "checks.h"
#include "sharedllm/cross_inject_attention.h"

namespace sharedllm::binding {

// Validated views of the arguments common to forward and backward.
struct AttentionInputs {
  int64_t batch, hq, hk, d, dv, nq, nk;
  Tensor cu_q, cu_k;              // contiguous int32
  Tensor q_pos, k_pos, cos, sin;  // contiguous; undefined without rotary
};

inline AttentionInputs check_attention_inputs(const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                       const std::optional<Tensor>& q_positions,
                                       const std::optional<Tensor>& k_positions,
                                       const std::optional<Tensor>& rotary_cos,
                                       const std::optional<Tensor>& rotary_sin, bool read_values = true) {
  check_rank(q, 3, "q", "[Nq, Hq, D]");
  check_rank(k, 3, "k", "[Nk, Hk, D]");
  check_rank(v, 3, "v", "[Nk, Hk, Dv]");
  check_float_dtype(q, "q");
  check_same_dtype(k, q, "k", "q");
  check_same_dtype(v, q, "v", "q");
  check_same_device(k, q, "k", "q");
  check_same_device(v, q, "v", "q");
  check_same_device(cu_seqlens_q, q, "cu_seqlens_q", "q");
  check_same_device(cu_seqlens_k, q, "cu_seqlens_k", "q");
  check_last_dim_contiguous(q, "q");
  check_last_dim_contiguous(k, "k");
  check_last_dim_contiguous(v, "v");
  AttentionInputs in;
  in.nq = q.size(0), in.hq = q.size(1), in.d = q.size(2);
  in.nk = k.size(0), in.hk = k.size(1), in.dv = v.size(2);
  SHAREDLLM_CHECK(in.d >= 1 && in.dv >= 1, "head dims must be >= 1, got q.shape[2] = ", in.d, " and v.shape[2] = ",
                    in.dv);
  SHAREDLLM_CHECK(k.size(2) == in.d, "k.shape[2] must equal q.shape[2] = ", in.d, ", got ", k.size(2));
  SHAREDLLM_CHECK(v.size(0) == in.nk && v.size(1) == in.hk, "v.shape[:2] must equal k.shape[:2] = [", in.nk, ", ",
                    in.hk, "], got ", shape_of(v));
  SHAREDLLM_CHECK(in.hk >= 1 && in.hq % in.hk == 0, "the number of query heads (q.shape[1] = ", in.hq,
                    ") must be a multiple of the number of kv heads (k.shape[1] = ", in.hk, ")");
  check_cu_seqlens(cu_seqlens_q, in.nq, "cu_seqlens_q", "q.shape[0]", read_values);
  check_cu_seqlens(cu_seqlens_k, in.nk, "cu_seqlens_k", "k.shape[0]", read_values);
  SHAREDLLM_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got ",
                    cu_seqlens_q.size(0) - 1, " and ", cu_seqlens_k.size(0) - 1);
  in.batch = cu_seqlens_q.size(0) - 1;
  in.cu_q = as_contiguous(cu_seqlens_q);
  in.cu_k = as_contiguous(cu_seqlens_k);
  const bool any_rotary = rotary_cos.has_value() || rotary_sin.has_value() || q_positions.has_value() ||
                          k_positions.has_value();
  if (any_rotary) {
    SHAREDLLM_CHECK(rotary_cos.has_value() && rotary_sin.has_value() && q_positions.has_value() &&
                          k_positions.has_value(),
                      "the fused rotary needs all of rotary_cos, rotary_sin, q_positions and k_positions");
    SHAREDLLM_CHECK(in.d % 2 == 0, "the fused rotary needs an even head dim, got q.shape[2] = ", in.d);
    const Tensor& cos = *rotary_cos;
    const Tensor& sin = *rotary_sin;
    check_rank(cos, 2, "rotary_cos", "[max_pos, D]");
    SHAREDLLM_CHECK(cos.size(1) == in.d, "rotary_cos.shape[1] must equal the head dim ", in.d, ", got ",
                      cos.size(1));
    SHAREDLLM_CHECK(same_shape(sin, cos), "rotary_sin must have the shape of rotary_cos ", shape_of(cos),
                      ", got ", shape_of(sin));
    // (an empty table would also pass for no rotary on the device, where a null pointer means none)
    SHAREDLLM_CHECK(cos.size(0) >= 1 || in.nq + in.nk == 0, "rotary_cos must have at least one row (a position)");
    SHAREDLLM_CHECK(is_float_type(cos.scalar_type()) && is_float_type(sin.scalar_type()),
                      "rotary_cos and rotary_sin must be floating point");
    check_same_device(cos, q, "rotary_cos", "q");
    check_same_device(sin, q, "rotary_sin", "q");
    check_same_device(*q_positions, q, "q_positions", "q");
    check_same_device(*k_positions, q, "k_positions", "q");
    check_positions(*q_positions, in.nq, cos.size(0), "q_positions", read_values);
    check_positions(*k_positions, in.nk, cos.size(0), "k_positions", read_values);
    in.q_pos = as_contiguous(*q_positions);
    in.k_pos = as_contiguous(*k_positions);
    in.cos = as_contiguous(to_dtype(cos, ScalarType::Float));
    in.sin = as_contiguous(to_dtype(sin, ScalarType::Float));
  }
  return in;
}

inline void fill_params(AttentionParams& p, const AttentionInputs& in, const Tensor& q, const Tensor& k,
                 const Tensor& v, double softmax_scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens_q = ptr<int32_t>(in.cu_q);
  p.cu_seqlens_k = ptr<int32_t>(in.cu_k);
  p.batch = in.batch, p.num_q_heads = in.hq, p.num_kv_heads = in.hk, p.head_dim = in.d, p.v_dim = in.dv;
  p.q_row_stride = q.stride(0), p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0), p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0), p.v_head_stride = v.stride(1);
  p.softmax_scale = static_cast<float>(softmax_scale);
  if (in.cos.defined()) {
    p.rotary.q_positions = ptr<int32_t>(in.q_pos);
    p.rotary.k_positions = ptr<int32_t>(in.k_pos);
    p.rotary.cos = ptr<float>(in.cos);
    p.rotary.sin = ptr<float>(in.sin);
    p.rotary.max_pos = in.cos.size(0);
  }
}


// CUDA: scratch of k's shape and dtype for k rotated once per call (AttentionParams::k_rotated), set in
// `p` when the kernels use it (`use`: cuda::rotates_k_once); keep the returned tensor until the kernels
// are enqueued (the caching allocator orders its reuse on the stream).
inline std::optional<Tensor> attach_k_rotated(AttentionParams& p, const Tensor& k, bool use) {
  if (!use || k.numel() == 0) return std::nullopt;
  Tensor scratch = new_tensor_like(k, {k.size(0), k.size(1), k.size(2)});
  p.k_rotated = scratch.data_ptr();
  return scratch;
}

// CUDA: the float32 scratch of a forward split over the keys (AttentionForwardParams::num_splits; `splits`:
// cuda::attention_forward_splits), set in `p`; keep the returned tensors until the kernels are enqueued.
inline std::optional<std::tuple<Tensor, Tensor>> attach_split_scratch(AttentionForwardParams& p, const Tensor& q,
                                                                       int splits) {
  if (splits <= 1) return std::nullopt;
  const int64_t nq = q.size(0), hq = q.size(1);
  Tensor out = new_tensor({splits, nq, hq, p.v_dim}, ScalarType::Float, q);
  Tensor lse = new_tensor({splits, nq, hq}, ScalarType::Float, q);
  p.num_splits = splits;
  p.split_out = ptr<float>(out);
  p.split_lse = ptr<float>(lse);
  return std::make_tuple(out, lse);
}

// CUDA: the float32 scratch of a split dK/dV (AttentionBackwardParams::num_splits; `splits`:
// cuda::attention_backward_splits), set in `p`; keep the returned tensors until the kernels are enqueued.
inline std::optional<std::tuple<Tensor, Tensor>> attach_backward_split_scratch(AttentionBackwardParams& p,
                                                                                const Tensor& k, int splits) {
  if (splits <= 1) return std::nullopt;
  const int64_t nk = k.size(0), hk = k.size(1);
  Tensor dk = new_tensor({splits, nk, hk, p.head_dim}, ScalarType::Float, k);
  Tensor dv = new_tensor({splits, nk, hk, p.v_dim}, ScalarType::Float, k);
  p.num_splits = splits;
  p.split_dk = ptr<float>(dk);
  p.split_dv = ptr<float>(dv);
  return std::make_tuple(dk, dv);
}

// The backward's extra arguments: grad_out/out [Nq, Hq, Dv] of q's dtype, lse float32 [Nq, Hq] and
// grad_lse of lse's shape. Returns grad_lse as contiguous float32 (undefined when absent).
inline Tensor check_attention_backward_inputs(const AttentionInputs& in, const Tensor& grad_out,
                                                  const std::optional<Tensor>& grad_lse, const Tensor& q,
                                                  const Tensor& out, const Tensor& lse) {
  SHAREDLLM_CHECK(same_shape(grad_out, out) && has_shape(out, {in.nq, in.hq, in.dv}),
                    "grad_out and out must have shape [Nq, Hq, Dv] = [", in.nq, ", ", in.hq, ", ", in.dv, "], got ",
                    shape_of(grad_out), " and ", shape_of(out));
  check_same_dtype(grad_out, q, "grad_out", "q");
  check_same_dtype(out, q, "out", "q");
  check_same_device(grad_out, q, "grad_out", "q");
  check_same_device(out, q, "out", "q");
  check_same_device(lse, q, "lse", "q");
  if (grad_lse.has_value()) check_same_device(*grad_lse, q, "grad_lse", "q");
  SHAREDLLM_CHECK(lse.scalar_type() == ScalarType::Float && has_shape(lse, {in.nq, in.hq}),
                    "lse must be float32 [Nq, Hq], got ", lse.scalar_type(), " ", shape_of(lse));
  Tensor grad_lse_f;
  if (grad_lse.has_value()) {
    SHAREDLLM_CHECK(same_shape(*grad_lse, lse), "grad_lse must have the shape of lse ", shape_of(lse),
                      ", got ", shape_of(*grad_lse));
    grad_lse_f = as_contiguous(to_dtype(*grad_lse, ScalarType::Float));
  }
  return grad_lse_f;
}

// Forward: `launch(KernelTag<T>{}, const AttentionForwardParams&)` runs the kernel.
template <typename Launch>
std::tuple<Tensor, Tensor> run_attention_forward(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin, ValueChecks checks, Launch&& launch) {
  const AttentionInputs in = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions,
                                                    rotary_cos, rotary_sin, checks == ValueChecks::kHost);
  Tensor out = new_tensor_like(q, {in.nq, in.hq, in.dv});
  Tensor lse = new_tensor({in.nq, in.hq}, ScalarType::Float, q);
  if (in.nq == 0 || in.hq == 0) return {out, lse};
  dispatch_floating(q.scalar_type(), "cross_inject_attention", [&](auto tag) {
    AttentionForwardParams p;
    fill_params(p, in, q, k, v, softmax_scale);
    p.check_indices = checks == ValueChecks::kDevice;
    p.out = out.data_ptr();
    p.lse = ptr<float>(lse);
    launch(tag, p);
  });
  return {out, lse};
}

// Backward: `launch(KernelTag<T>{}, const AttentionBackwardParams&)` runs the kernels.
template <typename Launch>
std::tuple<Tensor, Tensor, Tensor> run_attention_backward(
    const Tensor& grad_out, const std::optional<Tensor>& grad_lse, const Tensor& q, const Tensor& k,
    const Tensor& v, const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
    const Tensor& cu_seqlens_k, double softmax_scale, const std::optional<Tensor>& q_positions,
    const std::optional<Tensor>& k_positions, const std::optional<Tensor>& rotary_cos,
    const std::optional<Tensor>& rotary_sin, ValueChecks checks, Launch&& launch) {
  const AttentionInputs in = check_attention_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, q_positions, k_positions,
                                                    rotary_cos, rotary_sin, checks == ValueChecks::kHost);
  const Tensor grad_lse_f = check_attention_backward_inputs(in, grad_out, grad_lse, q, out, lse);
  Tensor dq = new_tensor_like(q, {in.nq, in.hq, in.d});
  Tensor dk = new_tensor_like(q, {in.nk, in.hk, in.d});
  Tensor dv = new_tensor_like(q, {in.nk, in.hk, in.dv});
  if (dq.numel() + dk.numel() + dv.numel() == 0) return {dq, dk, dv};
  const Tensor go = as_contiguous(grad_out), o = as_contiguous(out), l = as_contiguous(lse);
  dispatch_floating(q.scalar_type(), "cross_inject_attention_backward", [&](auto tag) {
    AttentionBackwardParams p;
    fill_params(p, in, q, k, v, softmax_scale);
    p.check_indices = checks == ValueChecks::kDevice;
    p.grad_out = go.data_ptr();
    p.out = o.data_ptr();
    p.lse = ptr<float>(l);
    p.grad_lse = grad_lse_f.defined() ? ptr<float>(grad_lse_f) : nullptr;
    p.grad_q = dq.data_ptr();
    p.grad_k = dk.data_ptr();
    p.grad_v = dv.data_ptr();
    launch(tag, p);
  });
  return {dq, dk, dv};
}

}  // namespace sharedllm::binding
