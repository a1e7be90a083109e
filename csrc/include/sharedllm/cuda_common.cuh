// Device-side helpers shared by the CUDA kernels: 16-bit storage <-> float conversions, 16-byte
// vector loads and stores, launch error checks. Torch-free, like the rest of csrc/.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>  // assert.h first: the declaration of __assert_fail below must follow glibc's
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "sharedllm/common.h"

namespace sharedllm::cuda {

__device__ __forceinline__ float load_float(float x) { return x; }
__device__ __forceinline__ float load_float(bfloat16_t x) { return __uint_as_float(static_cast<uint32_t>(x.bits) << 16); }
__device__ __forceinline__ float load_float(half_t x) {
  return __half2float(__ushort_as_half(x.bits));
}

template <typename T>
__device__ __forceinline__ T store_float(float f);
template <>
__device__ __forceinline__ float store_float<float>(float f) {
  return f;
}
template <>
__device__ __forceinline__ half_t store_float<half_t>(float f) {
  return half_t{__half_as_ushort(__float2half_rn(f))};
}
template <>
__device__ __forceinline__ bfloat16_t store_float<bfloat16_t>(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bfloat16_t{static_cast<uint16_t>(u >> 16)};
}

// VEC consecutive elements moved as one 16-byte (or narrower) transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Whether rows of `dim` elements can move as 16-byte vectors: dim, the strides (in elements) and the
// base pointers all on 16-byte boundaries. Host side.
template <typename T>
inline bool can_vectorize(std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides,
                          int64_t dim) {
  constexpr int64_t vec = 16 / sizeof(T);
  if (dim % vec) return false;
  for (const void* ptr : ptrs)
    if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t s : strides)
    if (s % vec) return false;
  return true;
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[VEC]) {
  const Vec<T, VEC> packed = *reinterpret_cast<const Vec<T, VEC>*>(ptr);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = load_float(packed.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[VEC]) {
  Vec<T, VEC> packed;
#pragma unroll
  for (int i = 0; i < VEC; ++i) packed.v[i] = store_float<T>(in[i]);
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = packed;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (sm_75+): four 8x8 16-bit matrices from shared memory
// into the warp's mma fragments in one instruction. Lane l passes the address of row l % 8 of matrix
// l / 8 (16-byte aligned); r[i] receives, of matrix i, (row l / 4, columns 2 (l % 4) .. + 1), or with
// kTrans (rows 2 (l % 4) .. + 1, column l / 4): the A/B operand layouts of mma.m16n8k16.
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row_address) {
#if defined(SHAREDLLM_CUDA_EMULATOR)
  emulator::ldmatrix_x4(r, row_address, kTrans);  // tests/cuda_emulator: the PTX ISA's layout on the CPU
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row_address));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#else
  __trap();  // the host never picks the tensor-core path below sm_80
#endif
}

// cp.async.cg.shared.global (sm_80+): 16 bytes from global to shared memory without passing through
// registers, in flight until a cp_async_wait covers the group it was committed in; with `fill` false
// the 16 bytes are zeros and `src` is not read (src-size 0). Both addresses 16-byte aligned.
// __syncthreads does not wait for copies: wait, then sync, before another thread reads them.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
#if defined(SHAREDLLM_CUDA_EMULATOR)
  emulator::cp_async_16(dst, src, fill);  // tests/cuda_emulator: lands only at the wait that covers it
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(src), "r"(fill ? 16 : 0)
               : "memory");
#else
  __trap();  // the host never picks the tensor-core path below sm_80
#endif
}

// cp.async.commit_group: the copies issued since the last commit form one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(SHAREDLLM_CUDA_EMULATOR)
  emulator::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group N: returns once at most the N latest committed groups of this thread are in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(SHAREDLLM_CUDA_EMULATOR)
  emulator::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The segment of packed row `row`: the last s with cu[s] <= row (segments may be empty).
__device__ __forceinline__ int64_t segment_of_row(const int32_t* cu, int64_t num_segments, int64_t row) {
  int64_t lo = 0, hi = num_segments;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(cu[mid]) <= row) lo = mid;
    else hi = mid;
  }
  return lo;
}

// __syncthreads() at a barrier numbered `n`. Under the CPU emulator, SHAREDLLM_EMULATOR_DROP_BARRIER=n
// removes that one barrier, and a test expects the race detector to report the race the removal
// opens (tests/test_cuda_emulated.py); everywhere else it is a plain barrier.
#if defined(SHAREDLLM_CUDA_EMULATOR)
#define SHAREDLLM_BARRIER(n) \
  do {                         \
    if ((n) != emulator::dropped_barrier()) __syncthreads(); \
  } while (0)
#else
#define SHAREDLLM_BARRIER(n) __syncthreads()
#endif

// Device-side value checks: the CUDA bindings' default (checking index values on the host would copy
// them there and synchronise on every call). A failed check is a device-side assert, as in PyTorch's own
// kernels: the message is printed, the kernel stops, the error (cudaErrorAssert) surfaces at the next
// synchronisation and the CUDA context is unusable afterwards. Unlike `assert`, NDEBUG never removes it.
// (The CPU emulator of tests/cuda_emulator defines its own, which fails the launch with the message.)
#ifndef SHAREDLLM_DEVICE_FAIL
// declared here too: with NDEBUG (CMake's Release builds) neither glibc's <assert.h> nor CUDA's headers
// declare it, and nvcc still lowers it to the device's __assertfail
extern "C" __host__ __device__ void __assert_fail(const char*, const char*, unsigned int, const char*) __THROW;
#define SHAREDLLM_DEVICE_FAIL(message) __assert_fail(message, __FILE__, __LINE__, __func__)
#endif

// Entry i of a boundary tensor cu [S + 1] is right: cu[0] == 0, cu[i] >= cu[i - 1], cu[S] == total.
__device__ __forceinline__ bool cu_seqlens_entry_ok(const int32_t* cu, int64_t i, int64_t num_segments,
                                                    int64_t total) {
  if (i == 0 && cu[0] != 0) return false;
  if (i > 0 && cu[i] < cu[i - 1]) return false;
  return i != num_segments || cu[i] == total;
}

// Launch shape of a value check over `items` indices, walked by a grid-stride loop.
constexpr unsigned kCheckThreads = 256;
inline unsigned check_blocks(int64_t items) {
  const int64_t blocks = (items + kCheckThreads - 1) / kCheckThreads;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks > 64 ? 64 : blocks);
}

// The block's dynamic shared memory as `type* name`. (The CPU emulator of tests/cuda_emulator
// defines its own.)
#ifndef SHAREDLLM_DYNAMIC_SHARED
#define SHAREDLLM_DYNAMIC_SHARED(type, name)                                  \
  extern __shared__ __align__(16) unsigned char sharedllm_dynamic_shared[]; \
  type* name = reinterpret_cast<type*>(sharedllm_dynamic_shared)
#endif

// kernel<<<grid, block, shared_bytes, stream>>>(args...), spelled as a call so that the kernels'
// host code also compiles under the CPU emulator of tests/cuda_emulator, which defines its own.
#ifndef SHAREDLLM_CUDA_EMULATOR
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
                   Args&&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(static_cast<Args&&>(args)...);
}
#endif

// Every launch is checked: a failed launch becomes an exception naming the kernel.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("sharedllm CUDA kernel ") + kernel + " failed to launch: " +
                             cudaGetErrorString(err));
}

}  // namespace sharedllm::cuda
