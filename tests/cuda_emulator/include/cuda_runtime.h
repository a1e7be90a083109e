// A CPU emulator for the subset of CUDA that csrc/cuda/*.cu uses, so that CI (which has no GPU)
// can run the real kernel source. It replaces <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h>
// when the kernels are compiled as host C++ with -DSHAREDLLM_CUDA_EMULATOR.
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after the
// other, the fibers of a block in thread order or, with SHAREDLLM_EMULATOR_SCHEDULE_SEED set to a
// nonzero number, in a fresh seeded random order at every round. __syncthreads, __syncwarp, warp
// shuffles and mma.sync are collective: a fiber deposits its operand and yields until every live
// thread of its block (or warp) has arrived. mma.sync m16n8k16 is rebuilt from the 32 lanes'
// fragments with the layout of the PTX ISA and multiplied in float32. cp.async copies land only at
// the cp.async.wait_group that covers them (NaN until then). Static __shared__ arrays
// become function statics (one block runs at a time); they and the dynamic shared memory are
// NaN-filled before each block (emulator_checks.h finds the statics), so that a read of unwritten
// shared memory shows up in the results. A launch the GPU would refuse (a block of more than 1024
// threads, a grid past 2^31 - 1 by 65535 by 65535, more dynamic shared memory than 48 KiB or what
// the kernel opted in to, up to 227 KiB) runs nothing and cudaGetLastError reports it. The build
// with SHAREDLLM_EMULATOR_CHECKS also finds shared-memory races, misaligned vector accesses and
// static plus dynamic shared memory over the limit (emulator_checks.h). What this cannot show:
// memory-model effects, timing, and the hardware itself.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#include <random>
#include <string>

#include "emulator_checks.h"
#include "sharedllm/common.h"

#define SHAREDLLM_CUDA_EMULATOR 1
#define SHAREDLLM_DEVICE_FAIL(message) emulator::device_fail(message)
// the torch.ops namespace the harnesses register their ops in (one per build loaded together)
#ifndef SHAREDLLM_EMULATED_OPS
#define SHAREDLLM_EMULATED_OPS sharedllm_emulated
#endif
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {  // as CUDA's: a misaligned one is a fault, not a slow load
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using cudaError_t = int;
using cudaStream_t = void*;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;
constexpr cudaError_t cudaErrorAssert = 710;  // a device-side assert (SHAREDLLM_DEVICE_FAIL)
constexpr cudaError_t cudaErrorEmulatorFinding = 999;  // the emulator's checks found a bug (emulator_checks.h)
enum cudaDeviceAttr { cudaDevAttrComputeCapabilityMajor, cudaDevAttrMultiProcessorCount };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

namespace emulator {
// sm_90's shared memory per block: the default, and the most a kernel may opt in to
constexpr size_t kDefaultSharedBytes = 48 * 1024, kOptInSharedBytes = 227 * 1024;

// the SHAREDLLM_BARRIER number that SHAREDLLM_EMULATOR_DROP_BARRIER removes (read at each launch; 0: none)
inline int& dropped_barrier() {
  static int number = 0;
  return number;
}
inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}
inline std::string& assert_message() {  // of the first device-side assert since the error was last read
  static std::string message;
  return message;
}
// kernel -> the dynamic shared memory it opted in to (cudaFuncSetAttribute)
inline std::map<const void*, size_t>& opted_in_shared_bytes() {
  static std::map<const void*, size_t> bytes;
  return bytes;
}
}  // namespace emulator

inline cudaError_t cudaGetLastError() { return std::exchange(emulator::last_error(), cudaSuccess); }
inline const char* cudaGetErrorString(cudaError_t error) {
  static std::string findings;
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorAssert:
      findings = "device-side assert triggered: " + emulator::assert_message();
      return findings.c_str();
    case cudaErrorEmulatorFinding:
      findings = emulator::checks::state().findings;
      return findings.c_str();
    default: return "invalid argument";
  }
}
inline cudaError_t cudaGetDevice(int* device) { return *device = 0, cudaSuccess; }
// an H100/H200: sm_90 with 132 SMs
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: return *value = 9, cudaSuccess;
    case cudaDevAttrMultiProcessorCount: return *value = 132, cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > emulator::kOptInSharedBytes) return cudaErrorInvalidValue;
  emulator::opted_in_shared_bytes()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

// device math available on the host: min/max for mixed call sites, float intrinsics
using std::max;
using std::min;
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

namespace emulator {

// A cp.async copy in flight: where it lands, the 16 bytes it carries (read at the issue: the source
// must not change before the copy completes anyway), the block epoch it was issued in.
struct AsyncCopy {
  unsigned char* destination;
  unsigned char bytes[16];
  int epoch;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  unsigned thread;
  bool done = false;
  std::vector<AsyncCopy> open_group;                // cp.async copies since the last commit_group
  std::vector<std::vector<AsyncCopy>> committed;  // committed groups still in flight, oldest first
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  // barrier state: arrivals and generation per scope (0 = block, 1 + w = warp w)
  std::vector<int> arrived, generation;
  uint64_t progress = 0;
  std::vector<unsigned char> dynamic_shared;
  // per-warp exchange slots for shuffles and mma operands: [warp][lane][8 words]
  std::vector<uint32_t> slots;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}

}  // namespace emulator

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emulator {

inline void yield() {
  Block& b = *block();
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

inline int live_threads(int scope) {
  Block& b = *block();
  int live = 0;
  for (const Fiber& f : b.fibers)
    if (!f.done && (scope == 0 || static_cast<int>(f.thread / 32) == scope - 1)) ++live;
  return live;
}

// Waits until every live thread of the scope has arrived.
inline void barrier(int scope) {
  Block& b = *block();
  const int gen = b.generation[scope];
  ++b.arrived[scope];
  ++b.progress;
  while (b.generation[scope] == gen) {
    if (b.arrived[scope] >= live_threads(scope)) {
      b.arrived[scope] = 0;
      ++b.generation[scope];
      ++b.progress;
      break;
    }
    yield();
  }
}

// A faulting thread ends where it stands; the rest of the block goes on without it.
inline void trap_fiber() {
  Block& b = *block();
  b.fibers[b.current].done = true;
  ++b.progress;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// A device-side assert (SHAREDLLM_DEVICE_FAIL of cuda_common.cuh): the thread ends there and the launch
// fails with cudaErrorAssert and the first message. (On a GPU the error surfaces at the next
// synchronisation instead, and leaves the context unusable.)
inline void device_fail(const char* message) {
  if (last_error() != cudaErrorAssert) {
    last_error() = cudaErrorAssert;
    assert_message() = message;
  }
  trap_fiber();
}

inline int warp_scope() { return 1 + static_cast<int>(threadIdx.x / 32); }
inline uint32_t* slot(unsigned thread) { return &block()->slots[static_cast<size_t>(thread) * 8]; }

template <typename T>
T shuffle_xor(T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of a wide type");
  const unsigned me = threadIdx.x;
  std::memcpy(slot(me), &value, sizeof(T));
  barrier(warp_scope());
  T other;
  std::memcpy(&other, slot((me & ~31u) | ((me % 32) ^ static_cast<unsigned>(lane_mask))), sizeof(T));
  barrier(warp_scope());
  return other;
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16, as the PTX ISA defines it: four 8x8 matrices of 16-bit
// elements; lane l gives the address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned) and reads
// that row itself (so the race detector sees the warp's reads); register i of lane l then holds, of
// matrix i, row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1, or with .trans rows 2 (l % 4) and
// 2 (l % 4) + 1 of column l / 4, the first element in the low 16 bits.
inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row, bool trans) {
  const unsigned me = threadIdx.x, base = me & ~31u, lane = me % 32;
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
    checks::report("ldmatrix row address not 16-byte aligned (thread " + std::to_string(me) + ")");
    trap_fiber();
  }
  uint32_t* mine = slot(me);
  const uint32_t* words = reinterpret_cast<const uint32_t*>(row);
  for (int w = 0; w < 4; ++w) mine[w] = words[w];
  barrier(warp_scope());
  auto element = [&](unsigned source_lane, unsigned column) {  // of the row that lane read
    return (slot(base + source_lane)[column / 2] >> (16 * (column % 2))) & 0xffffu;
  };
  const unsigned g = lane / 4, t = lane % 4;
  for (unsigned i = 0; i < 4; ++i)
    r[i] = trans ? element(8 * i + 2 * t, g) | (element(8 * i + 2 * t + 1, g) << 16)
                 : element(8 * i + g, 2 * t) | (element(8 * i + g, 2 * t + 1) << 16);
  barrier(warp_scope());
}

// cp.async.cg.shared.global [dst], [src], 16, src_size (sm_80+), cp.async.commit_group and
// cp.async.wait_group N, as the PTX ISA defines them: a thread's copies join its open group,
// commit_group closes that group, and wait_group N returns once at most the N latest of the thread's
// committed groups are still in flight (copies not yet committed are not waited for). The emulator
// lands a copy only when a wait covers it, as the slowest GPU might, and NaN-fills its destination
// at the issue, so a read before the wait shows in the results. __syncthreads waits for no copy.
// The race detector sees the copy write at the issue (a thread still reading the old tile races
// with it) and again when it lands, and reports any other thread's access to the bytes in between
// (emulator_checks.h, async_copy_lands).
SHAREDLLM_UNCHECKED __attribute__((noinline)) inline void cp_async_16(void* dst, const void* src, bool fill) {
  const void* pc = __builtin_return_address(0);
  const unsigned me = threadIdx.x;
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (fill && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    checks::report("cp.async address not 16-byte aligned (thread " + std::to_string(me) + ") at " + checks::where(pc));
    trap_fiber();
  }
  Block& b = *block();
  AsyncCopy copy{static_cast<unsigned char*>(dst), {}, b.generation[0]};
  if (fill) std::memcpy(copy.bytes, src, 16);  // src_size 0: zeros, and nothing is read
  checks::on_access(reinterpret_cast<uintptr_t>(dst), 16, true, pc);
  std::memset(dst, 0xff, 16);
  b.fibers[b.current].open_group.push_back(copy);
}
SHAREDLLM_UNCHECKED inline void cp_async_commit() {
  Fiber& f = block()->fibers[block()->current];
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}
SHAREDLLM_UNCHECKED inline void land_groups(Fiber& f, size_t keep, const void* pc) {
  while (f.committed.size() > keep) {
    for (const AsyncCopy& c : f.committed.front()) {
      checks::async_copy_lands(reinterpret_cast<uintptr_t>(c.destination), 16, c.epoch, pc);
      std::memcpy(c.destination, c.bytes, 16);
    }
    f.committed.erase(f.committed.begin());
  }
}
SHAREDLLM_UNCHECKED __attribute__((noinline)) inline void cp_async_wait(int pending) {
  land_groups(block()->fibers[block()->current], static_cast<size_t>(pending), __builtin_return_address(0));
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
  if (exp != 0) return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
  const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}
inline float bf16_bits_to_float(uint16_t h) { return __uint_as_float(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_half_bits(float f) {  // round to nearest even via the hardware float16 of the compiler
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A B + C for the warp, each lane holding
// the fragments the PTX ISA assigns it (g = lane / 4, t = lane % 4):
//   A: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C: c[0..1] = (g, 2t..2t+1), c[2..3] = (g+8, 2t..2t+1)
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const unsigned me = threadIdx.x, base = me & ~31u;
  uint32_t* mine = slot(me);
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b0;
  mine[5] = b1;
  barrier(warp_scope());
  auto decode = [](uint32_t word, int half) {
    const uint16_t bits = static_cast<uint16_t>(half ? word >> 16 : word & 0xffffu);
    return std::is_same_v<T, sharedllm::half_t> ? half_bits_to_float(bits) : bf16_bits_to_float(bits);
  };
  float A[16][16], B[16][8];
  for (unsigned lane = 0; lane < 32; ++lane) {
    const uint32_t* s = slot(base + lane);
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = decode(s[0], e);
      A[g + 8][2 * t + e] = decode(s[1], e);
      A[g][2 * t + 8 + e] = decode(s[2], e);
      A[g + 8][2 * t + 8 + e] = decode(s[3], e);
      B[2 * t + e][g] = decode(s[4], e);
      B[2 * t + 8 + e][g] = decode(s[5], e);
    }
  }
  barrier(warp_scope());
  const int g = (me % 32) / 4, t = (me % 32) % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + (i % 2);
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[i] += sum;
  }
}

inline void* dynamic_shared() { return block()->dynamic_shared.data(); }

template <typename Kernel, typename... Args>
struct Launch {
  Kernel kernel;
  std::tuple<Args...> args;
};

template <typename L>
void fiber_entry(unsigned lo, unsigned hi) {
  auto* launch = reinterpret_cast<L*>((static_cast<uintptr_t>(hi) << 32) | lo);
  std::apply(launch->kernel, launch->args);
  Block& b = *block();
  Fiber& f = b.fibers[b.current];
  // a thread's copies in flight land even after it ends (the GPU completes them); uncommitted ones too
  cp_async_commit();
  land_groups(f, 0, nullptr);
  f.done = true;
  ++b.progress;
}

}  // namespace emulator

#define SHAREDLLM_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(emulator::dynamic_shared())

inline void __syncthreads() { emulator::barrier(0); }
inline void __syncwarp(unsigned = 0xffffffffu) { emulator::barrier(emulator::warp_scope()); }
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  return emulator::shuffle_xor(value, lane_mask);
}
[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "cuda emulator: __trap()\n");
  std::abort();
}

namespace sharedllm::cuda {

// kernel<<<grid, block, shared_bytes, stream>>>(args...), run block by block on fibers.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block_dim, size_t shared_bytes, cudaStream_t,
                   Args&&... args) {
  using L = emulator::Launch<void (*)(Params...), std::decay_t<Params>...>;
  L launch{kernel, std::tuple<std::decay_t<Params>...>(static_cast<Params>(args)...)};
  constexpr size_t kStack = 256 * 1024;
  const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
  if (block_dim.y != 1 || block_dim.z != 1 || threads % 32 != 0) {  // what the emulator supports
    std::fprintf(stderr, "cuda emulator: blocks must be 1-D whole warps, got %u threads\n", threads);
    std::abort();
  }
  // sm_90's limits: the GPU refuses such a launch and check_launch reports it
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    emulator::last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  const auto opted_in = emulator::opted_in_shared_bytes().find(reinterpret_cast<const void*>(kernel));
  const size_t allowed = opted_in == emulator::opted_in_shared_bytes().end()
                             ? emulator::kDefaultSharedBytes
                             : std::max(emulator::kDefaultSharedBytes, opted_in->second);
  if (shared_bytes > allowed) {
    emulator::last_error() = cudaErrorInvalidValue;
    return;
  }
  const char* dropped = std::getenv("SHAREDLLM_EMULATOR_DROP_BARRIER");
  emulator::dropped_barrier() = dropped ? std::atoi(dropped) : 0;
  const char* seed_text = std::getenv("SHAREDLLM_EMULATOR_SCHEDULE_SEED");
  const unsigned long seed = seed_text ? std::strtoul(seed_text, nullptr, 10) : 0;
  emulator::checks::State& checks = emulator::checks::state();
  emulator::checks::start_launch();
  gridDim = grid;
  blockDim = block_dim;
  std::vector<unsigned> order(threads);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emulator::Block b;
        b.fibers.resize(threads);
        b.arrived.assign(1 + threads / 32, 0);
        b.generation.assign(1 + threads / 32, 0);
        b.dynamic_shared.assign(shared_bytes + 16, 0xff);  // NaN in every float type
        b.slots.assign(static_cast<size_t>(threads) * 8, 0);
        emulator::block() = &b;
        blockIdx = dim3(x, y, z);
        const uintptr_t address = reinterpret_cast<uintptr_t>(&launch);
        for (unsigned t = 0; t < threads; ++t) {
          emulator::Fiber& f = b.fibers[t];
          f.thread = t;
          f.stack.reset(new char[kStack]);
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.get();
          f.context.uc_stack.ss_size = kStack;
          f.context.uc_link = &b.scheduler;
          makecontext(&f.context, reinterpret_cast<void (*)()>(&emulator::fiber_entry<L>), 2,
                      static_cast<unsigned>(address & 0xffffffffu), static_cast<unsigned>(address >> 32));
        }
        emulator::checks::start_block(x, y, z, b.dynamic_shared, shared_bytes, b.generation.data());
        std::mt19937_64 shuffle(seed * 0x9e3779b97f4a7c15ull + (static_cast<uint64_t>(z) << 42) +
                                (static_cast<uint64_t>(y) << 21) + x);
        // rounds until every thread is done; a full round without progress is a deadlock
        uint64_t seen = ~uint64_t{0};
        for (;;) {
          for (unsigned t = 0; t < threads; ++t) order[t] = t;
          if (seed != 0) std::shuffle(order.begin(), order.end(), shuffle);
          bool all_done = true;
          for (unsigned t : order) {
            if (b.fibers[t].done) continue;
            all_done = false;
            b.current = static_cast<int>(t);
            threadIdx = dim3(t, 0, 0);
            checks.thread = static_cast<int>(t);
            checks.active = emulator::checks::enabled();
            swapcontext(&b.scheduler, &b.fibers[t].context);
            checks.active = false;
          }
          if (all_done) break;
          if (b.progress == seen) {
            std::fprintf(stderr, "cuda emulator: deadlock in block (%u, %u, %u)\n", x, y, z);
            std::abort();
          }
          seen = b.progress;
        }
        emulator::block() = nullptr;
      }
  const size_t static_bytes = emulator::checks::touched_static_bytes();  // by any block of the launch
  // static plus dynamic: at most 48 KiB, or 227 KiB for a kernel that opted in (its dynamic part
  // alone is held to what it opted in to, above)
  const size_t block_limit = opted_in == emulator::opted_in_shared_bytes().end() ? emulator::kDefaultSharedBytes
                                                                                 : emulator::kOptInSharedBytes;
  if (static_bytes + shared_bytes > block_limit) {
    emulator::checks::report("static shared memory touched (" + std::to_string(static_bytes) +
                             " bytes) plus dynamic (" + std::to_string(shared_bytes) + ") exceeds the " +
                             std::to_string(block_limit) + " bytes a block may have");
  }
  if (!checks.findings.empty()) emulator::last_error() = cudaErrorEmulatorFinding;
}

}  // namespace sharedllm::cuda
