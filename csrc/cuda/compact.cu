// In-place, order-preserving compaction of cache slots on CUDA, all tensors in one launch.
//
// 1. plan_kernel (one block per row): the list of kept slots among the first lengths[b] (block-wide
//    prefix sum), the new length, and the first slot that has to move (kept slots before the first
//    dropped one are already in place). Scratch: int32 [B, Cap] plus two int64 [B].
// 2. move_kernel (one block per (tensor, row, head) plane): walks the kept slots that move, in
//    increasing order, in chunks that fit a 16 KiB shared buffer: read the chunk's source slots,
//    barrier, write them to their destinations, barrier. A kept slot k goes from src[k] >= k to k, so
//    a chunk writes only slots < (its first destination + chunk size) <= the next chunk's first
//    source: writes never clobber a source not read yet, and reads of one chunk all precede its
//    writes. No scratch proportional to the cache data.
// Lengths outside [0, Cap] are clamped on the device (the CPU kernel raises instead; checking here
// would need a host sync).
#include <torch/library.h>

#include <vector>

#include "../compact_common.h"
#include "common.cuh"

namespace anllm {
namespace cuda {
namespace {

constexpr int kPlanThreads = 1024;
constexpr int kMoveThreads = 256;
constexpr int kMoveBytes = 16 * 1024;

// Per-tensor plane description (int64 fields, copied to the device as one table).
struct PlaneDesc {
  int64_t base;          // address of element [0, 0, 0, 0]
  int64_t heads;
  int64_t batch_stride;  // bytes
  int64_t head_stride;   // bytes
  int64_t slot_bytes;
  int64_t vec;           // 16, 8, 4 or 1: widest aligned access for this tensor
};
constexpr int kDescFields = 6;

__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(const bool* __restrict__ keep, const int64_t* __restrict__ lengths, int64_t cap,
                int32_t* __restrict__ src, int64_t* __restrict__ new_len, int64_t* __restrict__ first_move) {
  ANLLM_SHARED(int32_t, warp_tot, [32]);
  ANLLM_SHARED(int64_t, first_drop, );
  const int64_t b = blockIdx.x;
  int64_t len = lengths[b];
  len = len < 0 ? 0 : (len > cap ? cap : len);
  const bool* kb = keep + b * cap;
  int32_t* sb = src + b * cap;
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  if (threadIdx.x == 0) first_drop = len;
  __syncthreads();
  int64_t count = 0;
  for (int64_t base = 0; base < len; base += kPlanThreads) {
    const int64_t j = base + threadIdx.x;
    const bool in = j < len;
    const int32_t f = (in && kb[j]) ? 1 : 0;
    if (in && !f) atomicMin(reinterpret_cast<unsigned long long*>(&first_drop),
                            static_cast<unsigned long long>(j));
    // block-wide inclusive sum of f
    int32_t v = f;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int32_t n = __shfl_up_sync(kFull, v, o);
      if (lane >= o) v += n;
    }
    if (lane == 31) warp_tot[wid] = v;
    __syncthreads();
    if (wid == 0) {
      int32_t w = warp_tot[lane];
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int32_t n = __shfl_up_sync(kFull, w, o);
        if (lane >= o) w += n;
      }
      warp_tot[lane] = w;
    }
    __syncthreads();
    const int32_t incl = v + (wid > 0 ? warp_tot[wid - 1] : 0);
    const int32_t tot = warp_tot[31];
    if (f) sb[count + incl - 1] = static_cast<int32_t>(j);
    count += tot;
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    new_len[b] = count;
    first_move[b] = first_drop;  // kept slots before the first dropped one stay where they are
  }
}

template <typename V>
__device__ __forceinline__ void move_plane(char* base, int64_t slot_bytes, const int32_t* src,
                                           int64_t k_begin, int64_t k_end, char* buf) {
  const int64_t slot_v = slot_bytes / sizeof(V);
  const int64_t chunk = kMoveBytes / slot_bytes;  // slots per chunk, >= 1 (checked on the host)
  V* bufv = reinterpret_cast<V*>(buf);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += chunk) {
    const int64_t n = min(chunk, k_end - k0);
    const int64_t total = n * slot_v;
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
      const int64_t s = e / slot_v, w = e % slot_v;
      const V* from = reinterpret_cast<const V*>(base + static_cast<int64_t>(src[k0 + s]) * slot_bytes);
      bufv[e] = from[w];
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
      const int64_t s = e / slot_v, w = e % slot_v;
      V* to = reinterpret_cast<V*>(base + (k0 + s) * slot_bytes);
      to[w] = bufv[e];
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kMoveThreads)
    move_kernel(const int64_t* __restrict__ desc, int64_t B, int64_t heads_max, int64_t cap,
                const int32_t* __restrict__ src, const int64_t* __restrict__ new_len,
                const int64_t* __restrict__ first_move) {
  ANLLM_SHARED_ALIGN(16, char, buf, [kMoveBytes]);
  int64_t item = blockIdx.x;
  const int64_t h = item % heads_max;
  item /= heads_max;
  const int64_t b = item % B;
  const int64_t ti = item / B;
  const int64_t* d = desc + ti * kDescFields;
  const PlaneDesc pd{d[0], d[1], d[2], d[3], d[4], d[5]};
  if (h >= pd.heads) return;
  const int64_t k_begin = first_move[b], k_end = new_len[b];
  if (k_begin >= k_end) return;
  char* base = reinterpret_cast<char*>(pd.base) + b * pd.batch_stride + h * pd.head_stride;
  const int32_t* sb = src + b * cap;
  switch (pd.vec) {
    case 16: move_plane<uint4>(base, pd.slot_bytes, sb, k_begin, k_end, buf); break;
    case 8: move_plane<uint2>(base, pd.slot_bytes, sb, k_begin, k_end, buf); break;
    case 4: move_plane<uint32_t>(base, pd.slot_bytes, sb, k_begin, k_end, buf); break;
    default: move_plane<unsigned char>(base, pd.slot_bytes, sb, k_begin, k_end, buf); break;
  }
}

int64_t widest_access(const at::Tensor& t, const SlotView& sv) {
  const int64_t addr = reinterpret_cast<int64_t>(t.data_ptr());
  const int64_t slot_bytes = sv.slot_elems * sv.elem_size;
  for (int64_t w : {16, 8, 4}) {
    if (addr % w == 0 && slot_bytes % w == 0 && (sv.batch_stride * sv.elem_size) % w == 0 &&
        (sv.head_stride * sv.elem_size) % w == 0)
      return w;
  }
  return 1;
}

at::Tensor compact_cuda(at::TensorList tensors, const at::Tensor& keep_in, const at::Tensor& lengths_in) {
  const CompactProblem pr = check_compact_inputs(tensors, keep_in, lengths_in);
  ANLLM_CHECK(on_kernel_device(keep_in), "keep must be a CUDA tensor");
  // Validation first (host only), so mixed-device inputs get the clear error, then the guard.
  c10::cuda::OptionalCUDAGuard guard(keep_in.device());
  const at::Tensor keep = keep_in.contiguous();
  const at::Tensor lengths = lengths_in.contiguous();
  const int64_t B = pr.B, cap = pr.cap;
  ANLLM_CHECK(cap < std::numeric_limits<int32_t>::max(), "capacity ", cap, " is too large");
  auto new_len = at::empty({B}, lengths.options());
  if (B == 0) return new_len;
  auto first_move = at::empty({B}, lengths.options());
  auto src = at::empty({B, std::max<int64_t>(cap, 1)}, keep.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  ANLLM_LAUNCH(plan_kernel, static_cast<unsigned>(B), kPlanThreads, 0, stream)(
      keep.data_ptr<bool>(), lengths.data_ptr<int64_t>(), cap, src.data_ptr<int32_t>(),
      new_len.data_ptr<int64_t>(), first_move.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Descriptor table of the non-empty tensors, copied from pinned memory without a host sync.
  std::vector<int64_t> host;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const SlotView sv = slot_view(t);
    const int64_t slot_bytes = sv.slot_elems * sv.elem_size;
    ANLLM_CHECK(slot_bytes <= kMoveBytes, "tensors[", i, "] has ", slot_bytes,
                " bytes per slot; the CUDA compaction supports up to ", kMoveBytes);
    host.insert(host.end(), {reinterpret_cast<int64_t>(t.data_ptr()), sv.heads,
                             sv.batch_stride * sv.elem_size, sv.head_stride * sv.elem_size, slot_bytes,
                             widest_access(t, sv)});
  }
  const int64_t n_tensors = static_cast<int64_t>(host.size()) / kDescFields;
  if (n_tensors == 0 || cap == 0) return new_len;
  at::Tensor desc_cpu = at::empty({static_cast<int64_t>(host.size())},
                                  host_staging_options().dtype(at::kLong));
  std::copy(host.begin(), host.end(), desc_cpu.data_ptr<int64_t>());
  at::Tensor desc = desc_cpu.to(keep.device(), /*non_blocking=*/true);

  const int64_t planes = n_tensors * B * pr.heads_per_tensor_max;
  ANLLM_CHECK(planes < std::numeric_limits<int32_t>::max(), "too many planes for one launch");
  ANLLM_LAUNCH(move_kernel, static_cast<unsigned>(planes), kMoveThreads, 0, stream)(
      desc.data_ptr<int64_t>(), B, pr.heads_per_tensor_max, std::max<int64_t>(cap, 1),
      src.data_ptr<int32_t>(), new_len.data_ptr<int64_t>(), first_move.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return new_len;
}

}  // namespace

TORCH_LIBRARY_IMPL(anllm, CUDA, m) { m.impl("compact_", &compact_cuda); }

}  // namespace cuda
}  // namespace anllm
