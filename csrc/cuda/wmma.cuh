// The warp-level matrix API (nvcuda::wmma) for the tensor-core kernels (fwd_wmma.cuh, bwd_wmma.cuh): the
// CUDA headers under nvcc, the emulator's implementation in the emulator build (csrc/emu/cuda_emu.h).
#pragma once

#include "common.cuh"

#ifndef ANLLM_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

namespace anllm {
namespace cuda {

// The WMMA element type of a kernel input type (the same bits).
template <typename T>
struct WmmaElem;
template <>
struct WmmaElem<at::Half> {
  using type = __half;
};
template <>
struct WmmaElem<at::BFloat16> {
  using type = __nv_bfloat16;
};

}  // namespace cuda
}  // namespace anllm
