// CPU registration of anchor_attention_fwd/bwd with run-time selection of the kernel variant
// (cpu/dispatch.h). This file is compiled with the baseline flags: it must run on any CPU, since it
// decides which instructions the kernels may use.
//
// ANLLM_CPU_CAPABILITY=default|avx2|avx512 caps the choice, as ATEN_CPU_CAPABILITY does for ATen:
// the best variant that is built, supported by this CPU and not above the cap runs.
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "../checks.h"
#include "dispatch.h"

// Entry points of the variants (cpu/attention_*.cpp). Weak: a build without a variant (another
// architecture, ANLLM_CPU_FLAGS builds) leaves its entry null.
extern "C" const anllm::CpuAttentionKernels* anllm_cpu_attention_default();
extern "C" const anllm::CpuAttentionKernels* anllm_cpu_attention_avx2() __attribute__((weak));
extern "C" const anllm::CpuAttentionKernels* anllm_cpu_attention_avx512() __attribute__((weak));

namespace anllm {
namespace {

constexpr int64_t kDefaultScratchMiB = 512;

struct Variant {
  const char* name;
  const CpuAttentionKernels* (*entry)();
  bool (*supported)();
};

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {  // the AVX-512 subsets ATen's AVX512 capability needs (libgcc checks OS support)
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool always() { return true; }

// Lowest capability first.
const Variant kVariants[] = {
    {"default", &anllm_cpu_attention_default, &always},
    {"avx2", &anllm_cpu_attention_avx2, &cpu_has_avx2},
    {"avx512", &anllm_cpu_attention_avx512, &cpu_has_avx512},
};
constexpr int kNumVariants = sizeof(kVariants) / sizeof(kVariants[0]);

// Index of the highest variant ANLLM_CPU_CAPABILITY allows (all of them when unset).
int capability_cap() {
  const char* env = std::getenv("ANLLM_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return kNumVariants - 1;
  std::string want(env);
  std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::tolower(c); });
  for (int i = 0; i < kNumVariants; ++i)
    if (want == kVariants[i].name) return i;
  ANLLM_CHECK(false, "ANLLM_CPU_CAPABILITY must be one of default, avx2, avx512; got '", env, "'");
  return 0;
}

const Variant& selected_variant() {
  // Chosen once per process (like ATen's capability); an invalid ANLLM_CPU_CAPABILITY throws here on
  // every call instead, since the static stays uninitialised.
  static const Variant* chosen = [] {
    const int cap = capability_cap();
    for (int i = cap; i > 0; --i)
      if (kVariants[i].entry != nullptr && kVariants[i].supported()) return &kVariants[i];
    return &kVariants[0];
  }();
  return *chosen;
}

std::tuple<at::Tensor, at::Tensor> anchor_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
    const at::Tensor& q_seg, const at::Tensor& q_is_anchor, const at::Tensor& q_valid,
    const at::Tensor& k_pos, const at::Tensor& k_seg, const at::Tensor& k_is_anchor,
    const at::Tensor& k_valid, double scale) {
  return cpu_attention_kernels().fwd(q, k, v, q_pos, q_seg, q_is_anchor, q_valid, k_pos, k_seg, k_is_anchor,
                                     k_valid, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> anchor_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& q_pos, const at::Tensor& q_seg,
    const at::Tensor& q_is_anchor, const at::Tensor& q_valid, const at::Tensor& k_pos,
    const at::Tensor& k_seg, const at::Tensor& k_is_anchor, const at::Tensor& k_valid, double scale) {
  return cpu_attention_kernels().bwd(dout, q, k, v, lse, delta, q_pos, q_seg, q_is_anchor, q_valid, k_pos,
                                     k_seg, k_is_anchor, k_valid, scale);
}

int64_t scratch_budget_bytes() {
  const char* env = std::getenv("ANLLM_CPU_BWD_SCRATCH_MB");
  if (env == nullptr || *env == '\0') return kDefaultScratchMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(env, &end, 10);
  ANLLM_CHECK(end != env && *end == '\0' && mib >= 0,
              "ANLLM_CPU_BWD_SCRATCH_MB must be a whole number of MiB (0 or more), got '", env, "'");
  return static_cast<int64_t>(mib) << 20;
}

}  // namespace

const char* cpu_capability() { return selected_variant().name; }

std::vector<std::string> built_cpu_capabilities() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants)
    if (v.entry != nullptr) names.emplace_back(v.name);
  return names;
}

const CpuAttentionKernels& cpu_attention_kernels() { return *selected_variant().entry(); }

CpuBackwardPlan plan_cpu_backward(int64_t B, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, int64_t threads) {
  const int64_t n_qtiles = (Tq + kQueryTileBwd - 1) / kQueryTileBwd;
  const int64_t rows = std::max<int64_t>(B * Hkv, 1);
  // Enough items for 4 per thread, at most one per query tile.
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(n_qtiles, (4 * threads + rows - 1) / rows));
  const int64_t partial_bytes = 2 * B * Hkv * Tk * D * static_cast<int64_t>(sizeof(float));  // dk + dv
  if (partial_bytes > 0) splits = std::min(splits, 1 + scratch_budget_bytes() / partial_bytes);
  return {splits, (splits - 1) * partial_bytes};
}

TORCH_LIBRARY_IMPL(anllm, CPU, m) {
  m.impl("anchor_attention_fwd", &anchor_attention_fwd_cpu);
  m.impl("anchor_attention_bwd", &anchor_attention_bwd_cpu);
}

}  // namespace anllm
