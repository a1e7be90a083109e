// The host services of csrc/include/sharedllm/cpu_runtime.h, through torch's stable ABI: torch's
// intra-op thread pool (so torch.set_num_threads applies) and the BLAS torch links.
#include "sharedllm/cpu_runtime.h"

#include <cstdlib>
#include <cstring>

#include "torch_api.h"

// torch's x86 wheels link MKL statically and export its Fortran BLAS symbol; where it is absent
// (other builds) the weak reference is null and we fall back to torch's matmul on wrapped buffers.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (C interface). Our GEMMs run inside parallel tasks; letting MKL
// fan out again from there oversubscribes the cores.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));

namespace sharedllm::cpu {
namespace {

// SHAREDLLM_OPS_GEMM=aten forces the fallback, so that tests cover builds without MKL too.
bool use_blas_symbol() {
  static const bool use = [] {
    const char* choice = std::getenv("SHAREDLLM_OPS_GEMM");
    return sgemm_ != nullptr && !(choice != nullptr && std::strcmp(choice, "aten") == 0);
  }();
  return use;
}

}  // namespace

void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  torch::stable::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    if (MKL_Set_Num_Threads_Local == nullptr) return fn(b, e);
    const int previous = MKL_Set_Num_Threads_Local(1);
    fn(b, e);
    MKL_Set_Num_Threads_Local(previous);
  });
}

int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (use_blas_symbol()) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  // C = alpha * op(A) op(B) + beta * C, with the product from torch's matmul on the wrapped buffers
  using binding::Tensor;
  const binding::Device cpu(torch::headeronly::DeviceType::CPU);
  const auto wrap = [&](const float* data, bool trans, int64_t rows, int64_t cols, int64_t ld) {
    // op(X)[rows, cols] of a row-major X with row stride ld
    const int64_t sizes[2] = {rows, cols};
    const int64_t strides[2] = {trans ? 1 : ld, trans ? ld : 1};
    return torch::stable::from_blob(const_cast<float*>(data), {sizes, 2}, {strides, 2}, cpu,
                                    torch::headeronly::ScalarType::Float);
  };
  const Tensor product = binding::as_contiguous(
      torch::stable::matmul(wrap(a, trans_a, m, k, lda), wrap(b, trans_b, k, n, ldb)));
  const float* p = binding::ptr<float>(product);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j)
      c[i * ldc + j] = alpha * p[i * n + j] + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
}

}  // namespace sharedllm::cpu
