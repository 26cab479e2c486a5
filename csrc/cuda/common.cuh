// Shared pieces of the CUDA kernels: layout views, the per-row key/query index (built on device, no
// host sync), tile traits, block-wide scans and small numeric helpers.
//
// Tiling scheme of the CUDA-core attention kernels (fwd_kernel, dq_kernel, dkv_kernel): 128 threads as an
// 8 x 16 grid (ty, tx). A thread owns the rows ty, ty+8, ... of a tile and the columns tx, tx+16, ...
// (keys for score tiles, head-dim entries for output tiles). Their math is fp32; bf16/fp16 are converted
// on load. The tensor-core kernels (fwd_wmma.cuh, bwd_wmma.cuh: bf16/fp16, WMMA) use four warps on
// 16 x 16 fragments instead. The head dim is padded to DMAX in {64, 128, 256} with zeros, so any
// D <= 256 runs.
#pragma once

#include <ATen/ATen.h>

#ifdef ANLLM_CUDA_EMU
// Test-only build: the same sources as host C++ under the CUDA emulator (csrc/emu/cuda_emu.h, docs/gpu.md).
#include "../emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
// Portability macros: these expand to the plain CUDA forms here; the emulator defines its own.
#define ANLLM_SHARED(T, name, dims) __shared__ T name dims
#define ANLLM_SHARED_ALIGN(a, T, name, dims) __shared__ __align__(a) T name dims
#define ANLLM_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#define ANLLM_DYNAMIC_SHARED_ALIGN(a, T, name) extern __shared__ __align__(a) T name[]
#define ANLLM_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
// An instantiation of a template kernel, whose __launch_bounds__ argument is the constant
// <kernel>_launch_bound declared before it (the emulator checks launches against it, see cuda_emu.h;
// test_cuda_emu.py checks the declarations). Here the plain template-id.
#define ANLLM_KERNEL(name, ...) name<__VA_ARGS__>
#endif

#include <cstdint>
#include <limits>

#include "../checks.h"

namespace anllm {
namespace cuda {

constexpr int kThreads = 128;  // threads of every attention block
constexpr int kTY = 8;         // thread grid rows
constexpr int kTX = 16;        // thread grid columns
constexpr int kChunk = 64;     // keys / queries per summary chunk of the row index
constexpr int kIndexThreads = 1024;  // threads of the row-index kernel (32 full warps)
constexpr unsigned kFull = 0xffffffffu;

constexpr int32_t kI32Max = std::numeric_limits<int32_t>::max();
constexpr int32_t kI32Min = std::numeric_limits<int32_t>::min();
constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI64Min = std::numeric_limits<int64_t>::min();

// Chunk flags.
constexpr int kAnyValid = 1;      // the chunk holds a valid token
constexpr int kAnyNonAnchor = 2;  // the chunk holds a valid non-anchor token

// Raw pointers to one side's layout, all [B, T] contiguous.
struct LayoutView {
  const int64_t* pos;
  const int32_t* seg;
  const bool* is_anchor;
  const bool* valid;
  int64_t T;
};

// Per-row chunk summaries of one side ([B, nC] each) and monotone search arrays over them.
struct SideView {
  const int32_t* seg_min;     // over valid tokens (INT32_MAX if none)
  const int32_t* seg_max;     // over valid tokens (INT32_MIN if none)
  const int64_t* pos_min;     // over valid tokens (INT64_MAX if none)
  const int64_t* pos_max;     // over valid tokens (INT64_MIN if none)
  const int64_t* pos_max_na;  // over valid non-anchor tokens (INT64_MIN if none)
  const int32_t* flags;       // kAnyValid | kAnyNonAnchor
  const int32_t* pm_seg_max;  // prefix max of seg_max      (non-decreasing)
  const int32_t* sm_seg_min;  // suffix min of seg_min      (non-decreasing)
  const int64_t* pm_pos_max_na;  // prefix max of pos_max_na (non-decreasing)
  int64_t nC;
};

// Valid anchor keys of every row, in key order ([B, Tk] capacity, count[b] used).
struct AnchorView {
  const int32_t* idx;       // key index
  const int64_t* pos;
  const int32_t* seg;
  const int64_t* smin_pos;  // suffix min of pos over the list (non-decreasing)
  const int32_t* count;     // [B]
  int64_t cap;              // row stride (= Tk)
};

// Device tensors behind SideView / AnchorView (keep them alive while kernels use the views).
struct SideIndex {
  at::Tensor i32;  // [5, B, nC]: seg_min, seg_max, flags, pm_seg_max, sm_seg_min
  at::Tensor i64;  // [4, B, nC]: pos_min, pos_max, pos_max_na, pm_pos_max_na
  int64_t B = 0, nC = 0;
  SideView view() const;
};

struct AnchorIndex {
  at::Tensor i32;  // [2, B, Tk]: idx, seg ; plus count in cnt
  at::Tensor i64;  // [2, B, Tk]: pos, smin_pos
  at::Tensor cnt;  // int32 [B]
  int64_t B = 0, Tk = 0;
  AnchorView view() const;
};

LayoutView layout_view(const LayoutTensors& l);

// The device the kernels' tensors live on: CUDA (the CPU in the emulator build, whose "device memory" is
// host memory).
inline bool on_kernel_device(const at::Tensor& t) {
#ifdef ANLLM_CUDA_EMU
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// Host staging buffers for small tables copied to the device without a host sync: pinned memory (the
// emulator has no pinned allocator and no copy: its device memory is host memory).
inline at::TensorOptions host_staging_options() {
#ifdef ANLLM_CUDA_EMU
  return at::TensorOptions();
#else
  return at::TensorOptions().pinned_memory(true);
#endif
}

// The inputs of the CUDA attention ops (forward, backward) after validation: both layouts made contiguous
// and the problem's sizes. Host only; callers take their device guard after it, so mixed-device inputs
// get the clear error.
struct CudaAttentionInputs {
  LayoutTensors ql, kl;
  AttentionShape s;
};

inline CudaAttentionInputs check_cuda_attention_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos, const at::Tensor& q_seg,
    const at::Tensor& q_is_anchor, const at::Tensor& q_valid, const at::Tensor& k_pos, const at::Tensor& k_seg,
    const at::Tensor& k_is_anchor, const at::Tensor& k_valid) {
  CudaAttentionInputs in{
      LayoutTensors{q_pos.contiguous(), q_seg.contiguous(), q_is_anchor.contiguous(), q_valid.contiguous()},
      LayoutTensors{k_pos.contiguous(), k_seg.contiguous(), k_is_anchor.contiguous(), k_valid.contiguous()},
      AttentionShape{}};
  in.s = check_attention_inputs(q, k, v, in.ql, in.kl);
  ANLLM_CHECK(on_kernel_device(q), "q must be a CUDA tensor");
  return in;
}

// Builds the chunk summaries of one side (and the anchor list when `anchors` is non-null) on the
// current stream. Layout tensors must be contiguous CUDA tensors.
void build_side_index(const LayoutTensors& l, SideIndex& side, AnchorIndex* anchors);

// What the forward and the backward kernels share: the inputs, both layouts, the key side's index
// and the problem's sizes. FwdParams and BwdParams extend it; set_attention_params fills it for both
// launchers (one place, in the style of causal-conv1d's set_*_params).
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_sb, q_sh, q_st;  // strides of batch, head and token (the head dim is contiguous)
  int64_t k_sb, k_sh, k_st;
  int64_t v_sb, v_sh, v_st;
  LayoutView ql, kl;
  SideView ks;    // chunk summaries of the keys
  AnchorView ka;  // the valid anchor keys of every row
  int64_t B, Hq, Hkv, Tq, Tk;
  int D, group;  // head dim, query heads per key/value head
  float scale;
};

inline void set_attention_params(AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const LayoutTensors& ql, const LayoutTensors& kl, const AttentionShape& s,
                                 const SideIndex& kside, const AnchorIndex& anchors, double scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_st = q.stride(2);
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_st = k.stride(2);
  p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_st = v.stride(2);
  p.ql = layout_view(ql);
  p.kl = layout_view(kl);
  p.ks = kside.view();
  p.ka = anchors.view();
  p.B = s.B; p.Hq = s.Hq; p.Hkv = s.Hkv; p.Tq = s.Tq; p.Tk = s.Tk;
  p.D = static_cast<int>(s.D);
  p.group = static_cast<int>(s.Hq / s.Hkv);
  p.scale = static_cast<float>(scale);
}

// ---------------------------------------------------------------------------------------------
// Device helpers.

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  return static_cast<T>(x);
}

// First i in [0, n) with a[i] >= x (a non-decreasing); n if none.
template <typename T>
__device__ __forceinline__ int64_t lower_bound_dev(const T* a, int64_t n, T x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] < x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Number of i in [0, n) with a[i] <= x (a non-decreasing).
template <typename T>
__device__ __forceinline__ int64_t count_le_dev(const T* a, int64_t n, T x) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (a[mid] <= x) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// Warp all-reduce (butterfly: every lane gets op over the 32 lanes' x); all 32 lanes of the warp call it.
template <typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V x, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(kFull, x, o));
  return x;
}
struct MinOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return min(a, b); }
};
struct MaxOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return max(a, b); }
};
struct FmaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};

// The key tiles a tile of queries visits, decided once per tile from its rows' layout (shared
// memory, BQ <= 64 rows): own-segment chunks [c_lo, c_hi) of the key side's chunk summaries, as
// n_own = (c_hi - c_lo) * sub tiles, then n_anc tiles over the first n_av earlier anchors (those at or
// before the tile's last position; none when every row is an anchor). smin/smax/pmax summarise the rows.
struct QueryTilePlan {
  int64_t c_lo, n_own, n_anc, n_av, pmax;
  int32_t smin, smax;
};

// Called by all 32 lanes of one warp; lane 0 writes `plan` (callers __syncthreads() before reading it).
template <int BQ, int BK>
__device__ __forceinline__ void plan_query_tile(int lane, int64_t b, int sub, const bool* r_valid,
                                                const bool* r_is_anchor, const int32_t* r_seg,
                                                const int64_t* r_pos, const SideView& ks,
                                                const AnchorView& ka, QueryTilePlan& plan) {
  static_assert(BQ <= 64, "a warp plans at most 64 rows");
  // lane l summarises rows l and l + 32
  bool v = false, na = false;
  int32_t smin = kI32Max, smax = kI32Min;
  int64_t pmax = kI64Min;
#pragma unroll
  for (int r = lane; r < BQ; r += 32) {
    if (!r_valid[r]) continue;
    v = true;
    na = na || !r_is_anchor[r];
    smin = min(smin, r_seg[r]);
    smax = max(smax, r_seg[r]);
    pmax = max(pmax, r_pos[r]);
  }
  const unsigned any_valid = __ballot_sync(kFull, v);
  const unsigned any_na = __ballot_sync(kFull, na);
  smin = warp_allreduce(smin, MinOp());
  smax = warp_allreduce(smax, MaxOp());
  pmax = warp_allreduce(pmax, MaxOp());
  if (lane != 0) return;
  int64_t c_lo = 0, n_own = 0, n_anc = 0, n_av = 0;
  if (any_valid) {
    const int64_t nC = ks.nC;
    c_lo = lower_bound_dev(ks.pm_seg_max + b * nC, nC, smin);
    const int64_t c_hi = count_le_dev(ks.sm_seg_min + b * nC, nC, smax);
    n_own = c_hi > c_lo ? (c_hi - c_lo) * sub : 0;
    if (any_na) {
      n_av = count_le_dev(ka.smin_pos + b * ka.cap, static_cast<int64_t>(ka.count[b]), pmax);
      n_anc = (n_av + BK - 1) / BK;
    }
  }
  plan = QueryTilePlan{c_lo, n_own, n_anc, n_av, pmax, smin, smax};
}

// Key tile t of a query tile's plan: own-segment tiles (t < n_own) start at key `key0`, anchor tiles
// at entry `a0` of the row's anchor list. Returns false for an own-segment tile whose chunk summary
// shows no key the tile's rows can see (the same answer in every thread: skip the tile uniformly).
template <int BK>
__device__ __forceinline__ bool key_tile_start(const SideView& ks, int64_t b, const QueryTilePlan& plan,
                                               int sub, int64_t t, int64_t& key0, int64_t& a0) {
  key0 = a0 = 0;
  if (t >= plan.n_own) {
    a0 = (t - plan.n_own) * BK;
    return true;
  }
  const int64_t c = plan.c_lo + t / sub, cc = b * ks.nC + c;
  if (!(ks.flags[cc] & kAnyValid) || ks.seg_max[cc] < plan.smin || ks.seg_min[cc] > plan.smax ||
      ks.pos_min[cc] > plan.pmax)
    return false;
  key0 = c * kChunk + (t % sub) * BK;
  return true;
}

// Slot `slot` (< BK) of a key tile: its key index in the row (-1: no key, K/V read as zeros), position
// and segment, from the key layout (own-segment tile) or the row's anchor list (anchor tile).
__device__ __forceinline__ void load_key_slot(const LayoutView& kl, const AnchorView& ka, int64_t b,
                                              int64_t Tk, bool own, int64_t key0, int64_t a0,
                                              int64_t n_av, int slot, int64_t* k_row, int64_t* k_pos,
                                              int32_t* k_seg) {
  int64_t j = -1, kp = 0;
  int32_t ksg = 0;
  if (own) {
    const int64_t jj = key0 + slot;
    if (jj < Tk && kl.valid[b * Tk + jj]) {
      j = jj;
      kp = kl.pos[b * Tk + jj];
      ksg = kl.seg[b * Tk + jj];
    }
  } else {
    const int64_t a = a0 + slot;
    if (a < n_av) {
      j = ka.idx[b * ka.cap + a];
      kp = ka.pos[b * ka.cap + a];
      ksg = ka.seg[b * ka.cap + a];
    }
  }
  k_row[slot] = j;
  k_pos[slot] = kp;
  k_seg[slot] = ksg;
}

// Tile sizes per padded head dim. Shared memory stays under ~99 KB (sm86/sm89 opt-in limit).
template <int DMAX>
struct FwdTraits;
template <> struct FwdTraits<64> { static constexpr int BQ = 32, BK = 64; };
template <> struct FwdTraits<128> { static constexpr int BQ = 32, BK = 64; };
template <> struct FwdTraits<256> { static constexpr int BQ = 16, BK = 32; };

template <int DMAX>
struct DqTraits;
template <> struct DqTraits<64> { static constexpr int BQ = 32, BK = 64; };
template <> struct DqTraits<128> { static constexpr int BQ = 32, BK = 32; };
template <> struct DqTraits<256> { static constexpr int BQ = 16, BK = 16; };

template <int DMAX>
struct DkvTraits;
template <> struct DkvTraits<64> { static constexpr int BQ = 32, BK = 64; };
template <> struct DkvTraits<128> { static constexpr int BQ = 32, BK = 32; };
template <> struct DkvTraits<256> { static constexpr int BQ = 16, BK = 16; };

// The AnSAN rule restricted to one kind of key tile. Own-segment tiles take only pairs with equal
// segments, anchor tiles (gathered valid anchors) only pairs with different segments, so the two
// kinds together give exactly allowed(i, j) of the AnSAN mask rule (docs/method.md,
// section "The AnSAN mask rule") whatever the key order.
__device__ __forceinline__ bool pair_allowed(bool anchor_tile, bool q_valid, bool q_is_anchor, int64_t q_pos,
                                             int32_t q_seg, bool k_ok, int64_t k_pos, int32_t k_seg) {
  if (!q_valid || !k_ok || k_pos > q_pos) return false;
  return anchor_tile ? (!q_is_anchor && k_seg != q_seg) : (k_seg == q_seg);
}

inline int padded_head_dim(int64_t D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }

// Sets the dynamic shared memory limit of a kernel (needed when static + dynamic exceed 48 KB). The kernel's
// static shared memory counts against the same per-block limit as the dynamic bytes.
template <typename K>
inline void allow_smem(K kernel, size_t bytes) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t total = bytes + attr.sharedSizeBytes;
  ANLLM_CHECK(total <= prop->sharedMemPerBlockOptin, "kernel needs ", bytes, " bytes of dynamic and ",
              attr.sharedSizeBytes, " bytes of static shared memory per block, the device allows ",
              prop->sharedMemPerBlockOptin);
  if (total > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace anllm
