// CUDA side of build_info: the toolkit version this library was compiled with. Also the smoke
// test that the CUDA toolchain compiles and links in every build, before the CUDA kernels land.
#include <cuda_runtime_api.h>

namespace sharedllm::cuda {

int compiled_cuda_version() { return CUDART_VERSION; }

}  // namespace sharedllm::cuda
