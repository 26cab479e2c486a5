// C++ microbenchmarks of the CPU kernels against what a user would run instead, in one process.
//
//   attention (B=1, Hq=9, Hkv=3, D=64, fp32, an anchor every 24 tokens, T=4096 by default):
//     anllm::anchor_attention_fwd/bwd vs at::scaled_dot_product_attention with the dense AnSAN mask
//     and vs causal SDPA, each with enable_gqa (K/V not copied) and on K/V expanded with
//     repeat_interleave (what older code does); the ratios use the faster of the two;
//   compaction (30 layers x K,V [1,3,8192,64] fp32 keeping 350 slots):
//     anllm::compact_ in place vs an index gather per tensor (the authors' way) vs a plain copy of the
//     kept bytes.
// It prints the machine, torch version, threads and date first, and after the runs the ratios of the
// times measured in this run. Results go to a JSON file: Google Benchmark's own (--benchmark_out, default
// results/bench_ops_cpp-<UTC time>.json) plus <that file>.ratios.json with the ratios. Flags: Google
// Benchmark's own, plus --T=N to change the sequence length.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <benchmark/benchmark.h>
#include <torch/torch.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace {

int64_t g_T = 4096;
constexpr int64_t kHq = 9, kHkv = 3, kD = 64, kEvery = 24;

struct Problem {
  at::Tensor q, k, v, pos, seg, is_anchor, valid, mask, k_rep, v_rep;
  double scale;
};

// Layout of a stream with an anchor at every kEvery-th token: seg(t) = anchors strictly before t.
const Problem& problem() {
  static Problem p = [] {
    Problem p;
    at::manual_seed(0);
    const int64_t T = g_T;
    p.q = at::randn({1, kHq, T, kD});
    p.k = at::randn({1, kHkv, T, kD});
    p.v = at::randn({1, kHkv, T, kD});
    auto t = at::arange(T, at::kLong).unsqueeze(0);
    p.pos = t;
    p.seg = at::floor_divide(t, kEvery).to(at::kInt);
    p.is_anchor = at::remainder(t, kEvery) == (kEvery - 1);
    p.valid = at::ones({1, T}, at::kBool);
    // Dense AnSAN mask, the rule of docs/method.md with broadcasting: [1, 1, T, T].
    auto qi = t.view({1, T, 1}), kj = t.view({1, 1, T});
    auto qs = p.seg.view({1, T, 1}), ks = p.seg.view({1, 1, T});
    auto qa = p.is_anchor.view({1, T, 1}), ka = p.is_anchor.view({1, 1, T});
    p.mask = ((kj <= qi) & ((ks == qs) | (ka & qa.logical_not()))).unsqueeze(1);
    p.k_rep = p.k.repeat_interleave(kHq / kHkv, 1);
    p.v_rep = p.v.repeat_interleave(kHq / kHkv, 1);
    p.scale = 1.0 / std::sqrt(static_cast<double>(kD));
    return p;
  }();
  return p;
}

std::tuple<at::Tensor, at::Tensor> anchor_fwd(const Problem& p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anllm::anchor_attention_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(p.q, p.k, p.v, p.pos, p.seg, p.is_anchor, p.valid, p.pos, p.seg, p.is_anchor, p.valid,
                 p.scale);
}

void BM_AnchorAttentionFwd(benchmark::State& state) {
  const Problem& p = problem();
  for (auto _ : state) benchmark::DoNotOptimize(anchor_fwd(p));
}

// SDPA baselines: kCausal picks causal vs the dense AnSAN mask; kGqa picks enable_gqa on the Hkv heads
// vs K/V repeated to Hq heads.
at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal, bool gqa) {
  const Problem& p = problem();
  return at::scaled_dot_product_attention(q, k, v, causal ? std::optional<at::Tensor>() : p.mask, 0.0, causal,
                                          std::nullopt, /*enable_gqa=*/gqa);
}

template <bool kCausal, bool kGqa>
void sdpa_forward(benchmark::State& state) {
  const Problem& p = problem();
  const at::Tensor& k = kGqa ? p.k : p.k_rep;
  const at::Tensor& v = kGqa ? p.v : p.v_rep;
  for (auto _ : state) benchmark::DoNotOptimize(sdpa(p.q, k, v, kCausal, kGqa));
}
void BM_SdpaDenseMaskFwd(benchmark::State& state) { sdpa_forward<false, false>(state); }
void BM_SdpaCausalFwd(benchmark::State& state) { sdpa_forward<true, false>(state); }
void BM_SdpaDenseMaskGqaFwd(benchmark::State& state) { sdpa_forward<false, true>(state); }
void BM_SdpaCausalGqaFwd(benchmark::State& state) { sdpa_forward<true, true>(state); }

void BM_AnchorAttentionBwd(benchmark::State& state) {
  const Problem& p = problem();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anllm::anchor_attention_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double)>();
  auto [out, lse] = anchor_fwd(p);
  auto dout = at::randn_like(out);
  auto delta = (dout * out).sum(-1);
  for (auto _ : state)
    benchmark::DoNotOptimize(op.call(dout, p.q, p.k, p.v, lse, delta, p.pos, p.seg, p.is_anchor,
                                     p.valid, p.pos, p.seg, p.is_anchor, p.valid, p.scale));
}

template <bool kCausal, bool kGqa>
void sdpa_backward(benchmark::State& state) {
  const Problem& p = problem();
  auto q = p.q.clone().requires_grad_(), k = (kGqa ? p.k : p.k_rep).clone().requires_grad_(),
       v = (kGqa ? p.v : p.v_rep).clone().requires_grad_();
  auto out = sdpa(q, k, v, kCausal, kGqa);
  auto dout = at::randn_like(out);
  for (auto _ : state)
    benchmark::DoNotOptimize(torch::autograd::grad({out}, {q, k, v}, {dout}, /*retain_graph=*/true));
}
void BM_SdpaDenseMaskBwd(benchmark::State& state) { sdpa_backward<false, false>(state); }
void BM_SdpaCausalBwd(benchmark::State& state) { sdpa_backward<true, false>(state); }
void BM_SdpaDenseMaskGqaBwd(benchmark::State& state) { sdpa_backward<false, true>(state); }
void BM_SdpaCausalGqaBwd(benchmark::State& state) { sdpa_backward<true, true>(state); }

// ---- compaction ----
constexpr int64_t kLayers = 30, kCacheHeads = 3, kCap = 8192, kKept = 350;

struct Caches {
  std::vector<at::Tensor> pristine, work;
  at::Tensor keep, lengths, idx;
};

Caches& caches() {
  static Caches c = [] {
    Caches c;
    at::manual_seed(1);
    for (int64_t i = 0; i < 2 * kLayers; ++i) {
      c.pristine.push_back(at::randn({1, kCacheHeads, kCap, kD}));
      c.work.push_back(c.pristine.back().clone());
    }
    c.keep = at::zeros({1, kCap}, at::kBool);
    c.idx = std::get<0>(at::sort(at::randperm(kCap).slice(0, 0, kKept)));
    c.keep.index_put_({0, c.idx}, true);
    c.lengths = at::full({1}, kCap, at::kLong);
    return c;
  }();
  return c;
}

// cold:1 - every compaction method runs right after the caches are rewritten from the pristine copy
// (untimed), so all three start from the same cold cache state. cold:0 - each method simply repeats, as
// the warm baseline figures of docs/benchmarks.md were taken; re-compacting with the same keep mask
// repeats exactly the same memory moves, so every iteration is the same work.
void restore(Caches& c, benchmark::State& state) {
  if (state.range(0) == 0) return;
  state.PauseTiming();
  for (size_t i = 0; i < c.work.size(); ++i) c.work[i].copy_(c.pristine[i]);
  state.ResumeTiming();
}

void BM_CompactInPlace(benchmark::State& state) {
  Caches& c = caches();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("anllm::compact_", "")
                       .typed<at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&)>();
  for (auto _ : state) {
    restore(c, state);
    benchmark::DoNotOptimize(op.call(c.work, c.keep, c.lengths));
  }
}

// What the authors' code does: gather the kept slots of every tensor into a new tensor with advanced
// indexing, `t[:, :, idx, :]` (they index with a Python list; the list-to-tensor step is not timed here).
void BM_CompactIndexGather(benchmark::State& state) {
  Caches& c = caches();
  using at::indexing::Slice;
  for (auto _ : state) {
    restore(c, state);
    for (const auto& t : c.work) benchmark::DoNotOptimize(t.index({Slice(), Slice(), c.idx}));
  }
}

// The fastest gather ATen has.
void BM_CompactIndexSelect(benchmark::State& state) {
  Caches& c = caches();
  for (auto _ : state) {
    restore(c, state);
    for (const auto& t : c.work) benchmark::DoNotOptimize(t.index_select(2, c.idx));
  }
}

// The floor: a plain copy of as many bytes as are kept.
void BM_CopyKeptBytes(benchmark::State& state) {
  Caches& c = caches();
  std::vector<at::Tensor> dst;
  for (const auto& t : c.work) dst.push_back(at::empty_like(t.slice(2, 0, kKept)));
  for (auto _ : state) {
    restore(c, state);
    for (size_t i = 0; i < dst.size(); ++i) dst[i].copy_(c.work[i].slice(2, 0, kKept));
  }
}

BENCHMARK(BM_AnchorAttentionFwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaDenseMaskFwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaCausalFwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaDenseMaskGqaFwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaCausalGqaFwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_AnchorAttentionBwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaDenseMaskBwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaCausalBwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaDenseMaskGqaBwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_SdpaCausalGqaBwd)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CompactInPlace)->ArgName("cold")->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CompactIndexGather)->ArgName("cold")->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CompactIndexSelect)->ArgName("cold")->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_CopyKeptBytes)->ArgName("cold")->Arg(1)->Arg(0)->Unit(benchmark::kMillisecond)->UseRealTime();

// Console output as usual, plus the per-iteration real time of each benchmark for the ratios.
class RatioReporter : public benchmark::ConsoleReporter {
 public:
  RatioReporter() : ConsoleReporter(OO_None) {}  // plain text: the output lands in logs and docs
  std::map<std::string, double> seconds;
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs)
      if (r.run_type == Run::RT_Iteration || r.aggregate_name == "median")
        seconds[r.run_name.function_name + (r.run_name.args.empty() ? "" : "/" + r.run_name.args)] =
            r.GetAdjustedRealTime();
  }
};

std::string utc_now(const char* format) {
  char buf[64];
  const std::time_t now = std::time(nullptr);
  std::strftime(buf, sizeof buf, format, std::gmtime(&now));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> extra;  // storage for the arguments added below
  std::vector<char*> args;
  bool has_out = false;
  for (int i = 0; i < argc; ++i) {
    if (std::strncmp(argv[i], "--T=", 4) == 0) {
      g_T = std::stoll(argv[i] + 4);
      continue;
    }
    has_out |= std::strncmp(argv[i], "--benchmark_out=", 16) == 0;
    args.push_back(argv[i]);
  }
  std::string out_path;
  if (!has_out) {  // every run writes its JSON
    std::filesystem::create_directories("results");
    out_path = "results/bench_ops_cpp-" + utc_now("%Y-%m-%dT%H%M%SZ") + ".json";
    extra = {"--benchmark_out=" + out_path, "--benchmark_out_format=json"};
    for (auto& e : extra) args.push_back(e.data());
  } else {
    for (char* a : args)
      if (std::strncmp(a, "--benchmark_out=", 16) == 0) out_path = a + 16;
  }
  int n = static_cast<int>(args.size());
  benchmark::Initialize(&n, args.data());
  const std::string date = utc_now("%Y-%m-%dT%H:%M:%SZ");
  // Google Benchmark prints (and writes to the JSON) the host, CPUs, caches and load; these add the rest.
  benchmark::AddCustomContext("torch_version", TORCH_VERSION);
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("T", std::to_string(g_T));
  benchmark::AddCustomContext("date_utc", date);
  std::printf("# bench_ops (C++)  %s\n# torch %s, %d torch threads, T=%lld\n", date.c_str(), TORCH_VERSION,
              at::get_num_threads(), static_cast<long long>(g_T));
  RatioReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  auto& s = reporter.seconds;
  std::vector<std::pair<std::string, double>> ratios;
  auto ratio = [&](const char* label, const char* num, const char* den) {
    if (!s.count(num) || !s.count(den)) return;
    ratios.emplace_back(label, s[num] / s[den]);
    std::printf("%-58s %8.2f\n", label, s[num] / s[den]);
  };
  // The faster of the two SDPA variants (enable_gqa, repeat_interleave) against ours.
  auto best_ratio = [&](const char* label, const char* a, const char* b, const char* den) {
    if (!s.count(a) || !s.count(b) || !s.count(den)) return;
    const double r = std::min(s[a], s[b]) / s[den];
    ratios.emplace_back(label, r);
    std::printf("%-58s %8.2f\n", label, r);
  };
  std::printf("\nratios of this run (higher = ours faster, except the time / plain copy ones):\n");
  best_ratio("fwd speed-up vs SDPA + dense mask (faster variant)", "BM_SdpaDenseMaskFwd", "BM_SdpaDenseMaskGqaFwd",
             "BM_AnchorAttentionFwd");
  ratio("fwd speed-up vs SDPA + dense mask, repeat_interleave", "BM_SdpaDenseMaskFwd", "BM_AnchorAttentionFwd");
  ratio("fwd speed-up vs SDPA + dense mask, enable_gqa", "BM_SdpaDenseMaskGqaFwd", "BM_AnchorAttentionFwd");
  best_ratio("fwd speed-up vs causal SDPA (faster variant)", "BM_SdpaCausalFwd", "BM_SdpaCausalGqaFwd",
             "BM_AnchorAttentionFwd");
  ratio("fwd speed-up vs causal SDPA, repeat_interleave", "BM_SdpaCausalFwd", "BM_AnchorAttentionFwd");
  ratio("fwd speed-up vs causal SDPA, enable_gqa", "BM_SdpaCausalGqaFwd", "BM_AnchorAttentionFwd");
  best_ratio("bwd speed-up vs SDPA + dense mask (faster variant)", "BM_SdpaDenseMaskBwd", "BM_SdpaDenseMaskGqaBwd",
             "BM_AnchorAttentionBwd");
  ratio("bwd speed-up vs SDPA + dense mask, repeat_interleave", "BM_SdpaDenseMaskBwd", "BM_AnchorAttentionBwd");
  ratio("bwd speed-up vs SDPA + dense mask, enable_gqa", "BM_SdpaDenseMaskGqaBwd", "BM_AnchorAttentionBwd");
  best_ratio("bwd speed-up vs causal SDPA (faster variant)", "BM_SdpaCausalBwd", "BM_SdpaCausalGqaBwd",
             "BM_AnchorAttentionBwd");
  ratio("bwd speed-up vs causal SDPA, repeat_interleave", "BM_SdpaCausalBwd", "BM_AnchorAttentionBwd");
  ratio("bwd speed-up vs causal SDPA, enable_gqa", "BM_SdpaCausalGqaBwd", "BM_AnchorAttentionBwd");
  ratio("compaction (cold) speed-up vs index gather", "BM_CompactIndexGather/cold:1", "BM_CompactInPlace/cold:1");
  ratio("compaction (cold) time / plain copy of kept bytes", "BM_CompactInPlace/cold:1", "BM_CopyKeptBytes/cold:1");
  ratio("compaction (warm) speed-up vs index gather", "BM_CompactIndexGather/cold:0", "BM_CompactInPlace/cold:0");
  ratio("compaction (cold) speed-up vs index_select", "BM_CompactIndexSelect/cold:1", "BM_CompactInPlace/cold:1");
  ratio("compaction (warm) speed-up vs index_select", "BM_CompactIndexSelect/cold:0", "BM_CompactInPlace/cold:0");
  ratio("compaction (warm) time / plain copy of kept bytes", "BM_CompactInPlace/cold:0", "BM_CopyKeptBytes/cold:0");
  if (!out_path.empty()) {
    const std::string ratio_path = out_path + ".ratios.json";
    if (FILE* f = std::fopen(ratio_path.c_str(), "w")) {
      std::fprintf(f, "{\n  \"date_utc\": \"%s\",\n  \"torch_version\": \"%s\",\n  \"torch_threads\": %d,\n"
                      "  \"T\": %lld,\n  \"ratios\": {",
                   date.c_str(), TORCH_VERSION, at::get_num_threads(), static_cast<long long>(g_T));
      for (size_t i = 0; i < ratios.size(); ++i)
        std::fprintf(f, "%s\n    \"%s\": %.6g", i ? "," : "", ratios[i].first.c_str(), ratios[i].second);
      std::fprintf(f, "\n  }\n}\n");
      std::fclose(f);
      std::printf("\nresults written to %s and %s\n", out_path.c_str(), ratio_path.c_str());
    }
  }
  benchmark::Shutdown();
  return 0;
}
