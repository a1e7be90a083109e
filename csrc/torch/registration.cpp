// The one schema block of the sharedllm ops and their CPU kernels; the CUDA kernels register in
// registration_cuda.cpp. Fake (meta) kernels and autograd are registered in Python
// (sharedllm_ops/ops/), next to the public functions.
//
// Everything goes through PyTorch's stable ABI (STABLE_TORCH_LIBRARY, TORCH_BOX) and the Python
// limited API, so that one binary serves torch >= 2.10 on CPython >= 3.10 (see setup.py).
#include <Python.h>

#include "ops.h"

STABLE_TORCH_LIBRARY(sharedllm, m) {
  m.def("chunk_pool(Tensor x, Tensor cu_seqlens, int tokens_per_node, str mode) -> Tensor");
  m.def(
      "chunk_pool_backward(Tensor grad_out, Tensor cu_seqlens, SymInt num_rows, int tokens_per_node, str mode) -> "
      "Tensor");
  m.def(
      "tree_topk(Tensor query, Tensor node_emb, int depth, int k, int branching, str score) -> "
      "(Tensor node_ids, Tensor scores)");
  m.def(
      "cross_inject_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "float softmax_scale, Tensor? q_positions, Tensor? k_positions, Tensor? rotary_cos, Tensor? rotary_sin) -> "
      "(Tensor out, Tensor lse)");
  m.def(
      "cross_inject_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float softmax_scale, "
      "Tensor? q_positions, Tensor? k_positions, Tensor? rotary_cos, Tensor? rotary_sin) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def("build_info() -> str");
}

// build_info takes no tensor, so it is registered for the key a tensor-free call dispatches to
STABLE_TORCH_LIBRARY_IMPL(sharedllm, CompositeExplicitAutograd, m) {
  m.impl("build_info", TORCH_BOX(&sharedllm::binding::build_info));
}

STABLE_TORCH_LIBRARY_IMPL(sharedllm, CPU, m) {
  m.impl("chunk_pool", TORCH_BOX(&sharedllm::binding::chunk_pool_cpu));
  m.impl("chunk_pool_backward", TORCH_BOX(&sharedllm::binding::chunk_pool_backward_cpu));
  m.impl("tree_topk", TORCH_BOX(&sharedllm::binding::tree_topk_cpu));
  m.impl("cross_inject_attention", TORCH_BOX(&sharedllm::binding::cross_inject_attention_cpu));
  m.impl("cross_inject_attention_backward", TORCH_BOX(&sharedllm::binding::cross_inject_attention_backward_cpu));
}

// `import sharedllm_ops._C` loads this library, which runs the registrations above. The module
// itself is empty: every entry point is a torch op.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
