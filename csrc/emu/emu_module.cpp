// anllm_ext_cuda_emu: the CUDA kernels of csrc/cuda/ (the exact sources) compiled as host C++ under the
// CUDA emulator (cuda_emu.h), as one translation unit. Test-only: built by `make test-cuda-emu` into
// build/cuda_emu/, never part of the wheel. Loaded with torch.ops.load_library, it registers
//   torch.ops.anllm_cuda_emu.{anchor_attention_fwd, anchor_attention_bwd, compact_, anchor_attention_append_}
// (the schemas of csrc/ops.cpp; CPU tensors in, the CUDA launchers and kernels run emulated, the
// tensor-core ones on the emulator's WMMA), plus the emulator's controls (emu_*) and the self-test
// kernels of emu_selftest.inc.
#define ANLLM_CUDA_EMU 1
#define ANLLM_EMU_RUNTIME 1

#include <torch/library.h>

#include "cuda_emu.h"

// The schemas of torch.ops.anllm, registered under the emulator's namespace.
#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m) _TORCH_LIBRARY_FRAGMENT(anllm_cuda_emu, m, C10_UID)
#include "../ops.cpp"

// The device-agnostic append op (its CUDA registration runs the CUDA forward through the dispatcher):
// here it writes the cache and calls torch.ops.anllm_cuda_emu.anchor_attention_fwd, the emulated kernels.
#define ANLLM_OP_NAMESPACE "anllm_cuda_emu"
#include "../append_attention.cpp"

#include "../cuda/layout_index.cu"
#include "../cuda/anchor_attention_fwd.cu"
#include "../cuda/anchor_attention_bwd.cu"
#include "../cuda/compact.cu"

#include "emu_selftest.inc"

// Every __launch_bounds__ argument of a non-template kernel: its section and its value (a kernel whose
// bound is not listed here runs unchecked; test_cuda_emu.py checks that every kernel's is found).
// Template kernels register their bound through ANLLM_KERNEL (cuda_emu.h).
#define ANLLM_EMU_LAUNCH_BOUNDS(token, value)                                                          \
  extern "C" const char __start_anllm_emu_lb_##token[] __attribute__((weak, visibility("hidden"))); \
  extern "C" const char __stop_anllm_emu_lb_##token[] __attribute__((weak, visibility("hidden")));  \
  static const int anllm_emu_lb_reg_##token =                                                        \
      (::anllm_emu::register_launch_bound(__start_anllm_emu_lb_##token, __stop_anllm_emu_lb_##token, \
                                          (value), #token),                                          \
       0);

ANLLM_EMU_LAUNCH_BOUNDS(kIndexThreads, anllm::cuda::kIndexThreads)
ANLLM_EMU_LAUNCH_BOUNDS(kPlanThreads, anllm::cuda::kPlanThreads)
ANLLM_EMU_LAUNCH_BOUNDS(kMoveThreads, anllm::cuda::kMoveThreads)
ANLLM_EMU_LAUNCH_BOUNDS(128, 128)
ANLLM_EMU_LAUNCH_BOUNDS(32, 32)

namespace anllm_emu {
namespace {

// The device key index of one layout side (layout_index.cu), as tensors: i32 [5, B, nC] (seg_min,
// seg_max, flags, pm_seg_max, sm_seg_min), i64 [4, B, nC] (pos_min, pos_max, pos_max_na,
// pm_pos_max_na), and with anchors: a_i32 [2, B, T] (idx, seg), a_i64 [2, B, T] (pos, smin_pos),
// count int32 [B].
std::vector<at::Tensor> side_index(const at::Tensor& pos, const at::Tensor& seg, const at::Tensor& is_anchor,
                                   const at::Tensor& valid, bool with_anchors) {
  const anllm::LayoutTensors l{pos.contiguous(), seg.contiguous(), is_anchor.contiguous(), valid.contiguous()};
  anllm::cuda::SideIndex side;
  anllm::cuda::AnchorIndex anchors;
  anllm::cuda::build_side_index(l, side, with_anchors ? &anchors : nullptr);
  if (!with_anchors) return {side.i32, side.i64};
  return {side.i32, side.i64, anchors.i32, anchors.i64, anchors.cnt};
}

void set_seed(int64_t seed) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  state().seed = static_cast<uint64_t>(seed);
  state().rng.seed(static_cast<uint64_t>(seed));
}

void set_fast_math(bool on) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  state().fast_math = on;
}

int64_t set_sm_count(int64_t n) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  TORCH_CHECK(n >= 1, "SM count must be positive");
  const int64_t old = device_props().multiProcessorCount;
  device_props().multiProcessorCount = static_cast<int>(n);
  return old;
}

std::vector<int64_t> stats() {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  const Stats& s = state().stats;
  return {s.launches, s.blocks, s.switches, s.barriers, s.warp_collectives};
}

std::vector<std::string> launch_log(bool clear) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  auto log = state().stats.log;
  if (clear) state().stats.log.clear();
  return log;
}

// [__launch_bounds__, static shared bytes (-1 before the first block), launches] of every kernel run so far
// whose name contains `name_part`.
std::vector<int64_t> kernel_info(const std::string& name_part) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  std::vector<int64_t> out;
  for (const auto& [key, rec] : state().kernels) {
    if (rec.name.find(name_part) == std::string::npos) continue;
    const char* token = nullptr;
    out.push_back(launch_bound_of(key, &token));
    out.push_back(rec.static_smem);
    out.push_back(rec.launches);
  }
  return out;
}

}  // namespace
}  // namespace anllm_emu

TORCH_LIBRARY_FRAGMENT(anllm_cuda_emu, m) {
  m.def("emu_side_index(Tensor pos, Tensor seg, Tensor is_anchor, Tensor valid, bool with_anchors) -> Tensor[]");
  m.def("emu_set_seed(int seed) -> ()", &anllm_emu::set_seed);
  m.def("emu_set_fast_math(bool on) -> ()", &anllm_emu::set_fast_math);
  m.def("emu_set_sm_count(int n) -> int", &anllm_emu::set_sm_count);
  m.def("emu_stats() -> int[]", &anllm_emu::stats);
  m.def("emu_launch_log(bool clear) -> str[]", &anllm_emu::launch_log);
  m.def("emu_kernel_info(str name_part) -> int[]", &anllm_emu::kernel_info);
  m.def("emu_selftest(str name, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(anllm_cuda_emu, CPU, m) {
  m.impl("emu_side_index", &anllm_emu::side_index);
  m.impl("emu_selftest", &anllm_emu_selftest::run);
}
