// A CUDA-semantics emulator: the kernels of csrc/cuda/ compile as host C++ with this header (built with
// -DANLLM_CUDA_EMU, test-only, never part of the wheel) and run on the CPU under CUDA's execution model.
// See docs/gpu.md, section "The CUDA emulator".
//
// Execution model
//   - Blocks run one after another, in a seeded random order (CUDA guarantees no block order).
//   - The threads of a block run concurrently as fibers on one OS thread: every thread has its own
//     stack and runs until it blocks (at __syncthreads or a warp collective) or exits; the next thread
//     to run is drawn at random (seeded) from the runnable ones. So between two barriers the threads
//     of a block interleave in a random order that changes with the seed: a missing __syncthreads
//     shows as reads of another thread's not-yet-written (NaN-filled) shared memory.
//     Why fibers and not OS threads: a block of 1024 threads would need 1024 OS threads and every
//     barrier a round of futex wake-ups on a 2-core machine; fibers switch in ~20 ns and make the
//     interleaving a deterministic function of the seed, so a failure replays exactly.
//     Why a hand-written switch: swapcontext saves and restores the signal mask with a system call
//     per switch (~0.35 us); the kernels switch ~10^6 times per test call (every warp shuffle is a
//     rendezvous of 32 fibers). On x86-64 the switch saves only the callee-saved registers, MXCSR
//     and the x87 control word (anllm_emu_switch below), and a fiber starts by "returning" into a
//     trampoline prepared on its stack. Elsewhere, or with -DANLLM_EMU_UCONTEXT, fibers use
//     makecontext/swapcontext. Under AddressSanitizer every switch is announced to ASan with
//     __sanitizer_start_switch_fiber / __sanitizer_finish_switch_fiber (ASan's fiber API), so ASan
//     knows which stack runs (exceptions and stack checks on fiber stacks are exact). Plain swapcontext
//     under ASan is not enough: ASan warns that it "may produce false positives", and its interceptor
//     clears the shadow of the whole target stack at every switch (~100x slower).
//   - __syncthreads() is a block barrier that every thread must reach at the same call site; threads
//     waiting at different barriers, or at a barrier that an exited thread can no longer reach, are
//     reported as an error naming the kernel and both sites (CUDA: undefined behaviour, a hang or
//     silently wrong results).
//   - Warp primitives (__shfl_xor_sync, __shfl_up_sync, __shfl_down_sync, __shfl_sync, __ballot_sync,
//     __syncwarp) are rendezvous of the lanes named in the mask: the calling lane must be in the mask,
//     every lane of the mask must arrive at the same primitive with the same mask (else: error), and
//     a shuffle that reads a lane outside the mask is an error (CUDA: undefined value).
//   - Shared memory is per block: the dynamic part (ANLLM_DYNAMIC_SHARED) and every static variable
//     (ANLLM_SHARED) are separate exact-size allocations, filled with 0xFF bytes (a NaN for floats,
//     -1 for integers) at the start of every block, so a read of shared memory nobody wrote in this
//     block gives NaN / garbage instead of a stale or zero value, and an ASan build catches any access
//     outside a shared array.
//   - Launch limits of CUDA on the emulated device (an H200: sm_90, 132 SMs, 227 KiB opt-in shared
//     memory): grid x in [1, 2^31-1], y/z in [1, 65535]; threads per block in [1, 1024] and at most the
//     kernel's __launch_bounds__; static + dynamic shared memory <= 48 KiB unless the launcher raised
//     the kernel's limit with cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize), and
//     then dynamic <= that limit and static + dynamic <= 227 KiB.
//   - Atomics are std::atomic_ref operations; global memory is ordinary host memory (tensors on the CPU).
//   - __expf / __logf follow what --use_fast_math compiles them to (ex2.approx(x * log2 e),
//     lg2.approx(x) * ln 2): the rounding of the scaled argument, the dominant error, is modelled.
//
// What this does not model: timing, the real (weak) memory model (memory here is sequentially
// consistent), lockstep warp execution, FTZ of denormals, approximate division under fast math,
// hardware resource limits other than the ones above (registers per thread, occupancy).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#include <ucontext.h>
#include <xmmintrin.h>

#if !defined(__x86_64__) && !defined(ANLLM_EMU_UCONTEXT)
#define ANLLM_EMU_UCONTEXT 1
#endif
#ifdef __SANITIZE_ADDRESS__
#define ANLLM_EMU_ASAN 1
#endif

// ------------------------------------------------------------------------------------------------
// The registrations of the kernels' files go to the emulator's own operator namespace on the CPU key,
// so the emulated ops live next to the real extension's (torch.ops.anllm_cuda_emu.*).
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(anllm_cuda_emu, CPU, m, C10_UID)

// ------------------------------------------------------------------------------------------------
// CUDA language keywords.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __align__(n) alignas(n)
// A non-template kernel's launch bound goes into the name of the ELF section holding the kernel's code
// (anllm_emu_lb_<the macro argument>); the emulator looks the kernel's address up in the sections
// registered with ANLLM_EMU_LAUNCH_BOUNDS (see csrc/emu/emu_module.cpp) at every launch. GCC drops the
// section attribute of template instantiations, so a template kernel declares its bound as a constant
// `<kernel>_launch_bound` used by its attribute, and launchers take the instantiation with
// ANLLM_KERNEL(kernel, template arguments...), which here registers the instantiation's address with
// that constant (common.cuh; under nvcc it is the plain template-id).
#define __launch_bounds__(...) __attribute__((section("anllm_emu_lb_" #__VA_ARGS__), noinline))
#define ANLLM_KERNEL(name, ...) \
  ::anllm_emu::with_launch_bound(name<__VA_ARGS__>, name##_launch_bound, #name "_launch_bound")

// Shared memory declarations (the kernels use these macros; under nvcc they are the plain forms).
#define ANLLM_SHARED(T, name, dims)         \
  static char anllm_emu_slot_##name;        \
  T(&name) dims = ::anllm_emu::shared_var<T dims>(&anllm_emu_slot_##name, #name, 16)
#define ANLLM_SHARED_ALIGN(a, T, name, dims) \
  static char anllm_emu_slot_##name;         \
  T(&name) dims = ::anllm_emu::shared_var<T dims>(&anllm_emu_slot_##name, #name, a)
#define ANLLM_DYNAMIC_SHARED(T, name) T* name = ::anllm_emu::dynamic_shared<T>(16)
#define ANLLM_DYNAMIC_SHARED_ALIGN(a, T, name) T* name = ::anllm_emu::dynamic_shared<T>(a)
#define ANLLM_LAUNCH(kernel, grid, block, smem, stream) \
  ::anllm_emu::make_launch(kernel, #kernel, grid, block, smem, __PRETTY_FUNCTION__, __FILE__, __LINE__)

// ------------------------------------------------------------------------------------------------
// CUDA runtime types and the few runtime calls the launchers use.
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct anllm_emu_stream {};
typedef anllm_emu_stream* cudaStream_t;

struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int warpSize;
  size_t totalGlobalMem;
};

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
  int maxDynamicSharedSizeBytes;
};

namespace anllm_emu {

[[noreturn]] void fail(const std::string& msg);

// ---- emulated device ---------------------------------------------------------------------------
inline cudaDeviceProp& device_props() {
  static cudaDeviceProp p = [] {
    cudaDeviceProp d{};
    std::strncpy(d.name, "NVIDIA H200 (anllm CUDA emulator)", sizeof(d.name) - 1);
    d.major = 9;
    d.minor = 0;
    d.multiProcessorCount = 132;
    d.sharedMemPerBlock = 48 * 1024;
    d.sharedMemPerBlockOptin = 227 * 1024;
    d.sharedMemPerMultiprocessor = 228 * 1024;
    d.maxThreadsPerBlock = 1024;
    d.maxThreadsDim[0] = 1024; d.maxThreadsDim[1] = 1024; d.maxThreadsDim[2] = 64;
    d.maxGridSize[0] = 2147483647; d.maxGridSize[1] = 65535; d.maxGridSize[2] = 65535;
    d.warpSize = 32;
    d.totalGlobalMem = size_t(141) << 30;
    return d;
  }();
  return p;
}

// ---- per-kernel records ------------------------------------------------------------------------
struct KernelRecord {
  int max_dynamic_smem = -1;  // cudaFuncAttributeMaxDynamicSharedMemorySize, -1: not set
  long static_smem = -1;      // measured at the first block that ran, -1: unknown yet
  long launches = 0, blocks = 0;
  std::string name;
};

struct LaunchBoundSection {
  const char* start;
  const char* stop;
  int bound;
  const char* token;
};

struct Stats {
  long launches = 0, blocks = 0, switches = 0, barriers = 0, warp_collectives = 0;
  std::vector<std::string> log;  // "name grid block smem" of the recent launches
};

struct Fiber;
struct Block;

struct State {
  std::recursive_mutex mutex;  // one launch at a time (the emulated device is not reentrant)
  std::vector<std::pair<const void*, KernelRecord>> kernels;
  std::vector<LaunchBoundSection> bound_sections;
  std::vector<std::tuple<const void*, int, const char*>> template_bounds;  // ANLLM_KERNEL: address, bound, name
  std::mt19937_64 rng{0};
  uint64_t seed = 0;
  bool fast_math = true;
  Stats stats;
  std::vector<Fiber*> fibers;  // pool, grows to the largest block
  Block* block = nullptr;      // block being run
};

inline State& state() {
  static State s;
  return s;
}

inline KernelRecord& kernel_record(const void* key) {
  auto& ks = state().kernels;
  for (auto& e : ks)
    if (e.first == key) return e.second;
  ks.emplace_back(key, KernelRecord{});
  return ks.back().second;
}

inline void register_launch_bound(const char* start, const char* stop, int bound, const char* token) {
  if (start != nullptr && stop != nullptr && start < stop)
    state().bound_sections.push_back({start, stop, bound, token});
}

// A template kernel's instantiation taken with ANLLM_KERNEL: remembers its launch bound; returns it.
template <typename K>
inline K with_launch_bound(K kernel, int bound, const char* token) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  const void* key = reinterpret_cast<const void*>(kernel);
  auto& tb = state().template_bounds;
  if (std::none_of(tb.begin(), tb.end(), [&](const auto& e) { return std::get<0>(e) == key; }))
    tb.emplace_back(key, bound, token);
  return kernel;
}

// The kernel's __launch_bounds__ (0: none known).
inline int launch_bound_of(const void* fn, const char** token) {
  for (const auto& [key, bound, name] : state().template_bounds)
    if (key == fn) {
      *token = name;
      return bound;
    }
  const char* a = static_cast<const char*>(fn);
  for (const auto& s : state().bound_sections)
    if (a >= s.start && a < s.stop) {
      *token = s.token;
      return s.bound;
    }
  return 0;
}

// ---- fibers ------------------------------------------------------------------------------------
enum class Wait { Runnable, Barrier, Warp, Done };

struct Fiber {
  char* mem = nullptr;  // mapping: guard page + stack
  size_t size = 0;
  void* sp = nullptr;
  void* asan_fake_stack = nullptr;  // ASan's fiber API: this fiber's fake stack while it is switched out
#ifdef ANLLM_EMU_UCONTEXT
  ucontext_t uc;
#endif
  Wait wait = Wait::Runnable;
  uint64_t coll_result = 0;
};

struct WarpCollective {
  int kind = -1;
  unsigned mask = 0, arrived = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t val[32];
  int param[32];
  void* ptr[32];  // per-lane argument block of a WMMA operation
};

struct SharedSlot {
  const void* key;
  const char* name;
  char* mem;
  size_t bytes;
};

struct Block {
  std::string kernel;  // name for messages
  KernelRecord* rec;
  int nthreads;
  uint3 bidx;
  dim3 bdim, gdim;
  void (*entry)(void*);
  void* entry_ctx;
  int cur = -1;
  void* sched_sp = nullptr;
  void* sched_fake_stack = nullptr;                      // ASan: the scheduler's while a fiber runs
  const void* sched_stack_bottom = nullptr;              // ASan: the scheduler's stack, learnt at the
  size_t sched_stack_size = 0;                           // first switch into a fiber
#ifdef ANLLM_EMU_UCONTEXT
  ucontext_t sched_uc;
#endif
  std::vector<int> runnable;
  int ndone = 0;
  // barrier
  int at_barrier = 0;
  const char* bar_file = nullptr;
  int bar_line = 0;
  std::vector<WarpCollective> warps;
  // shared memory
  char* dyn = nullptr;  // 256-aligned; the dynamic shared memory starts at dyn + (declared alignment % 256)
  size_t dyn_bytes = 0;
  size_t dyn_align = 0;
  std::vector<SharedSlot>* slots = nullptr;  // the launch's static shared variables
  size_t static_bytes = 0;
  size_t smem_limit = 0;  // static + dynamic allowed
  std::exception_ptr error;
};

inline uint3 g_threadIdx{0, 0, 0};
inline uint3 g_blockIdx{0, 0, 0};
inline dim3 g_blockDim{1, 1, 1};
inline dim3 g_gridDim{1, 1, 1};

inline Block& cur_block() {
  Block* b = state().block;
  if (b == nullptr) fail("a device function ran outside a kernel launch");
  return *b;
}

}  // namespace anllm_emu

#define threadIdx (::anllm_emu::g_threadIdx)
#define blockIdx (::anllm_emu::g_blockIdx)
#define blockDim (::anllm_emu::g_blockDim)
#define gridDim (::anllm_emu::g_gridDim)

// ---- the context switch --------------------------------------------------------------------------
#ifndef ANLLM_EMU_UCONTEXT
extern "C" void anllm_emu_switch(void** save_sp, void* load_sp);
extern "C" void anllm_emu_trampoline();
// anllm_emu_switch: push the callee-saved registers, MXCSR and the x87 control word on the current
// stack, store the stack pointer in *save_sp, load load_sp and pop the same from there.
asm(R"(
  .pushsection .text
  .p2align 4
  .type anllm_emu_switch,@function
anllm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size anllm_emu_switch, .-anllm_emu_switch
  .p2align 4
  .type anllm_emu_trampoline,@function
anllm_emu_trampoline:
  call anllm_emu_fiber_main
  ud2
  .size anllm_emu_trampoline, .-anllm_emu_trampoline
  .popsection
)");
#endif

extern "C" __attribute__((visibility("hidden"), used, noinline)) void anllm_emu_fiber_main();

namespace anllm_emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 4096;

inline Fiber* get_fiber(int i) {
  auto& pool = state().fibers;
  while (static_cast<int>(pool.size()) <= i) {
    auto* f = new Fiber();
    f->size = kStackBytes + kGuardBytes;
    void* m = mmap(nullptr, f->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(m, kGuardBytes, PROT_NONE);  // stack overflow -> SIGSEGV, not silent corruption
    f->mem = static_cast<char*>(m);
    pool.push_back(f);
  }
  return pool[i];
}

// Prepares fiber f to start at anllm_emu_fiber_main on its next resume.
inline void fiber_prepare(Fiber* f) {
#ifdef ANLLM_EMU_UCONTEXT
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->mem + kGuardBytes;
  f->uc.uc_stack.ss_size = kStackBytes;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, &anllm_emu_fiber_main, 0);
#else
  uintptr_t top = reinterpret_cast<uintptr_t>(f->mem + f->size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 64);
  uint32_t csr = _mm_getcsr();
  uint16_t fcw;
  asm volatile("fnstcw %0" : "=m"(fcw));
  std::memset(sp, 0, 64);
  std::memcpy(reinterpret_cast<char*>(sp), &csr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fcw, 2);
  sp[7] = reinterpret_cast<uint64_t>(&anllm_emu_trampoline);
  f->sp = sp;
#endif
  f->wait = Wait::Runnable;
}

// Scheduler -> fiber i of the current block.
inline void fiber_resume(Block& b, int i) {
  Fiber* f = state().fibers[i];
#ifdef ANLLM_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.sched_fake_stack, f->mem + kGuardBytes, kStackBytes);
#endif
#ifdef ANLLM_EMU_UCONTEXT
  swapcontext(&b.sched_uc, &f->uc);
#else
  anllm_emu_switch(&b.sched_sp, f->sp);
#endif
#ifdef ANLLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.sched_fake_stack, nullptr, nullptr);
#endif
}

// Fiber -> scheduler.
// finished: the fiber's last switch (ASan may drop its fake stack).
inline void fiber_yield(Block& b, bool finished = false) {
  Fiber* f = state().fibers[b.cur];
  ++state().stats.switches;
#ifdef ANLLM_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f->asan_fake_stack, b.sched_stack_bottom, b.sched_stack_size);
#else
  (void)finished;
#endif
#ifdef ANLLM_EMU_UCONTEXT
  swapcontext(&f->uc, &b.sched_uc);
#else
  anllm_emu_switch(&f->sp, b.sched_sp);
#endif
#ifdef ANLLM_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, nullptr, nullptr);
#endif
}

inline std::string site(const char* file, int line) {
  std::string f = file ? file : "?";
  const auto slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

inline std::string where(const Block& b) {
  return "kernel " + b.kernel + ", block " + std::to_string(b.bidx.x) + ", thread " + std::to_string(b.cur);
}

// ---- barrier -------------------------------------------------------------------------------------
inline void barrier_exited_check(Block& b) {
  if (b.at_barrier > 0 && b.ndone > 0)
    fail("__syncthreads() in divergent code: " + std::to_string(b.at_barrier) + " thread(s) of " +
         std::to_string(b.nthreads) + " wait at " + site(b.bar_file, b.bar_line) + " but " +
         std::to_string(b.ndone) + " thread(s) of the block have exited (" + where(b) + ")");
}

inline void syncthreads(const char* file, int line) {
  Block& b = cur_block();
  if (b.at_barrier == 0) {
    b.bar_file = file;
    b.bar_line = line;
  } else if (b.bar_line != line || std::strcmp(b.bar_file, file) != 0) {
    fail("__syncthreads() in divergent code: thread " + std::to_string(b.cur) + " waits at " + site(file, line) +
         " while " + std::to_string(b.at_barrier) + " thread(s) wait at " + site(b.bar_file, b.bar_line) +
         " (kernel " + b.kernel + ", block " + std::to_string(b.bidx.x) + ")");
  }
  ++b.at_barrier;
  barrier_exited_check(b);
  state().fibers[b.cur]->wait = Wait::Barrier;
  if (b.at_barrier == b.nthreads) {  // everyone is here: release all, in random order (we yield too)
    ++state().stats.barriers;
    b.at_barrier = 0;
    for (int i = 0; i < b.nthreads; ++i) {
      state().fibers[i]->wait = Wait::Runnable;
      if (i != b.cur) b.runnable.push_back(i);
    }
    b.runnable.push_back(b.cur);
  }
  fiber_yield(b);
}

// ---- warp collectives ---------------------------------------------------------------------------
enum CollKind { kShflXor = 0, kShflUp, kShflDown, kShflIdx, kBallot, kSyncWarp, kWmmaLoad, kWmmaStore, kWmmaMma };
inline const char* coll_name(int k) {
  static const char* n[] = {"__shfl_xor_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_sync", "__ballot_sync",
                            "__syncwarp", "wmma::load_matrix_sync", "wmma::store_matrix_sync", "wmma::mma_sync"};
  return k >= 0 && k < 9 ? n[k] : "?";
}

inline std::string hex(unsigned m) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", m);
  return buf;
}

// on_all: run by the last lane to arrive, with every lane's val/param/ptr, before any lane continues (the
// WMMA operations: one matrix operation of the whole warp).
inline uint64_t warp_collective(int kind, unsigned mask, uint64_t val, int param, int width, const char* file,
                                int line, void* lane_ptr = nullptr, void (*on_all)(WarpCollective&) = nullptr) {
  Block& b = cur_block();
  const int tid = b.cur, lane = tid & 31, w = tid >> 5;
  const std::string what = std::string(coll_name(kind)) + "(" + hex(mask) + ") at " + site(file, line);
  if (width != 32) fail(what + ": only width 32 is emulated (" + where(b) + ")");
  if (!((mask >> lane) & 1u))
    fail(what + ": the calling lane " + std::to_string(lane) + " is not in the mask (" + where(b) + ")");
  const int lanes_in_warp = std::min(32, b.nthreads - w * 32);
  const unsigned exist = lanes_in_warp == 32 ? 0xffffffffu : ((1u << lanes_in_warp) - 1u);
  if (mask & ~exist)
    fail(what + ": the mask names lanes that do not exist in warp " + std::to_string(w) + " (" + where(b) + ")");
  WarpCollective& c = b.warps[w];
  if (c.arrived == 0) {
    c.kind = kind;
    c.mask = mask;
    c.file = file;
    c.line = line;
  } else if (c.kind != kind || c.mask != mask ||
             // WMMA operations: the whole warp at one call site (one matrix operation)
             (kind >= kWmmaLoad && (c.line != line || std::strcmp(c.file, file) != 0))) {
    fail(what + " in lane " + std::to_string(lane) + " while lanes " + hex(c.arrived) + " of warp " + std::to_string(w) +
         " wait in " + coll_name(c.kind) + "(" + hex(c.mask) + ") at " + site(c.file, c.line) + " (" + where(b) + ")");
  }
  c.arrived |= 1u << lane;
  c.val[lane] = val;
  c.param[lane] = param;
  c.ptr[lane] = lane_ptr;
  ++state().stats.warp_collectives;
  Fiber* me = state().fibers[tid];
  if (c.arrived != mask) {
    me->wait = Wait::Warp;
    fiber_yield(b);
    return me->coll_result;
  }
  // Last lane: every lane of the mask is here. Compute all results, wake the others.
  if (on_all != nullptr) {
    try {
      on_all(c);
    } catch (...) {
      c.arrived = 0;
      c.kind = -1;
      throw;
    }
  }
  unsigned ballot = 0;
  if (kind == kBallot)
    for (int l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && c.val[l] != 0) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    uint64_t r = c.val[l];
    int src = -1;
    switch (kind) {
      case kShflXor: src = l ^ c.param[l]; break;
      case kShflUp: src = l - c.param[l] >= 0 ? l - c.param[l] : -1; break;
      case kShflDown: src = l + c.param[l] < 32 ? l + c.param[l] : -1; break;
      case kShflIdx: src = c.param[l] & 31; break;
      case kBallot: r = ballot; break;
      default: break;
    }
    if (src >= 0) {
      if (src >= 32 || !((mask >> src) & 1u))
        fail(what + ": lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
             ", which is not in the mask (undefined value on a GPU; " + where(b) + ")");
      r = c.val[src];
    }
    Fiber* f = state().fibers[w * 32 + l];
    f->coll_result = r;
    if (w * 32 + l != tid) {
      f->wait = Wait::Runnable;
      b.runnable.push_back(w * 32 + l);
    }
  }
  c.arrived = 0;
  c.kind = -1;
  return me->coll_result;
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// ---- shared memory -------------------------------------------------------------------------------
inline void check_smem(Block& b) {
  if (b.static_bytes + b.dyn_bytes > b.smem_limit)
    fail("kernel " + b.kernel + " uses " + std::to_string(b.static_bytes) + " bytes of static and " +
         std::to_string(b.dyn_bytes) + " bytes of dynamic shared memory per block; the launch allows " +
         std::to_string(b.smem_limit) + " in total (48 KiB without cudaFuncSetAttribute, " +
         std::to_string(device_props().sharedMemPerBlockOptin) + " with it)");
}

template <typename U>
inline U& shared_var(const void* key, const char* name, size_t align) {
  Block& b = cur_block();
  auto& slots = *b.slots;
  for (auto& s : slots)
    if (s.key == key) return *reinterpret_cast<U*>(s.mem);
  // First use in this launch: allocate, fill, account.
  const size_t a = std::max<size_t>({align, alignof(U), 16});
  char* mem = static_cast<char*>(std::aligned_alloc(a, (sizeof(U) + a - 1) / a * a));
  std::memset(mem, 0xFF, sizeof(U));
  slots.push_back({key, name, mem, sizeof(U)});
  b.static_bytes = (b.static_bytes + a - 1) / a * a + sizeof(U);
  check_smem(b);
  return *reinterpret_cast<U*>(mem);
}

// The dynamic shared memory, aligned to `align` bytes (what the kernel declares; at least 16, CUDA's
// guarantee) and deliberately to no more than that (when align < 256): code that assumes more alignment
// than it declared (e.g. 32-byte WMMA pointers) fails here.
template <typename T>
inline T* dynamic_shared(size_t align) {
  Block& b = cur_block();
  align = std::max<size_t>(align, 16);
  if (align > 256 || (align & (align - 1)) != 0) fail("dynamic shared memory alignment must be a power of 2 <= 256");
  if (b.dyn_bytes == 0) return nullptr;
  if (b.dyn_align == 0) {
    b.dyn_align = align;
#ifdef __SANITIZE_ADDRESS__
    // the slack before and after the kernel's bytes: an access there is an overrun (ASan reports it)
    ASAN_POISON_MEMORY_REGION(b.dyn, align % 256);
    ASAN_POISON_MEMORY_REGION(b.dyn + align % 256 + b.dyn_bytes, 256 - align % 256);
#endif
  } else if (b.dyn_align != align) {
    fail("kernel " + b.kernel + " declares its dynamic shared memory with two alignments");
  }
  return reinterpret_cast<T*>(b.dyn + (align % 256));
}

// ---- launch --------------------------------------------------------------------------------------
void run_launch(const void* key, const char* kname, const char* func, const char* file, int line, dim3 grid,
                dim3 block, size_t smem, void (*entry)(void*), void* ctx);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* kname;
  dim3 grid, block;
  size_t smem;
  const char* func;
  const char* file;
  int line;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel argument count");
    struct Ctx {
      void (*k)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    run_launch(reinterpret_cast<const void*>(kernel), kname, func, file, line, grid, block, smem,
               [](void* c) {
                 auto* x = static_cast<Ctx*>(c);
                 auto args_copy = x->args;  // each thread gets its own copy of the parameters
                 std::apply(x->k, args_copy);
               },
               &ctx);
  }
};

template <typename... P, typename G, typename B>
inline Launch<P...> make_launch(void (*kernel)(P...), const char* kname, G grid, B block, size_t smem,
                                const char* func, const char* file, int line) {
  return Launch<P...>{kernel, kname, dim3(grid), dim3(block), smem, func, file, line};
}

}  // namespace anllm_emu

// ---- device functions ----------------------------------------------------------------------------
#define __syncthreads() ::anllm_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::anllm_emu::syncwarp_impl(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) ::anllm_emu::shfl(::anllm_emu::kShflXor, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ::anllm_emu::shfl(::anllm_emu::kShflUp, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) ::anllm_emu::shfl(::anllm_emu::kShflDown, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_sync(mask, v, ...) ::anllm_emu::shfl(::anllm_emu::kShflIdx, mask, v, __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::anllm_emu::ballot(mask, pred, __FILE__, __LINE__)

namespace anllm_emu {
inline void syncwarp_impl(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_collective(kSyncWarp, mask, 0, 0, 32, file, line);
}
template <typename T>
inline T shfl(int kind, unsigned mask, T v, const char* file, int line, int param, int width = 32) {
  return from_bits<T>(warp_collective(kind, mask, to_bits(v), param, width, file, line));
}
inline unsigned ballot(unsigned mask, int pred, const char* file, int line) {
  return static_cast<unsigned>(warp_collective(kBallot, mask, pred != 0, 0, 32, file, line));
}
}  // namespace anllm_emu

inline float atomicAdd(float* address, float val) { return std::atomic_ref<float>(*address).fetch_add(val); }
inline int atomicAdd(int* address, int val) { return std::atomic_ref<int>(*address).fetch_add(val); }
inline unsigned long long atomicMin(unsigned long long* address, unsigned long long val) {
  std::atomic_ref<unsigned long long> r(*address);
  unsigned long long old = r.load();
  while (old > val && !r.compare_exchange_weak(old, val)) {
  }
  return old;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __expf(float x) {
  if (!::anllm_emu::state().fast_math) return std::exp(x);
  return std::exp2(x * 1.44269504088896341f);  // ex2.approx(x * log2(e)), the argument rounded to fp32
}
inline float __logf(float x) {
  if (!::anllm_emu::state().fast_math) return std::log(x);
  return std::log2(x) * 0.693147180559945309f;  // lg2.approx(x) * ln(2)
}
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}


// ---- WMMA: nvcuda::wmma on the emulated device ------------------------------------------------------
// The warp-level matrix API (CUDA C++ Programming Guide, "Warp Matrix Functions"), m16n16k16 with
// __half or __nv_bfloat16 inputs and float accumulators. A fragment is a warp-collective object: each
// lane holds num_elements of the 256 entries, in an order CUDA leaves unspecified; here entry (i, j)
// lives in lane p / 8, slot p % 8 with p = (16 i + j) * 37 mod 256, deliberately unlike any natural
// order, so code that assumes a register layout gets wrong results. load_matrix_sync, store_matrix_sync
// and mma_sync are rendezvous of the warp's 32 lanes (all must call, at one call site, with the same
// pointer, leading dimension and layout; else an error), and check CUDA's requirements: the pointer
// 256-bit (32-byte) aligned, the leading dimension a multiple of 16 bytes. mma_sync computes
// D = A B + C in fp32 (products of half/bf16 inputs are exact in fp32), k in order; fill_fragment is
// per lane. Element-wise use of frag.x[] is fine when it treats every entry alike (scaling).
typedef at::Half __half;
typedef at::BFloat16 __nv_bfloat16;

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the CUDA emulator implements WMMA m16n16k16 only");
  static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float> && std::is_same_v<Layout, void>
                                                 : (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>) &&
                                                       (std::is_same_v<Layout, row_major> ||
                                                        std::is_same_v<Layout, col_major>),
                "emulated WMMA fragments: matrix_a/matrix_b of __half or __nv_bfloat16 with row_major or col_major, "
                "float accumulators");
  static constexpr int num_elements = 8;
  using element_type = T;
  T x[num_elements];
};

template <typename Use, typename T, typename L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, const T& v) {
  for (int i = 0; i < 8; ++i) f.x[i] = v;
}
}  // namespace wmma
}  // namespace nvcuda

namespace anllm_emu {
namespace wmma_impl {
// entry (i, j) of a 16 x 16 fragment -> lane * 8 + slot
inline int owner(int i, int j) { return ((16 * i + j) * 37) & 255; }

struct Args {
  void* frag;       // this lane's fragment (load, store) or D (mma)
  const void* a;    // mma: A, B, C of this lane
  const void* b;
  const void* c;
  const void* mem;  // load/store: the matrix in memory (same in every lane)
  unsigned ldm;
  bool col;         // memory layout: column-major
};

template <typename T>
inline void check_mem(const char* what, const void* mem, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(mem) % 32 != 0)
    fail(std::string(what) + ": the matrix pointer must be 256-bit (32-byte) aligned (" + where(cur_block()) + ")");
  if ((ldm * sizeof(T)) % 16 != 0 || ldm < 16)
    fail(std::string(what) + ": the leading dimension (" + std::to_string(ldm) + " elements) must be >= 16 and a "
         "multiple of 16 bytes (" + where(cur_block()) + ")");
}

inline void check_same(WarpCollective& c) {
  const Args* a0 = static_cast<const Args*>(c.ptr[0]);
  for (int l = 1; l < 32; ++l) {
    const Args* a = static_cast<const Args*>(c.ptr[l]);
    if (a->mem != a0->mem || a->ldm != a0->ldm || a->col != a0->col)
      fail(std::string(coll_name(c.kind)) + " at " + site(c.file, c.line) + ": lane " + std::to_string(l) +
           " passes another pointer, leading dimension or layout than lane 0 (all lanes must pass the same; " +
           where(cur_block()) + ")");
  }
}

template <typename Frag, typename T>
void load_all(WarpCollective& c) {
  check_same(c);
  const Args* a0 = static_cast<const Args*>(c.ptr[0]);
  check_mem<T>((std::string(coll_name(c.kind)) + " at " + site(c.file, c.line)).c_str(), a0->mem, a0->ldm);
  const T* m = static_cast<const T*>(a0->mem);
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      const int o = owner(i, j);
      static_cast<Frag*>(static_cast<const Args*>(c.ptr[o >> 3])->frag)->x[o & 7] =
          a0->col ? m[size_t(j) * a0->ldm + i] : m[size_t(i) * a0->ldm + j];
    }
}

template <typename Frag>
void store_all(WarpCollective& c) {
  check_same(c);
  const Args* a0 = static_cast<const Args*>(c.ptr[0]);
  check_mem<float>((std::string(coll_name(c.kind)) + " at " + site(c.file, c.line)).c_str(), a0->mem, a0->ldm);
  float* m = static_cast<float*>(const_cast<void*>(a0->mem));
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      const int o = owner(i, j);
      const float v = static_cast<const Frag*>(static_cast<const Args*>(c.ptr[o >> 3])->frag)->x[o & 7];
      (a0->col ? m[size_t(j) * a0->ldm + i] : m[size_t(i) * a0->ldm + j]) = v;
    }
}

template <typename FA, typename FB, typename FC>
void mma_all(WarpCollective& c) {
  float A[16][16], B[16][16], C[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      const int o = owner(i, j);
      const Args* a = static_cast<const Args*>(c.ptr[o >> 3]);
      A[i][j] = static_cast<float>(static_cast<const FA*>(a->a)->x[o & 7]);
      B[i][j] = static_cast<float>(static_cast<const FB*>(a->b)->x[o & 7]);
      C[i][j] = static_cast<const FC*>(a->c)->x[o & 7];
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < 16; ++k) acc = std::fma(A[i][k], B[k][j], acc);
      const int o = owner(i, j);
      static_cast<FC*>(static_cast<const Args*>(c.ptr[o >> 3])->frag)->x[o & 7] = acc;
    }
}
}  // namespace wmma_impl
}  // namespace anllm_emu

namespace nvcuda {
namespace wmma {
template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load needs a layout_t");
  ::anllm_emu::wmma_impl::Args a{&f, nullptr, nullptr, nullptr, p, ldm, std::is_same_v<L, col_major>};
  ::anllm_emu::warp_collective(::anllm_emu::kWmmaLoad, 0xffffffffu, 0, 0, 32, file, line, &a,
                               &::anllm_emu::wmma_impl::load_all<fragment<Use, 16, 16, 16, T, L>, T>);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::anllm_emu::wmma_impl::Args a{&f, nullptr, nullptr, nullptr, p, ldm, l == mem_col_major};
  ::anllm_emu::warp_collective(::anllm_emu::kWmmaLoad, 0xffffffffu, 0, 0, 32, file, line, &a,
                               &::anllm_emu::wmma_impl::load_all<fragment<accumulator, 16, 16, 16, float>, float>);
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::anllm_emu::wmma_impl::Args a{const_cast<fragment<accumulator, 16, 16, 16, float>*>(&f), nullptr, nullptr, nullptr,
                                 p, ldm, l == mem_col_major};
  ::anllm_emu::warp_collective(::anllm_emu::kWmmaStore, 0xffffffffu, 0, 0, 32, file, line, &a,
                               &::anllm_emu::wmma_impl::store_all<fragment<accumulator, 16, 16, 16, float>>);
}
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::anllm_emu::wmma_impl::Args args{&d, &a, &b, &c, nullptr, 0, false};
  ::anllm_emu::warp_collective(
      ::anllm_emu::kWmmaMma, 0xffffffffu, 0, 0, 32, file, line, &args,
      &::anllm_emu::wmma_impl::mma_all<fragment<matrix_a, 16, 16, 16, T, LA>, fragment<matrix_b, 16, 16, 16, T, LB>,
                                       fragment<accumulator, 16, 16, 16, float>>);
}
}  // namespace wmma
}  // namespace nvcuda

// ---- ATen / c10 CUDA pieces the launchers use ---------------------------------------------------------
namespace at {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream() { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return &::anllm_emu::device_props(); }
}  // namespace cuda
}  // namespace at
namespace c10 {
namespace cuda {
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    const cudaError_t anllm_emu_err = (expr);                                                 \
    TORCH_CHECK(anllm_emu_err == cudaSuccess, "CUDA emulator: ", #expr, " failed with error ", \
                anllm_emu_err);                                                               \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

template <typename K>
inline cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  std::lock_guard<std::recursive_mutex> lock(::anllm_emu::state().mutex);
  auto& rec = ::anllm_emu::kernel_record(reinterpret_cast<const void*>(kernel));
  const long optin = static_cast<long>(::anllm_emu::device_props().sharedMemPerBlockOptin);
  // CUDA: the dynamic limit plus the kernel's static shared memory must fit the opt-in limit.
  if (value < 0 || value + std::max(0L, rec.static_smem) > optin) return cudaErrorInvalidValue;
  rec.max_dynamic_smem = value;
  return cudaSuccess;
}

template <typename K>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, K kernel) {
  std::lock_guard<std::recursive_mutex> lock(::anllm_emu::state().mutex);
  const auto& rec = ::anllm_emu::kernel_record(reinterpret_cast<const void*>(kernel));
  const void* key = reinterpret_cast<const void*>(kernel);
  const char* token = nullptr;
  const int bound = ::anllm_emu::launch_bound_of(key, &token);
  // The emulator learns a kernel's static shared memory at its first block (CUDA knows it at link
  // time): before that this reports 0, and the first launch checks the limit itself.
  attr->sharedSizeBytes = static_cast<size_t>(std::max(0L, rec.static_smem));
  attr->maxThreadsPerBlock = bound > 0 ? bound : 1024;
  const long optin = static_cast<long>(::anllm_emu::device_props().sharedMemPerBlockOptin);
  attr->maxDynamicSharedSizeBytes = rec.max_dynamic_smem >= 0
                                        ? rec.max_dynamic_smem
                                        : static_cast<int>(std::min(optin, 48L * 1024) - std::max(0L, rec.static_smem));
  return cudaSuccess;
}

// ---- runtime (one translation unit: csrc/emu/emu_module.cpp) -------------------------------------------
#ifdef ANLLM_EMU_RUNTIME
namespace anllm_emu {

[[noreturn]] void fail(const std::string& msg) { TORCH_CHECK(false, "CUDA emulator: ", msg); }

void run_block(Block& b) {
  State& st = state();
  b.runnable.clear();
  for (int i = 0; i < b.nthreads; ++i) {
    fiber_prepare(get_fiber(i));
    b.runnable.push_back(i);
  }
  b.ndone = 0;
  b.at_barrier = 0;
  for (auto& w : b.warps) w = WarpCollective{};
  // shared memory of a fresh block: all 0xFF
  if (b.dyn_bytes) {
    if (b.dyn_align) std::memset(b.dyn + b.dyn_align % 256, 0xFF, b.dyn_bytes);
    else std::memset(b.dyn, 0xFF, b.dyn_bytes + 256);
  }
  for (auto& s : *b.slots) std::memset(s.mem, 0xFF, s.bytes);
  st.block = &b;
  g_blockIdx = b.bidx;
  g_blockDim = b.bdim;
  g_gridDim = b.gdim;
  while (!b.runnable.empty()) {
    const size_t pick = st.rng() % b.runnable.size();
    const int t = b.runnable[pick];
    b.runnable[pick] = b.runnable.back();
    b.runnable.pop_back();
    b.cur = t;
    g_threadIdx = uint3{static_cast<unsigned>(t % b.bdim.x), static_cast<unsigned>((t / b.bdim.x) % b.bdim.y),
                        static_cast<unsigned>(t / (b.bdim.x * b.bdim.y))};
    fiber_resume(b, t);
    if (b.error) {
      st.block = nullptr;
      std::rethrow_exception(b.error);
    }
  }
  st.block = nullptr;
  if (b.ndone != b.nthreads) {
    // Deadlock: describe who waits where.
    std::string msg = "deadlock in kernel " + b.kernel + ", block " + std::to_string(b.bidx.x) + ": " +
                      std::to_string(b.ndone) + " of " + std::to_string(b.nthreads) + " threads exited";
    if (b.at_barrier) msg += ", " + std::to_string(b.at_barrier) + " wait at __syncthreads() at " + site(b.bar_file, b.bar_line);
    for (size_t w = 0; w < b.warps.size(); ++w) {
      const auto& c = b.warps[w];
      if (c.arrived)
        msg += "; warp " + std::to_string(w) + ": lanes " + hex(c.arrived) + " wait in " + coll_name(c.kind) + "(" +
               hex(c.mask) + ") at " + site(c.file, c.line) + " for lanes " + hex(c.mask & ~c.arrived) +
               " named in the mask that never arrive";
    }
    fail(msg);
  }
}

void run_launch(const void* key, const char* kname, const char* func, const char* file, int line, dim3 grid,
                dim3 block, size_t smem, void (*entry)(void*), void* ctx) {
  State& st = state();
  std::lock_guard<std::recursive_mutex> lock(st.mutex);
  if (st.block != nullptr) fail("a kernel launched another kernel (dynamic parallelism is not emulated)");
  KernelRecord& rec = kernel_record(key);
  std::string name = std::string(kname) + " (launched at " + site(file, line) + " in " + func + ")";
  rec.name = name;
  const cudaDeviceProp& dp = device_props();
  const auto cfg = [&](const std::string& why) {
    fail("invalid launch configuration of " + name + ": " + why + " (grid " + std::to_string(grid.x) + "x" +
         std::to_string(grid.y) + "x" + std::to_string(grid.z) + ", block " + std::to_string(block.x) + "x" +
         std::to_string(block.y) + "x" + std::to_string(block.z) + ", " + std::to_string(smem) +
         " bytes of dynamic shared memory)");
  };
  if (grid.x < 1 || grid.y < 1 || grid.z < 1) cfg("empty grid");
  if (grid.x > static_cast<unsigned>(dp.maxGridSize[0]) || grid.y > 65535u || grid.z > 65535u) cfg("grid too large");
  const long nthreads = long(block.x) * block.y * block.z;
  if (nthreads < 1 || nthreads > dp.maxThreadsPerBlock || block.x > 1024u || block.y > 1024u || block.z > 64u)
    cfg("threads per block outside [1, 1024]");
  const char* token = nullptr;
  const int bound = launch_bound_of(key, &token);
  if (bound > 0 && nthreads > bound)
    cfg(std::to_string(nthreads) + " threads per block exceed the kernel's __launch_bounds__(" + token + " = " +
        std::to_string(bound) + ")");
  const size_t optin = dp.sharedMemPerBlockOptin, plain = dp.sharedMemPerBlock;
  size_t limit;
  if (rec.max_dynamic_smem >= 0) {
    if (smem > static_cast<size_t>(rec.max_dynamic_smem))
      cfg("dynamic shared memory above the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize (" +
          std::to_string(rec.max_dynamic_smem) + ")");
    limit = optin;
  } else {
    limit = plain;
  }
  if (smem + std::max(0L, rec.static_smem) > limit)
    cfg("static (" + std::to_string(std::max(0L, rec.static_smem)) + ") + dynamic shared memory above " +
        std::to_string(limit) + " bytes" + (rec.max_dynamic_smem < 0 ? " (no cudaFuncSetAttribute opt-in)" : ""));
  ++st.stats.launches;
  ++rec.launches;
  if (st.stats.log.size() >= 256) st.stats.log.erase(st.stats.log.begin());
  st.stats.log.push_back(std::string(kname) + " in " + func + " grid=" + std::to_string(grid.x) +
                         " block=" + std::to_string(nthreads) + " smem=" + std::to_string(smem));

  Block b;
  b.kernel = name;
  b.rec = &rec;
  b.nthreads = static_cast<int>(nthreads);
  b.bdim = block;
  b.gdim = grid;
  b.entry = entry;
  b.entry_ctx = ctx;
  b.warps.resize((nthreads + 31) / 32);
  std::vector<char> dyn_storage;
  char* dyn = nullptr;
  if (smem) {
    // room for any declared alignment's offset (dynamic_shared), the rest exact: ASan sees overruns
    void* mem = nullptr;
    if (posix_memalign(&mem, 256, smem + 256) != 0) fail("cannot allocate shared memory");
    dyn = static_cast<char*>(mem);
  }
  std::vector<SharedSlot> slots;
  b.dyn = dyn;
  b.dyn_bytes = smem;
  b.slots = &slots;
  b.smem_limit = limit;
  struct Cleanup {
    char* dyn;
    std::vector<SharedSlot>* slots;
    ~Cleanup() {
      std::free(dyn);
      for (auto& s : *slots) std::free(s.mem);
    }
  } cleanup{dyn, &slots};
  for (int i = 0; i < b.nthreads; ++i) get_fiber(i);
  // blocks in a random order
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  std::vector<uint64_t> order(nblocks);
  for (uint64_t i = 0; i < nblocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), st.rng);
  for (uint64_t id : order) {
    b.bidx = uint3{static_cast<unsigned>(id % grid.x), static_cast<unsigned>((id / grid.x) % grid.y),
                   static_cast<unsigned>(id / (uint64_t(grid.x) * grid.y))};
    b.static_bytes = 0;
    for (const auto& s : slots) b.static_bytes = (b.static_bytes + 15) / 16 * 16 + s.bytes;
    run_block(b);
    ++st.stats.blocks;
    ++rec.blocks;
    rec.static_smem = static_cast<long>(b.static_bytes);
  }
}

}  // namespace anllm_emu

extern "C" void anllm_emu_fiber_main() {
  using namespace anllm_emu;
  Block& b = *state().block;
#ifdef ANLLM_EMU_ASAN
  // first run of this fiber: the switch from the scheduler ends here; learn the scheduler's stack
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  try {
    b.entry(b.entry_ctx);
  } catch (...) {
    b.error = std::current_exception();
  }
  Fiber* f = state().fibers[b.cur];
  f->wait = Wait::Done;
  ++b.ndone;
  if (!b.error) {
    try {
      barrier_exited_check(b);
    } catch (...) {
      b.error = std::current_exception();
    }
  }
  fiber_yield(b, /*finished=*/true);
  __builtin_trap();  // a finished fiber is never resumed
}
#endif  // ANLLM_EMU_RUNTIME
