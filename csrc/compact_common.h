// Validation and slot addressing shared by the CPU and CUDA compaction kernels.
#pragma once

#include <ATen/MemoryOverlap.h>

#include "checks.h"

namespace anllm {

// A tensor seen as [B, heads, Cap, slot_elems] with each (b, head) plane of Cap slots contiguous.
// Rank 4 [B, H, Cap, D] is a K or V cache; rank 2 [B, Cap] is a per-slot layout tensor.
struct SlotView {
  int64_t heads, slot_elems, batch_stride, head_stride, elem_size;
};

inline SlotView slot_view(const at::Tensor& t) {
  if (t.dim() == 4)
    return {t.size(1), t.size(3), t.stride(0), t.stride(1), static_cast<int64_t>(t.element_size())};
  return {1, 1, t.stride(0), 0, static_cast<int64_t>(t.element_size())};
}

struct CompactProblem {
  int64_t B, cap, heads_per_tensor_max;
};

inline CompactProblem check_compact_inputs(at::TensorList tensors, const at::Tensor& keep,
                                           const at::Tensor& lengths) {
  ANLLM_CHECK(keep.dim() == 2, "keep must be a 2-D [batch, capacity] tensor, got shape ", keep.sizes());
  ANLLM_CHECK_DTYPE(keep, at::kBool);
  ANLLM_CHECK(lengths.dim() == 1 && lengths.size(0) == keep.size(0),
              "lengths must be a 1-D tensor of size batch = ", keep.size(0), ", got shape ",
              lengths.sizes());
  ANLLM_CHECK_DTYPE(lengths, at::kLong);
  ANLLM_CHECK_SAME_DEVICE(lengths, keep);
  CompactProblem p{keep.size(0), keep.size(1), 1};
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    ANLLM_CHECK(t.dim() == 4 || t.dim() == 2, "tensors[", i,
                "] must be [batch, heads, capacity, dim] or [batch, capacity], got shape ", t.sizes());
    ANLLM_CHECK(t.device() == keep.device(), "tensors[", i, "] is on ", t.device(),
                " but keep is on ", keep.device());
    const int64_t slot_dim = t.dim() == 4 ? 2 : 1;
    ANLLM_CHECK(t.size(0) == p.B, "tensors[", i, "] has batch ", t.size(0), " but keep has ", p.B);
    ANLLM_CHECK(t.size(slot_dim) == p.cap, "tensors[", i, "] has capacity ", t.size(slot_dim),
                " but keep has ", p.cap, " slots");
    const bool planes_contiguous =
        t.dim() == 4 ? (t.stride(3) == 1 && t.stride(2) == t.size(3)) : t.stride(1) == 1;
    ANLLM_CHECK(planes_contiguous, "tensors[", i,
                "] must have contiguous slots (each [capacity, dim] plane contiguous), got strides ",
                t.strides());
    ANLLM_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "tensors[", i,
                "] has overlapping memory (e.g. an expanded tensor); compact a materialised buffer");
    for (size_t j = 0; j < i; ++j)
      ANLLM_CHECK(!tensors[j].is_same(t) && tensors[j].data_ptr() != t.data_ptr(), "tensors[", j,
                  "] and tensors[", i, "] share memory; compact each buffer once");
    if (t.dim() == 4) p.heads_per_tensor_max = std::max(p.heads_per_tensor_max, t.size(1));
  }
  return p;
}

}  // namespace anllm
