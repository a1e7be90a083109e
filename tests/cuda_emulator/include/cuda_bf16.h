// CPU emulator (see cuda_runtime.h): the bfloat16 types and conversions the kernels use.
#pragma once

#include "cuda_runtime.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {{emulator::float_to_bf16_bits(lo)}, {emulator::float_to_bf16_bits(hi)}};
}
