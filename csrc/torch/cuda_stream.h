// What the CUDA bindings (<op>_cuda.cpp) share, through the stable ABI: a device guard for the
// data's device, the current stream, and where the index values are checked.
#pragma once

#include <cuda_runtime_api.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "checks.h"
#include "torch_api.h"

namespace sharedllm::binding {

using DeviceGuard = torch::stable::accelerator::DeviceGuard;

inline DeviceGuard device_guard(const Tensor& t) { return DeviceGuard(t.get_device_index()); }

inline void* current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return stream;
}

inline bool capturing_graph(const Tensor& t) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t err = cudaStreamIsCapturing(static_cast<cudaStream_t>(current_stream(t)), &status);
  if (err != cudaSuccess) throw std::runtime_error(std::string("cudaStreamIsCapturing: ") + cudaGetErrorString(err));
  return status != cudaStreamCaptureStatusNone;
}

// Where a CUDA binding checks index values: always on the device while a CUDA graph is captured (nothing
// may read device memory on the host then), otherwise as cuda_value_checks_outside_graphs says.
inline ValueChecks cuda_value_checks(const Tensor& t) {
  return capturing_graph(t) ? ValueChecks::kDevice : cuda_value_checks_outside_graphs();
}

}  // namespace sharedllm::binding
