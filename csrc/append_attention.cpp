// anchor_attention_append_: one call per layer and decode step of an AnchorCache. Writes the new
// tokens' keys/values into the layer's preallocated cache at each row's own offset, then runs
// anchor_attention_fwd over the first Tk slots. Fusing the two saves the per-layer Python and
// dispatcher round trips of separate copies (a decode step is ~30 such layers of tiny work).
//
// Device-agnostic: the writes are ATen copies (plain row copies on the CPU) and the attention goes
// through the dispatcher, so one registration (CompositeExplicitAutograd: every backend, below
// autograd) serves the CPU and CUDA kernels. The CUDA emulator's test build (csrc/emu/) compiles this
// file too, with ANLLM_OP_NAMESPACE naming its own operator namespace.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checks.h"

#ifndef ANLLM_OP_NAMESPACE
#define ANLLM_OP_NAMESPACE "anllm"
#endif

namespace anllm {
namespace {

std::tuple<at::Tensor, at::Tensor> call_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
    const at::Tensor& q_seg, const at::Tensor& q_is_anchor, const at::Tensor& q_valid,
    const at::Tensor& k_pos, const at::Tensor& k_seg, const at::Tensor& k_is_anchor,
    const at::Tensor& k_valid, double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow(ANLLM_OP_NAMESPACE "::anchor_attention_fwd", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(q, k, v, q_pos, q_seg, q_is_anchor, q_valid, k_pos, k_seg, k_is_anchor, k_valid, scale);
}

// [first, last] byte a tensor's elements can touch in its storage (numel() > 0).
std::pair<int64_t, int64_t> byte_extent(const at::Tensor& t) {
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) (t.stride(d) >= 0 ? hi : lo) += (t.size(d) - 1) * t.stride(d);
  return {lo * t.element_size(), (hi + 1) * t.element_size() - 1};
}

// The new keys/values are copied row by row into the cache: a source that is a view of the cache would
// be read after some of its rows were overwritten. Conservative (whole extents), which no real caller
// trips: new keys come from the projections, never from the cache's own memory.
void check_new_tokens_outside_cache(const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& k_cache,
                                    const at::Tensor& v_cache) {
  const std::pair<const at::Tensor*, const char*> news[] = {{&k_new, "k_new"}, {&v_new, "v_new"}};
  const std::pair<const at::Tensor*, const char*> caches[] = {{&k_cache, "k_cache"}, {&v_cache, "v_cache"}};
  for (const auto& [src, src_name] : news)
    for (const auto& [dst, dst_name] : caches) {
      if (src->numel() == 0 || dst->numel() == 0 || !src->storage().is_alias_of(dst->storage())) continue;
      const auto a = byte_extent(*src), c = byte_extent(*dst);
      ANLLM_CHECK(a.second < c.first || c.second < a.first, src_name, " overlaps the memory of ", dst_name,
                  " (a view of the cache); pass the new keys/values in their own tensors");
    }
}

// Validates the cache side of the call; the attention inputs are checked by anchor_attention_fwd.
void check_append_inputs(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                         const at::Tensor& k_cache, const at::Tensor& v_cache, at::IntArrayRef offsets,
                         int64_t Tk) {
  ANLLM_CHECK_RANK(q, 4);
  ANLLM_CHECK_RANK(k_new, 4);
  ANLLM_CHECK_RANK(v_new, 4);
  ANLLM_CHECK_RANK(k_cache, 4);
  ANLLM_CHECK_RANK(v_cache, 4);
  const int64_t B = k_cache.size(0), T = q.size(2), cap = k_cache.size(2);
  ANLLM_CHECK(v_cache.sizes() == k_cache.sizes(), "k_cache and v_cache must have the same shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  ANLLM_CHECK(k_new.size(0) == B && k_new.size(1) == k_cache.size(1) && k_new.size(2) == T &&
                  k_new.size(3) == k_cache.size(3),
              "k_new must have shape [", B, ", ", k_cache.size(1), ", ", T, ", ", k_cache.size(3),
              "] (the cache's batch, heads and head dim; q's tokens), got ", k_new.sizes());
  ANLLM_CHECK(v_new.sizes() == k_new.sizes(), "k_new and v_new must have the same shape, got ",
              k_new.sizes(), " and ", v_new.sizes());
  ANLLM_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share one dtype, got ",
              k_cache.scalar_type(), " and ", v_cache.scalar_type());
  ANLLM_CHECK_SAME_DEVICE(k_new, k_cache);
  ANLLM_CHECK_SAME_DEVICE(v_new, k_cache);
  ANLLM_CHECK_SAME_DEVICE(v_cache, k_cache);
  ANLLM_CHECK(static_cast<int64_t>(offsets.size()) == B, "offsets must have one entry per row (", B,
              "), got ", offsets.size());
  ANLLM_CHECK(Tk >= 0 && Tk <= cap, "the key layout describes ", Tk, " slots but the cache holds ", cap);
  for (int64_t b = 0; b < B; ++b)  // offsets[b] <= Tk - T, not offsets[b] + T <= Tk: no int64 overflow
    ANLLM_CHECK(offsets[b] >= 0 && offsets[b] <= Tk - T, "offsets[", b, "] = ", offsets[b], " puts ", T,
                " new tokens outside the ", Tk, " slots the key layout describes");
  check_new_tokens_outside_cache(k_new, v_new, k_cache, v_cache);
}

// dst[b, h, offsets[b] + t, :] = src[b, h, t, :] for CPU tensors of one dtype, contiguous in the last
// dim: plain row copies (no TensorIterator, whose set-up outweighs a decode step's few rows).
void copy_rows_cpu(const at::Tensor& src, at::Tensor& dst, at::IntArrayRef offsets) {
  const int64_t B = src.size(0), H = src.size(1), T = src.size(2);
  const int64_t elem = src.element_size(), row_bytes = src.size(3) * elem;
  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t)
        std::memcpy(d + (b * dst.stride(0) + h * dst.stride(1) + (offsets[b] + t) * dst.stride(2)) * elem,
                    s + (b * src.stride(0) + h * src.stride(1) + t * src.stride(2)) * elem, row_bytes);
}

bool plain_row_copy(const at::Tensor& src, const at::Tensor& dst) {
  return dst.device().is_cpu() && src.scalar_type() == dst.scalar_type() && src.stride(3) == 1 &&
         dst.stride(3) == 1;
}

void write_new_tokens(const at::Tensor& src, at::Tensor& dst, at::IntArrayRef offsets) {
  const int64_t B = dst.size(0), T = src.size(2);
  if (T == 0 || B == 0) return;
  if (plain_row_copy(src, dst)) return copy_rows_cpu(src, dst, offsets);
  if (std::all_of(offsets.begin(), offsets.end(), [&](int64_t o) { return o == offsets[0]; })) {
    dst.narrow(2, offsets[0], T).copy_(src);  // one slice copy for all rows
    return;
  }
  for (int64_t b = 0; b < B; ++b) dst.select(0, b).narrow(1, offsets[b], T).copy_(src.select(0, b));
}

std::tuple<at::Tensor, at::Tensor> anchor_attention_append(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, at::Tensor& k_cache,
    at::Tensor& v_cache, at::IntArrayRef offsets, const at::Tensor& q_pos, const at::Tensor& q_seg,
    const at::Tensor& q_is_anchor, const at::Tensor& q_valid, const at::Tensor& k_pos,
    const at::Tensor& k_seg, const at::Tensor& k_is_anchor, const at::Tensor& k_valid, double scale) {
  const int64_t Tk = k_pos.dim() == 2 ? k_pos.size(1) : -1;
  check_append_inputs(q, k_new, v_new, k_cache, v_cache, offsets, Tk);
  write_new_tokens(k_new, k_cache, offsets);
  write_new_tokens(v_new, v_cache, offsets);
  return call_attention_fwd(q, k_cache.narrow(2, 0, Tk), v_cache.narrow(2, 0, Tk), q_pos, q_seg, q_is_anchor,
                            q_valid, k_pos, k_seg, k_is_anchor, k_valid, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(anllm, CompositeExplicitAutograd, m) {
  m.impl("anchor_attention_append_", &anchor_attention_append);
}

}  // namespace anllm
