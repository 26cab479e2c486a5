// Shared pieces of the CUDA kernels: layout views, the per-row key/query index (built on device, no
// host sync), tile traits, block-wide scans and small numeric helpers.
//
// Tiling scheme (all attention kernels): 128 threads as an 8 x 16 grid (ty, tx). A thread owns the
// rows ty, ty+8, ... of a tile and the columns tx, tx+16, ... (keys for score tiles, head-dim
// entries for output tiles). All math is fp32 on CUDA cores; bf16/fp16 are converted on load. The
// head dim is padded to DMAX in {64, 128, 256} with zeros, so any D <= 256 runs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

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
  const bool* anchor;
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

// Builds the chunk summaries of one side (and the anchor list when `anchors` is non-null) on the
// current stream. Layout tensors must be contiguous CUDA tensors.
void build_side_index(const LayoutTensors& l, SideIndex& side, AnchorIndex* anchors);

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
// kinds together give exactly allowed(i, j) of SPEC section 3 whatever the key order.
__device__ __forceinline__ bool pair_allowed(bool anchor_tile, bool q_valid, bool q_anchor, int64_t q_pos,
                                             int32_t q_seg, bool k_ok, int64_t k_pos, int32_t k_seg) {
  if (!q_valid || !k_ok || k_pos > q_pos) return false;
  return anchor_tile ? (!q_anchor && k_seg != q_seg) : (k_seg == q_seg);
}

inline int padded_head_dim(int64_t D) { return D <= 64 ? 64 : (D <= 128 ? 128 : 256); }

// Sets the dynamic shared memory limit of a kernel (needed above 48 KB).
template <typename K>
inline void allow_smem(K kernel, size_t bytes) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  ANLLM_CHECK(bytes <= prop->sharedMemPerBlockOptin, "kernel needs ", bytes,
              " bytes of shared memory per block, the device allows ", prop->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace anllm
