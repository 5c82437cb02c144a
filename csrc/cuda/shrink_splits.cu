// alto::cuda::shrink_splits and its switch (lora_kernels.h), defined once: the glue's choice of a
// shrink's K split (grouped_gemm.cuh's, from the shrink's tile shape).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "grouped_gemm.cuh"

namespace {
// On unless ALTO_SPLIT_K=0 (or set_split_k(false)): on the H200 it took a 512-token shrink at d = 4,096
// from 24.6 to 19.9 us and its dh at 14,336 from 50.2 to 23.3 us, no other shape slower beyond 1.5% (RESULTS.md,
// 2026-12-06, fifteenth session); the benches' A/B sets it per process.
std::atomic<bool> split_k_enabled{[] {
  const char* env = std::getenv("ALTO_SPLIT_K");
  return env == nullptr || std::strcmp(env, "0") != 0;
}()};
}  // namespace

void alto::cuda::set_split_k(bool enabled) { split_k_enabled.store(enabled, std::memory_order_relaxed); }
bool alto::cuda::split_k() { return split_k_enabled.load(std::memory_order_relaxed); }

int alto::cuda::shrink_splits(int64_t tokens, int num_groups, int64_t out_ld, int64_t d, int sm_count) {
  return split_k() ? detail::shrink_splits(tokens, num_groups, out_ld, d, sm_count) : 1;
}
