// The part of torch the binding layer uses, all of it from PyTorch's stable ABI (torch/csrc/stable,
// headeronly): the extension is built with TORCH_TARGET_VERSION = 2.10 and loads in any torch from
// 2.10 on without a rebuild. Nothing here may include ATen or c10 headers.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "sharedllm/common.h"

namespace sharedllm::binding {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using Device = torch::stable::Device;

// Bad arguments throw std::invalid_argument with a message naming the argument; Python sees a
// ValueError, as from the public functions' own checks (tests/test_<op>.py call the ops directly).
template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream message;
  (message << ... << parts);
  throw std::invalid_argument(message.str());
}
#define SHAREDLLM_CHECK(cond, ...) \
  do {                             \
    if (!(cond)) ::sharedllm::binding::fail(__VA_ARGS__); \
  } while (0)

// "[a, b, c]" (sizes) and "(a, b, c)" (strides), for error messages
template <typename Get>
std::string format_dims(const Tensor& t, const char* open, const char* close, Get get) {
  std::ostringstream s;
  s << open;
  for (int64_t d = 0; d < t.dim(); ++d) s << (d ? ", " : "") << get(d);
  s << close;
  return s.str();
}
inline std::string shape_of(const Tensor& t) {
  return format_dims(t, "[", "]", [&](int64_t d) { return t.size(d); });
}
inline std::string strides_of(const Tensor& t) {
  return format_dims(t, "(", ")", [&](int64_t d) { return t.stride(d); });
}

inline bool has_shape(const Tensor& t, std::initializer_list<int64_t> shape) {
  if (t.dim() != static_cast<int64_t>(shape.size())) return false;
  int64_t d = 0;
  for (int64_t size : shape)
    if (t.size(d++) != size) return false;
  return true;
}

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != b.size(d)) return false;
  return true;
}

inline std::string device_name(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return "device type " + std::to_string(static_cast<int>(t.device().type()));
}

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

inline bool is_float_type(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16 || t == ScalarType::Double;
}

// New tensors: uninitialised, of `dtype`, on the device of `like`.
inline Tensor new_tensor(std::initializer_list<int64_t> shape, ScalarType dtype, const Tensor& like) {
  return torch::stable::empty(torch::headeronly::IntHeaderOnlyArrayRef(shape.begin(), shape.size()), dtype,
                              std::nullopt, like.device());
}
inline Tensor new_tensor_like(const Tensor& like, std::initializer_list<int64_t> shape) {
  return new_tensor(shape, like.scalar_type(), like);
}

inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
// How many times a binding has read tensor values on the host: for device data, each is a copy to the host
// and a synchronisation. The CUDA emulator's tests count them (its "device" tensors live on the host).
inline std::atomic<int64_t>& host_value_reads() {
  static std::atomic<int64_t> count{0};
  return count;
}

// A contiguous host copy (the tensor itself when it already is one) whose values the caller reads.
inline Tensor host_contiguous(const Tensor& t) {
  ++host_value_reads();
  return as_contiguous(t.is_cpu() ? t : torch::stable::to(t, Device(torch::headeronly::DeviceType::CPU)));
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// Tag carrying a csrc kernel type through the generic launcher lambdas of the run_* bindings.
template <typename T>
struct KernelTag {
  using type = T;
};

// Calls f(KernelTag<T>{}) with the csrc storage type of a float32/float16/bfloat16 dtype.
template <typename F>
void dispatch_floating(ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case ScalarType::Float:
      return f(KernelTag<float>{});
    case ScalarType::Half:
      return f(KernelTag<half_t>{});
    case ScalarType::BFloat16:
      return f(KernelTag<bfloat16_t>{});
    default:
      fail(name, ": unsupported dtype ", dtype);
  }
}

}  // namespace sharedllm::binding
