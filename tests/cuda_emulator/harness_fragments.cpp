// The warp-level fragment loads of csrc (sharedllm/cuda_common.cuh) on a known tile, behind
// torch.ops.sharedllm_emulated.ldmatrix_x4(trans): tests/test_cuda_fragments.py compares what each lane
// receives with the PTX ISA's layout, written there from the specification.
#include "torch_api.h"

#include <cuda_runtime.h>

#include "sharedllm/cuda_common.cuh"

namespace sharedllm::cuda::fragments {  // the namespace emulator_checks.h looks in for static shared objects

constexpr int kStride = 16;  // elements per tile row: 8 of the matrix, 8 of padding (rows stay 16-byte aligned)

// One warp, one ldmatrix.x4 over a 32-row tile whose element (row R, column c) is 8 R + c; lane l passes
// tile row (5 l + 3) % 32, so the rows each lane receives depend on the other lanes' addresses.
// out[lane][i] = register i of that lane.
template <bool kTrans>
__global__ void load_four_matrices(int32_t* out) {
  __shared__ __align__(16) uint16_t tile[32 * kStride];
  for (int e = threadIdx.x; e < 32 * 8; e += blockDim.x) tile[(e / 8) * kStride + e % 8] = static_cast<uint16_t>(e);
  __syncthreads();
  const int lane = threadIdx.x;
  uint32_t r[4];
  ldmatrix_x4<kTrans>(r, tile + ((5 * lane + 3) % 32) * kStride);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = static_cast<int32_t>(r[i]);
}

}  // namespace sharedllm::cuda::fragments

namespace {

using namespace sharedllm;
using binding::Tensor;

Tensor ldmatrix_x4(const Tensor& like, bool trans) {
  Tensor out = binding::new_tensor({32, 4}, binding::ScalarType::Int, like);
  if (trans) cuda::launch_kernel(cuda::fragments::load_four_matrices<true>, 1, 32, 0, nullptr, binding::ptr<int32_t>(out));
  else cuda::launch_kernel(cuda::fragments::load_four_matrices<false>, 1, 32, 0, nullptr, binding::ptr<int32_t>(out));
  cuda::check_launch("ldmatrix_x4");
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(SHAREDLLM_EMULATED_OPS, m) { m.def("ldmatrix_x4(Tensor like, bool trans) -> Tensor"); }

STABLE_TORCH_LIBRARY_IMPL(SHAREDLLM_EMULATED_OPS, CPU, m) { m.impl("ldmatrix_x4", TORCH_BOX(&ldmatrix_x4)); }
