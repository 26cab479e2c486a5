// In-place, order-preserving compaction of cache slots on the CPU.
//
// For every row b, the kept slots among the first lengths[b] move to the front of every tensor, in
// order. Kept slots only ever move towards lower indices, so walking the runs of kept slots in
// increasing order with memmove is safe in place: no scratch buffer proportional to the cache.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../compact_common.h"

namespace anllm {
namespace {

constexpr size_t kPrefetchRuns = 24;

inline void prefetch_bytes(const char* p, int64_t n, bool for_write) {
  if (for_write)
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 1, 3);
  else
    for (int64_t off = 0; off < n; off += 64) __builtin_prefetch(p + off, 0, 3);
}

at::Tensor compact_cpu(at::TensorList tensors, const at::Tensor& keep_in, const at::Tensor& lengths_in) {
  const CompactProblem p = check_compact_inputs(tensors, keep_in, lengths_in);
  const at::Tensor keep = keep_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t B = p.B, cap = keep.size(1);
  const bool* kp = keep.data_ptr<bool>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    ANLLM_CHECK(lp[b] >= 0 && lp[b] <= p.cap, "lengths[", b, "] = ", lp[b],
                " is outside [0, capacity = ", p.cap, "]");

  // Runs of kept slots that have to move: (src, dst, count) per row, in increasing order.
  struct Run { int64_t src, dst, count; };
  std::vector<std::vector<Run>> runs(B);
  auto new_lengths = at::empty({B}, lengths.options());
  for (int64_t b = 0; b < B; ++b) {
    const bool* kb = kp + b * cap;
    int64_t dst = 0;
    for (int64_t j = 0; j < lp[b];) {
      if (!kb[j]) { ++j; continue; }
      int64_t end = j;
      while (end < lp[b] && kb[end]) ++end;
      if (j != dst) runs[b].push_back({j, dst, end - j});
      dst += end - j;
      j = end;
    }
    new_lengths.data_ptr<int64_t>()[b] = dst;
  }

  // One work item per (tensor, row, head): independent memory, so all layers go in one parallel loop.
  const int64_t n_items = static_cast<int64_t>(tensors.size()) * B * p.heads_per_tensor_max;
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t ti = item / (B * p.heads_per_tensor_max);
      const int64_t b = (item / p.heads_per_tensor_max) % B;
      const int64_t h = item % p.heads_per_tensor_max;
      const SlotView sv = slot_view(tensors[ti]);
      if (h >= sv.heads || runs[b].empty()) continue;
      char* base = static_cast<char*>(tensors[ti].data_ptr()) +
                   (b * sv.batch_stride + h * sv.head_stride) * sv.elem_size;
      const int64_t slot_bytes = sv.slot_elems * sv.elem_size;
      const std::vector<Run>& rs = runs[b];
      for (size_t i = 0; i < rs.size(); ++i) {
        // Kept slots are scattered over a cache far larger than the CPU caches, so each run is a
        // few cache misses; prefetching runs ahead keeps many of them in flight at once.
        if (i + kPrefetchRuns < rs.size()) {
          const Run& ahead = rs[i + kPrefetchRuns];
          const int64_t n = std::min<int64_t>(ahead.count * slot_bytes, 1024);
          prefetch_bytes(base + ahead.src * slot_bytes, n, false);
          prefetch_bytes(base + ahead.dst * slot_bytes, n, true);
        }
        std::memmove(base + rs[i].dst * slot_bytes, base + rs[i].src * slot_bytes, rs[i].count * slot_bytes);
      }
    }
  });
  return new_lengths;
}

}  // namespace

TORCH_LIBRARY_IMPL(anllm, CPU, m) { m.impl("compact_", &compact_cpu); }

}  // namespace anllm
