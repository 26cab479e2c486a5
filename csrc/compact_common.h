// Validation and slot addressing shared by the CPU and CUDA compaction kernels.
#pragma once

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <vector>

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

// The planes the compaction moves memory in must not share bytes: neither two views of one buffer nor
// one tensor's own planes (e.g. an as_strided batch stride smaller than a plane). Exact, not a
// conservative extent test, so K and V interleaved in one allocation stay valid.
inline void check_planes_disjoint(at::TensorList tensors) {
  struct PlaneBytes {
    const void* storage;
    int64_t begin, end;
    size_t tensor;
  };
  std::vector<PlaneBytes> planes;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const SlotView s = slot_view(t);
    const int64_t cap = t.size(t.dim() == 4 ? 2 : 1), plane_bytes = cap * s.slot_elems * s.elem_size;
    const void* storage = t.storage().unsafeGetStorageImpl();
    for (int64_t b = 0; b < t.size(0); ++b)
      for (int64_t h = 0; h < s.heads; ++h) {
        const int64_t begin = (t.storage_offset() + b * s.batch_stride + h * s.head_stride) * s.elem_size;
        planes.push_back({storage, begin, begin + plane_bytes, i});
      }
  }
  std::sort(planes.begin(), planes.end(), [](const PlaneBytes& a, const PlaneBytes& b) {
    return a.storage != b.storage ? std::less<const void*>()(a.storage, b.storage) : a.begin < b.begin;
  });
  for (size_t n = 1, widest = 0; n < planes.size(); ++n) {
    const PlaneBytes &prev = planes[widest], &cur = planes[n];
    if (cur.storage == prev.storage && cur.begin < prev.end) {
      const size_t i = std::min(prev.tensor, cur.tensor), j = std::max(prev.tensor, cur.tensor);
      if (i == j)
        ANLLM_CHECK(false, "tensors[", i, "] has overlapping memory (its planes share bytes); compact a "
                    "materialised buffer");
      ANLLM_CHECK(false, "tensors[", i, "] and tensors[", j,
                  "] share memory (views of overlapping memory); compact each buffer once");
    }
    if (cur.storage != prev.storage || cur.end > prev.end) widest = n;
  }
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
    for (size_t j = 0; j < i; ++j)
      ANLLM_CHECK(!tensors[j].is_same(t), "tensors[", j, "] and tensors[", i,
                  "] are the same tensor (they share memory); compact each buffer once");
    if (t.numel() == 0) continue;  // nothing to move; ATen gives empty tensors degenerate strides
    const bool planes_contiguous =
        t.dim() == 4 ? (t.stride(3) == 1 && t.stride(2) == t.size(3)) : t.stride(1) == 1;
    ANLLM_CHECK(planes_contiguous, "tensors[", i,
                "] must have contiguous slots (each [capacity, dim] plane contiguous), got strides ",
                t.strides());
    ANLLM_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, "tensors[", i,
                "] has overlapping memory (e.g. an expanded tensor); compact a materialised buffer");
    if (t.dim() == 4) p.heads_per_tensor_max = std::max(p.heads_per_tensor_max, t.size(1));
  }
  check_planes_disjoint(tensors);
  return p;
}

}  // namespace anllm
