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

// The fp32 accumulator fragment of the m16n16k16 products.
using WmmaAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// Tiles of the tensor-core attention kernels per padded head dim: BQ = 16 * WM query rows, BK keys (one
// summary chunk: kChunk % BK == 0), used by fwd_wmma_kernel and dq_wmma_kernel.
template <int DMAX>
struct WmmaTraits;
template <> struct WmmaTraits<64> { static constexpr int BQ = 64, BK = 64, WM = 4; };
template <> struct WmmaTraits<128> { static constexpr int BQ = 64, BK = 64, WM = 4; };
template <> struct WmmaTraits<256> { static constexpr int BQ = 32, BK = 64, WM = 2; };

// The shared-memory layout rules of the tensor-core kernels (their *Smem structs derive from this and add
// their buffers' byte offsets): leading dimensions are padded (fewer bank conflicts) and stay multiples
// of 16 bytes, as WMMA requires, and every buffer starts at a 128-byte aligned offset (up), so every
// fragment's first entry is 32-byte aligned.
template <int DMAX, int BK>
struct WmmaSmemLayout {
  static constexpr int LDT = DMAX + 8;  // input-dtype row tiles (Q, K, V, dout): [rows][LDT]
  static constexpr int LDS = BK + 4;    // fp32 score tiles: [BQ][LDS]
  static constexpr int LDP = BK + 8;    // input-dtype probability / dS tiles: [BQ][LDP]
  static constexpr int LDO = DMAX + 4;  // fp32 output tiles: [BQ][LDO]
  static constexpr size_t up(size_t x) { return (x + 127) / 128 * 128; }
};

}  // namespace cuda
}  // namespace anllm
