// token_layout on the CPU: the per-token layout of a [B, T] chunk of ids in one pass per row
// (docs/method.md, section "Anchors and segments"), plus where the next chunk starts and whether the chunk holds an anchor or padding.
//
// Python's token_layout runs this for CPU inputs: a decode step needs the layout of one token, which as
// a dozen small ATen ops costs more than the step's attention bookkeeping should. Other devices use
// the ATen formulation in anllm_ext/layout.py, which the tests compare against this kernel.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"

namespace anllm {
namespace {

constexpr int64_t kLinearScanAnchors = 16;  // more anchor ids than this: binary search a sorted copy

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
token_layout_cpu(const at::Tensor& input_ids, const at::Tensor& anchor_ids, const std::optional<at::Tensor>& attention_mask,
                 const at::Tensor& start_pos, const at::Tensor& start_seg) {
  ANLLM_CHECK_RANK(input_ids, 2);
  ANLLM_CHECK(at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false),
              "input_ids must hold integer token ids, got dtype ", input_ids.scalar_type());
  ANLLM_CHECK_RANK(anchor_ids, 1);
  ANLLM_CHECK_DTYPE(anchor_ids, at::kLong);
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  ANLLM_CHECK_SHAPE(start_pos, B);
  ANLLM_CHECK_SHAPE(start_seg, B);
  ANLLM_CHECK_DTYPE(start_pos, at::kLong);
  ANLLM_CHECK_DTYPE(start_seg, at::kLong);
  for (const at::Tensor* t : {&anchor_ids, &start_pos, &start_seg})
    ANLLM_CHECK(t->device() == input_ids.device(), "all inputs must be on ", input_ids.device(), ", got one on ",
                t->device());
  at::Tensor valid_in;
  if (attention_mask.has_value() && attention_mask->defined()) {
    ANLLM_CHECK(attention_mask->sizes() == input_ids.sizes(), "attention_mask must have the shape of input_ids ",
                input_ids.sizes(), ", got ", attention_mask->sizes());
    ANLLM_CHECK_SAME_DEVICE(*attention_mask, input_ids);
    valid_in = (attention_mask->scalar_type() == at::kBool ? *attention_mask : attention_mask->ne(0)).contiguous();
  }
  const at::Tensor ids = input_ids.to(at::kLong).contiguous();
  const at::Tensor start_pos_c = start_pos.contiguous(), start_seg_c = start_seg.contiguous();

  std::vector<int64_t> anchors(anchor_ids.data_ptr<int64_t>(), anchor_ids.data_ptr<int64_t>() + anchor_ids.numel());
  const bool sorted = static_cast<int64_t>(anchors.size()) > kLinearScanAnchors;
  if (sorted) std::sort(anchors.begin(), anchors.end());
  auto is_anchor_id = [&](int64_t id) {
    if (sorted) return std::binary_search(anchors.begin(), anchors.end(), id);
    for (int64_t a : anchors)
      if (a == id) return true;
    return false;
  };

  const auto opts = ids.options();
  auto pos = at::empty({B, T}, opts);
  auto seg = at::empty({B, T}, opts.dtype(at::kInt));
  auto is_anchor = at::empty({B, T}, opts.dtype(at::kBool));
  auto val = at::empty({B, T}, opts.dtype(at::kBool));
  auto next_pos = at::empty({B}, opts);
  auto next_seg = at::empty({B}, opts);
  bool boundary = false;
  const int64_t* ip = ids.data_ptr<int64_t>();
  const bool* mp = valid_in.defined() ? valid_in.data_ptr<bool>() : nullptr;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p0 = start_pos_c.data_ptr<int64_t>()[b];
    int64_t n_valid = 0, s = start_seg_c.data_ptr<int64_t>()[b];
    ANLLM_CHECK(p0 >= 0 && p0 <= std::numeric_limits<int64_t>::max() - T, "start position of row ", b, " is ",
                p0, "; positions must stay in [0, 2^63 - 1] over the chunk's ", T, " tokens");
    ANLLM_CHECK(s >= std::numeric_limits<int32_t>::min() && s <= std::numeric_limits<int32_t>::max() - T,
                "segment ids of row ", b, " would leave the int32 range (start segment ", s, ")");
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      const bool v = mp == nullptr || mp[i];
      const bool a = v && is_anchor_id(ip[i]);
      seg.data_ptr<int32_t>()[i] = static_cast<int32_t>(s);  // anchors strictly before t
      pos.data_ptr<int64_t>()[i] = v ? p0 + n_valid : p0;    // padding gets the row's start position
      is_anchor.data_ptr<bool>()[i] = a;
      val.data_ptr<bool>()[i] = v;
      n_valid += v;
      s += a;
      boundary |= a || !v;
    }
    next_pos.data_ptr<int64_t>()[b] = p0 + n_valid;
    next_seg.data_ptr<int64_t>()[b] = s;
  }
  return {pos, seg, is_anchor, val, next_pos, next_seg, at::scalar_tensor(boundary, opts.dtype(at::kBool))};
}

}  // namespace

TORCH_LIBRARY_IMPL(anllm, CPU, m) { m.impl("token_layout", &token_layout_cpu); }

}  // namespace anllm
