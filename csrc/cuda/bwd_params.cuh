// The backward kernels' parameters (dq_kernel and dkv_kernel in anchor_attention_bwd.cu, the tensor-core
// dq_wmma_kernel in bwd_wmma.cuh).
#pragma once

#include "common.cuh"

namespace anllm {
namespace cuda {

struct BwdParams : AttentionParams {
  const void* dout;  // contiguous [B, Hq, Tq, D], fp32 (dout_f32) or the dtype of q
  bool dout_f32;
  const float* lse;    // [B, Hq, Tq] contiguous
  const float* delta;  // [B, Hq, Tq] contiguous
  void* dq;            // [B, Hq, Tq, D] contiguous, dtype of q
  float* dk;           // [B, Hkv, Tk, D] fp32, zero-initialised
  float* dv;
  SideView qs;  // chunk summaries of the queries
  int64_t n_qtiles, n_ktiles;
  int qsplit;
};

}  // namespace cuda
}  // namespace anllm
