// Operator schemas of the torch.ops.anllm namespace. Device implementations live in one file per
// concern and device (cpu/*.cpp, cuda/*.cu); the device-agnostic append op (append_attention.cpp) is
// registered once for every backend; fake kernels and autograd are registered from Python
// (anllm_ext/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(anllm, m) {
  // Per-token layout of a [B,T] chunk of ids (docs/method.md, section "Anchors and segments"): positions int64, segments int32,
  // is_anchor and valid bool [B,T] (valid = attention_mask != 0, all true without a mask), where the
  // chunk starts in every row (start_pos, start_seg int64 [B]), and what follows from it: the next
  // chunk's start (int64 [B] each) and whether any row holds an anchor or padding (0-d bool).
  m.def(
      "token_layout(Tensor input_ids, Tensor anchor_ids, Tensor? attention_mask, Tensor start_pos, "
      "Tensor start_seg) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Attention under the AnSAN mask evaluated from per-token layouts of queries and keys.
  // q [B,Hq,Tq,D]; k, v [B,Hkv,Tk,D]; layouts [B,T] (positions int64, segments int32, bool flags).
  // Returns out [B,Hq,Tq,D] and the fp32 log-sum-exp of each query's scores [B,Hq,Tq] (-inf when the
  // query sees nothing, in which case out is zero).
  m.def(
      "anchor_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor q_pos, Tensor q_seg, "
      "Tensor q_is_anchor, Tensor q_valid, Tensor k_pos, Tensor k_seg, Tensor k_is_anchor, "
      "Tensor k_valid, float scale) -> (Tensor, Tensor)");
  // Gradients of anchor_attention_fwd. delta = rowsum(dout * out) - dlse, fp32 [B,Hq,Tq].
  m.def(
      "anchor_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, "
      "Tensor q_pos, Tensor q_seg, Tensor q_is_anchor, Tensor q_valid, Tensor k_pos, Tensor k_seg, "
      "Tensor k_is_anchor, Tensor k_valid, float scale) -> (Tensor, Tensor, Tensor)");
  // Inference with a preallocated cache (AnchorCache), one call per layer: writes k_new/v_new
  // [B,Hkv,Tq,D] into k_cache/v_cache [B,Hkv,Cap,D] at slots offsets[b] .. offsets[b]+Tq-1 of every
  // row b, then returns anchor_attention_fwd of q over the first Tk slots (Tk = the key layout's
  // length, which describes those slots, new tokens included).
  m.def(
      "anchor_attention_append_(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, int[] offsets, Tensor q_pos, Tensor q_seg, Tensor q_is_anchor, Tensor q_valid, "
      "Tensor k_pos, Tensor k_seg, Tensor k_is_anchor, Tensor k_valid, float scale) -> (Tensor, Tensor)");
  // In place: moves the kept slots among the first lengths[b] of every row of every tensor to the
  // front, order preserved. tensors: [B,H,Cap,D] caches or [B,Cap] per-slot tensors; keep bool [B,Cap];
  // lengths int64 [B]. Returns the new lengths.
  m.def("compact_(Tensor(a!)[] tensors, Tensor keep, Tensor lengths) -> Tensor");
}
