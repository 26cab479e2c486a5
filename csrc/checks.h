// Input validation shared by every device implementation. Each failure raises a Python RuntimeError
// that names the argument and what was expected, before any kernel touches memory.
#pragma once

#include <torch/types.h>

#define ANLLM_CHECK(cond, ...) TORCH_CHECK(cond, "anllm: ", __VA_ARGS__)

#define ANLLM_CHECK_RANK(t, r) \
  ANLLM_CHECK((t).dim() == (r), #t " must be a " #r "-D tensor, got shape ", (t).sizes())

#define ANLLM_CHECK_DTYPE(t, dt) \
  ANLLM_CHECK((t).scalar_type() == (dt), #t " must have dtype ", (dt), ", got ", (t).scalar_type())

#define ANLLM_CHECK_SAME_DEVICE(t, ref)                                                          \
  ANLLM_CHECK((t).device() == (ref).device(), #t " is on ", (t).device(), " but " #ref " is on ", \
              (ref).device(), "; all inputs must be on one device")

#define ANLLM_CHECK_SHAPE(t, ...)                                                         \
  ANLLM_CHECK((t).sizes() == at::IntArrayRef({__VA_ARGS__}), #t " must have shape ",     \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (t).sizes())

namespace anllm {

// One side's per-token layout as the kernels see it: all four tensors [B, T], contiguous.
struct LayoutTensors {
  at::Tensor pos;     // int64
  at::Tensor seg;     // int32
  at::Tensor is_anchor;  // bool
  at::Tensor valid;   // bool
};

inline void check_layout(const LayoutTensors& l, int64_t B, int64_t T, const at::Tensor& ref,
                         const char* side) {
  const std::pair<const at::Tensor*, const char*> parts[] = {
      {&l.pos, "positions"}, {&l.seg, "segments"}, {&l.is_anchor, "is_anchor"}, {&l.valid, "valid"}};
  const at::ScalarType want[] = {at::kLong, at::kInt, at::kBool, at::kBool};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *parts[i].first;
    ANLLM_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T, side, " layout ", parts[i].second,
                " must have shape [", B, ", ", T, "] to match the ", side,
                " tensor, got ", t.sizes());
    ANLLM_CHECK(t.scalar_type() == want[i], side, " layout ", parts[i].second, " must have dtype ",
                want[i], ", got ", t.scalar_type());
    ANLLM_CHECK(t.device() == ref.device(), side, " layout ", parts[i].second, " is on ", t.device(),
                " but the ", side, " tensor is on ", ref.device());
  }
}

struct AttentionShape {
  int64_t B, Hq, Hkv, Tq, Tk, D;
};

// Validates q/k/v and both layouts; returns the problem's sizes.
inline AttentionShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const LayoutTensors& ql,
                                             const LayoutTensors& kl) {
  ANLLM_CHECK_RANK(q, 4);
  ANLLM_CHECK_RANK(k, 4);
  ANLLM_CHECK_RANK(v, 4);
  ANLLM_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                  q.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16, got ", q.scalar_type());
  ANLLM_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  ANLLM_CHECK_SAME_DEVICE(k, q);
  ANLLM_CHECK_SAME_DEVICE(v, q);
  AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  ANLLM_CHECK(k.size(0) == s.B && v.size(0) == s.B, "batch sizes differ: q has ", s.B, ", k has ",
              k.size(0), ", v has ", v.size(0));
  ANLLM_CHECK(v.sizes() == k.sizes(), "k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  ANLLM_CHECK(s.Hkv > 0 && s.Hq % s.Hkv == 0, "the number of query heads (", s.Hq,
              ") must be a multiple of the number of key/value heads (", s.Hkv, ")");
  ANLLM_CHECK(k.size(3) == s.D, "q and k must have the same head dim, got ", s.D, " and ", k.size(3));
  ANLLM_CHECK(s.D >= 1 && s.D <= 256, "head dim must be between 1 and 256, got ", s.D);
  ANLLM_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "q, k and v must be contiguous in the head dim");
  check_layout(ql, s.B, s.Tq, q, "query");
  check_layout(kl, s.B, s.Tk, k, "key");
  return s;
}

}  // namespace anllm
