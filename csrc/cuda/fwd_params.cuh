// The forward kernels' parameters (fwd_kernel and combine_kernel in anchor_attention_fwd.cu, the
// tensor-core fwd_wmma_kernel in fwd_wmma.cuh).
#pragma once

#include "common.cuh"

namespace anllm {
namespace cuda {

struct FwdParams : AttentionParams {
  void* out;       // [B, Hq, Tq, D] contiguous
  float* lse;      // [B, Hq, Tq]
  float* part_acc; // [nsplit, B*Hq*Tq, D]  (nsplit > 1)
  float* part_m;   // [nsplit, B*Hq*Tq]
  float* part_l;   // [nsplit, B*Hq*Tq]
  int rows_h, rows_q;  // a block's rows: rows_h heads x rows_q queries
  int64_t n_hgroups, n_qtiles;
  int nsplit;
};

}  // namespace cuda
}  // namespace anllm
