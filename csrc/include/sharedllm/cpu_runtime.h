// The two services the torch-free CPU kernels need from their host: a thread pool and a float32
// GEMM. The binding layer (csrc/torch/cpu_runtime.cpp) implements them with ATen's parallel_for and
// the BLAS that torch was built with; a standalone build may supply its own.
#pragma once

#include <cstdint>
#include <functional>

namespace sharedllm::cpu {

// Calls fn(begin, end) on disjoint sub-ranges of [begin, end) in parallel; grain is the smallest
// sub-range worth a task.
void parallel_for(int64_t begin, int64_t end, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Number of threads parallel_for may use.
int64_t num_threads();

// Row-major C[m, n] = alpha * op(A)[m, k] * op(B)[k, n] + beta * C, with op = transpose when the
// flag is set. lda/ldb/ldc are row strides in elements of the matrices as stored.
void gemm_f32(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
              const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace sharedllm::cpu
