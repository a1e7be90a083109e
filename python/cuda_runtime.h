// What the CUDA bindings share: the device guard and current stream of the data, and whether the
// stream is being captured into a CUDA graph (then nothing may read device memory on the host,
// so value checks such as cu_seqlens ordering are skipped; the kernels clamp their indices).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace sharedllm::binding {

inline void* current_stream(const at::Tensor& t) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

inline bool capturing_graph() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

}  // namespace sharedllm::binding
