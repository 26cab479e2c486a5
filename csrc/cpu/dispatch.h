// Run-time CPU dispatch of the attention kernels, after ATen's DispatchStub: the kernel source
// (cpu/attention_kernels.h) is compiled once per capability (baseline x86-64, AVX2+FMA, AVX-512),
// each into its own namespace with one C entry point; cpu/anchor_attention.cpp picks the best one
// this CPU supports, or the one ANLLM_CPU_CAPABILITY caps it to.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace anllm {

using AttentionFwdFn = std::tuple<at::Tensor, at::Tensor> (*)(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
    const at::Tensor& q_seg, const at::Tensor& q_is_anchor, const at::Tensor& q_valid,
    const at::Tensor& k_pos, const at::Tensor& k_seg, const at::Tensor& k_is_anchor,
    const at::Tensor& k_valid, double scale);
using AttentionBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& q_pos, const at::Tensor& q_seg,
    const at::Tensor& q_is_anchor, const at::Tensor& q_valid, const at::Tensor& k_pos,
    const at::Tensor& k_seg, const at::Tensor& k_is_anchor, const at::Tensor& k_valid, double scale);

struct CpuAttentionKernels {
  AttentionFwdFn fwd;
  AttentionBwdFn bwd;
};

// Name of the kernel variant the CPU ops run ("default", "avx2" or "avx512"). Throws a c10::Error
// naming the problem when ANLLM_CPU_CAPABILITY holds an unknown value.
const char* cpu_capability();
// The variants compiled into this build, baseline first.
std::vector<std::string> built_cpu_capabilities();
const CpuAttentionKernels& cpu_attention_kernels();

// Query rows per backward tile (the unit of the backward's work split).
constexpr int64_t kQueryTileBwd = 64;

// How the backward splits the query tiles of a (batch row, key head): `splits` work items, of which
// all but the first accumulate dk/dv into fp32 partials of B x Hkv x Tk x D each, `scratch_bytes` in
// all. More splits keep more threads busy when B * Hkv is small; the partials stay within a byte
// budget that does not depend on the thread count: ANLLM_CPU_BWD_SCRATCH_MB (default 512) MiB.
struct CpuBackwardPlan {
  int64_t splits;
  int64_t scratch_bytes;
};
CpuBackwardPlan plan_cpu_backward(int64_t B, int64_t Hkv, int64_t Tq, int64_t Tk, int64_t D, int64_t threads);

}  // namespace anllm
