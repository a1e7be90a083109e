// Small kernels that each make one mistake a GPU would catch, behind
// torch.ops.sharedllm_emulated.emulator_fault(x, kind, arg): they prove that the checks of
// include/emulator_checks.h and the launch limits of include/cuda_runtime.h find what they claim
// (tests/test_cuda_emulated.py). `x` is a float32 CPU tensor of at least 64 + 4 elements; the
// result holds one float per thread (64 threads a block; up to 1024 for "block_threads").
#include "torch_api.h"

#include <cuda_runtime.h>

#include "sharedllm/cuda_common.cuh"

namespace sharedllm::cuda::faults {  // the namespace emulator_checks.h looks in for static shared objects

constexpr int kThreads = 64;

// Thread 0 publishes x[0] through shared memory; with `barrier` false the others read it in the
// same interval: a race.
__global__ void published(const float* x, float* out, bool barrier) {
  __shared__ float value;
  if (threadIdx.x == 0) value = x[0];
  if (barrier) __syncthreads();
  out[threadIdx.x] = value;
}

// Reads static shared memory that nothing wrote (with `write` false): the emulator's poison (NaN)
// comes back. (Were no write anywhere, the compiler would read the zeros of a C++ static.)
__global__ void unwritten(float* out, bool write) {
  __shared__ float maybe_written[kThreads];
  if (write) maybe_written[threadIdx.x] = 1.f;
  out[threadIdx.x] = maybe_written[threadIdx.x];
}

// A 16-byte vector load from x + offset floats: misaligned unless offset is a multiple of 4.
__global__ void vector_load(const float* x, float* out, int offset) {
  const uint4 v = *reinterpret_cast<const uint4*>(x + offset);
  out[threadIdx.x] = __uint_as_float(v.x) + __uint_as_float(v.y) * 0.f;
}

// Reads x[index]: past the end of x for an index >= x.numel() (AddressSanitizer's build finds it).
__global__ void global_read(const float* x, float* out, int64_t index) { out[threadIdx.x] = x[index]; }

// 40 KiB of static shared memory, to launch with some dynamic shared memory on top.
__global__ void big_static(float* out) {
  __shared__ float tile[10 * 1024];
  tile[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = tile[(threadIdx.x + 1) % kThreads];
}

// cp.async: threads 0..15 each copy 16 bytes (x[4t..4t+3]) into a shared tile. mode 0: commit, wait,
// sync, then each thread reads the next thread's float; 1: sync without the wait; 2: wait without the
// sync (both races); 3: a second group into another tile, wait_group 1, and each thread reads its own
// copies (the first landed, the second still in flight); 4: a source off 16 bytes.
__global__ void async_copy(const float* x, float* out, int mode) {
  __shared__ __align__(16) float tile[kThreads];
  __shared__ __align__(16) float later[kThreads];
  const int t = threadIdx.x;
  if (t < 16) cp_async_16(tile + 4 * t, x + 4 * t + (mode == 4 ? 1 : 0), true);
  cp_async_commit();
  if (mode == 3) {
    if (t < 16) cp_async_16(later + 4 * t, x + 4 * t, true);
    cp_async_commit();
    cp_async_wait<1>();
    if (t < 16) out[t] = tile[4 * t], out[16 + t] = later[4 * t];
    else if (t >= 32) out[t] = 0.f;
    return;
  }
  if (mode != 1) cp_async_wait<0>();
  if (mode != 2) __syncthreads();
  out[t] = tile[(t + 1) % kThreads];
}

}  // namespace sharedllm::cuda::faults

namespace {

using namespace sharedllm;
using binding::Tensor;

Tensor emulator_fault(const Tensor& x, const std::string& kind, int64_t arg) {
  SHAREDLLM_CHECK(x.scalar_type() == binding::ScalarType::Float && x.is_contiguous() && x.numel() >= 68,
                  "x must be a contiguous float32 tensor of at least 68 elements");
  Tensor out = binding::new_tensor_like(x, {kind == "block_threads" ? std::max<int64_t>(arg, 0) : cuda::faults::kThreads});
  const float* in = binding::ptr<float>(x);
  float* o = binding::ptr<float>(out);
  const dim3 one(1), block(cuda::faults::kThreads);
  namespace f = cuda::faults;
  if (kind == "published") cuda::launch_kernel(f::published, one, block, 0, nullptr, in, o, arg != 0);
  else if (kind == "unwritten") cuda::launch_kernel(f::unwritten, one, block, 0, nullptr, o, arg != 0);
  else if (kind == "vector_load") cuda::launch_kernel(f::vector_load, one, block, 0, nullptr, in, o, static_cast<int>(arg));
  else if (kind == "global_read") cuda::launch_kernel(f::global_read, one, block, 0, nullptr, in, o, arg);
  else if (kind == "async_copy") cuda::launch_kernel(f::async_copy, one, block, 0, nullptr, in, o, static_cast<int>(arg));
  else if (kind == "big_static") cuda::launch_kernel(f::big_static, one, block, static_cast<size_t>(arg), nullptr, o);
  else if (kind == "grid_y") cuda::launch_kernel(f::published, dim3(1, static_cast<unsigned>(arg)), block, 0, nullptr, in, o, true);
  else if (kind == "block_threads") cuda::launch_kernel(f::published, one, dim3(static_cast<unsigned>(arg)), 0, nullptr, in, o, true);
  else SHAREDLLM_CHECK(false, "kind: unknown fault ", kind);
  cuda::check_launch(kind.c_str());
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(SHAREDLLM_EMULATED_OPS, m) {
  m.def("emulator_fault(Tensor x, str kind, int arg) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(SHAREDLLM_EMULATED_OPS, CPU, m) {
  m.impl("emulator_fault", TORCH_BOX(&emulator_fault));
}
