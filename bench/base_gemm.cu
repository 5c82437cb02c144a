// Can our CUTLASS grouped GEMM run the frozen base's own GEMMs as fast as cuBLAS? The question under
// issue 33's fusion (bench/RESULTS.md, 2026-12-07): y = [x | h] [W | B]^T in one kernel per
// projection would drop the LoRA expand's write of y and cuBLAS's read of it as C (beta = 1), but
// only if the kernel that replaces cuBLAS's is as fast on the base's shapes. For each shape of
// bench_step's step (Llama-3-8B widths; adapters x 512 tokens; forward y = x W^T and dX = dY W),
// in the same binary:
//   cublas      cuBLAS alone (beta 0), as the frozen base runs it
//   cublas+C    cuBLAS adding the LoRA output (beta 1, C = D), as ALTO's step runs it
//   expand      ALTO's LoRA expand writing that output (ranks 8/16/32/64 cycled)
//   today       cublas+C + expand
//   ours        the grouped GEMM, one problem per adapter (the fused kernel's base part)
//   striped     the same over stripes of the output's columns, stripe by stripe across adapters (the
//               fused kernel's order: grouped_gemm.cuh's kStripeColumns)
//   fused       the fused kernel (grouped_gemm.cuh's FusedForwardGemm / FusedBackwardGemm): the base's
//               product and the adapter's in one accumulator, written once
//   plain       a plain (not grouped) CUTLASS GEMM of the same tile, schedule and cluster over all T rows
//               (CUTLASS's persistent scheduler, its raster heuristic: the tile order may differ from the
//               grouped kernel's), and "sw8" the same with its tiles swizzled in groups of 8 for L2: whether
//               the grouped kernels' gap to cuBLAS is the tile configuration (plain trails cuBLAS too) or the
//               grouped kernel (its group moves and tile order: plain does not)
// One tile configuration per binary (ALTO_CONFIG: csrc/cuda/tile_configs.cuh), built by
// `bash bench/device_run.sh base_gemm`; ours is checked against cuBLAS alone and the fused kernel
// against today's output, at each adapter's first and last rows (max |diff| / (|ref| + 1)).
#include <cublas_v2.h>

#include <algorithm>
#include <cmath>

#include <cutlass/util/packed_stride.hpp>

#include "cuda_bench.cuh"

using namespace alto::cuda;
using namespace alto::cuda::detail;
using namespace bench;
using Forward = ShrinkGemm<Bf16, Config>;  // A row-major, W [N, K] row-major (K-major B), D row-major
using Backward = ExpandGemm<Bf16, Config>;  // A row-major, W [K, N] row-major (N-major B), D row-major
using LoraExpand = ExpandGemm<Bf16>;  // the expand as the library runs it (its configuration in use)
using FusedForward = FusedForwardGemm<Bf16, Config>;  // (the library picks one of two: tile_configs.cuh)
using FusedBackward = FusedBackwardGemm<Bf16, Config>;

#define CHECK_CUBLAS(x)                                                            \
  do {                                                                             \
    cublasStatus_t s = (x);                                                        \
    if (s != CUBLAS_STATUS_SUCCESS) {                                              \
      std::fprintf(stderr, "%s: cuBLAS status %d\n", #x, static_cast<int>(s));     \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

// The base's GEMM over adapter g's rows: out[t0:t0+n, 0:N] = A[t0:t0+n, 0:K] . W (all adapters one W),
// in stripes of `stripe` output columns (the whole width: one stripe), stripe by stripe across adapters.
template <class E>
struct BaseForm {
  static constexpr bool kClearsEmptyGroups = false;
  static constexpr bool kScaled = false;
  static constexpr bool kStripeMajor = true;
  const E* a;
  const E* w;
  E* out;
  int64_t lda, ldw, k, n, max_rank;
  bool backward;  // W [K, N] (a stripe's columns along memory) rather than [N, K]
  int64_t stripe;
  float beta = 0.f;
  int splits = static_cast<int>((n + stripe - 1) / stripe);
  __device__ GroupProblem<E> problem(GroupRange rg, int s) const {
    const int64_t n0 = s * stripe, cols = n - n0 < stripe ? n - n0 : stripe;
    return {rg.n, cols, k, a + rg.t0 * lda, lda, w + (backward ? n0 : n0 * ldw), ldw, out + rg.t0 * n + n0, n};
  }
};

// The non-grouped kernel and epilogue schedules of a grouped one.
template <class GroupedSchedule>
struct PlainSchedules {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
  using Epilogue = cutlass::epilogue::TmaWarpSpecializedCooperative;
};
template <>
struct PlainSchedules<alto::cuda::tiles::Pingpong> {
  using Kernel = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
  using Epilogue = cutlass::epilogue::TmaWarpSpecialized;
};

// The plain GEMM: D [M, N] row-major = A [M, K] row-major . B, B K-major (W [N, K], the forward) or N-major
// (W [K, N], dX); Cfg's tile, cluster and schedule kind without the pointer arrays.
template <class Cfg, class LayoutB>
struct PlainGemm {
  using Schedules = PlainSchedules<typename Cfg::KernelSchedule>;
  using TileShape = typename Cfg::TileShape;
  using ClusterShape = typename Cfg::ClusterShape;
  using Row = cutlass::layout::RowMajor;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, Bf16, Row, 8, Bf16, Row, 8,
      typename Schedules::Epilogue, cutlass::epilogue::fusion::LinearCombination<Bf16, float>>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Bf16, Row, 8, Bf16, LayoutB, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Schedules::Kernel>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // Milliseconds of one launch (its output in d), tiles swizzled in groups of `swizzle`; -1 where CUTLASS refuses it.
  static float time(const Bf16* a, const Bf16* w, Bf16* d, int M, int N, int K, int swizzle, int sms) {
    using namespace cute;
    cutlass::KernelHardwareInfo hw;
    hw.device_id = 0;
    hw.sm_count = sms;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {M, N, K, 1},
        {a, cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, make_shape(M, K, 1)), w,
         cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, make_shape(N, K, 1))},
        {{1.f, 0.f}, d, cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, make_shape(M, N, 1)), d,
         cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, make_shape(M, N, 1))},
        hw};
    args.scheduler.max_swizzle_size = swizzle;
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -1.f;
    void* ws = nullptr;
    CHECK_CUDA(cudaMalloc(&ws, std::max<size_t>(Gemm::get_workspace_size(args), 1)));
    float ms = -1.f;  // (a launch that fails is not timed)
    if (gemm.initialize(args, ws) == cutlass::Status::kSuccess && gemm.run() == cutlass::Status::kSuccess &&
        cudaGetLastError() == cudaSuccess)
      ms = time_ms([&] { gemm.run(); });
    CHECK_CUDA(cudaFree(ws));
    return ms;
  }
};

__global__ void fill_random(Bf16* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = (i + seed) * 0x9E3779B97F4A7C15ull;  // splitmix64
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    p[i] = Bf16(static_cast<float>((z ^ (z >> 31)) >> 40) / static_cast<float>(1 << 24) - 0.5f);
  }
}

// The fused forward as the library runs it: Bᵀ filled (transpose_scaled; its time also in transpose_ms), then
// the GEMM.
float time_fused_forward(const Segments& seg, const FusedForwardForm<Bf16>& form, const Bf16* b, int sms,
                         float& transpose_ms) {
  transpose_ms = time_ms([&] {
    launch_transpose_scaled(seg, b, const_cast<Bf16*>(form.bt), form.d_out, form.bt_ld, nullptr);
  });
  CHECK_CUDA(cudaGetLastError());
  const float gemm_ms = time_form<FusedForward>(seg, form, sms);
  return gemm_ms < 0 ? gemm_ms : transpose_ms + gemm_ms;
}

// The largest |got - ref| / (|ref| + 1) over each adapter's first and last rows of two [T, N] outputs.
double max_row_diff(const Bf16* got_dev, const Bf16* ref_dev, int N, const std::vector<int32_t>& seg) {
  CHECK_CUDA(cudaDeviceSynchronize());
  double worst = 0;
  for (size_t g = 0; g + 1 < seg.size(); ++g)
    for (const int t : {seg[g], seg[g + 1] - 1}) {
      const auto got = download(got_dev + size_t(t) * N, N), ref = download(ref_dev + size_t(t) * N, N);
      for (int j = 0; j < N; ++j)
        worst = std::max(worst, std::fabs(double(float(got[j])) - float(ref[j])) / (std::fabs(float(ref[j])) + 1.0));
    }
  return worst;
}

Bf16* random_device(size_t n, uint64_t seed) {
  Bf16* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, n * sizeof(Bf16)));
  fill_random<<<1024, 256>>>(p, n, seed);
  CHECK_CUDA(cudaGetLastError());
  return p;
}

struct GemmShape {
  const char* name;
  bool backward;  // dX = dY W (W [K, N]) rather than y = x W^T (W [N, K])
  int n, k;
  int per_layer;  // how many of a layer's projections have this shape
};

int main() {
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cublasHandle_t cublas;
  CHECK_CUBLAS(cublasCreate(&cublas));
  void* cublas_ws = nullptr;  // as PyTorch gives cuBLAS on Hopper (CUBLAS_WORKSPACE_CONFIG's default)
  const size_t cublas_ws_bytes = size_t(32) << 20;
  CHECK_CUDA(cudaMalloc(&cublas_ws, cublas_ws_bytes));
  CHECK_CUBLAS(cublasSetWorkspace(cublas, cublas_ws, cublas_ws_bytes));
  int32_t* err = nullptr;
  CHECK_CUDA(cudaMalloc(&err, 4 * sizeof(int32_t)));
  CHECK_CUDA(cudaMemset(err, 0, 4 * sizeof(int32_t)));
  std::printf("candidate %d: %s (ms per GEMM; ratios against cuBLAS alone and against today)\n", ALTO_CONFIG,
              Config::kName);
  const GemmShape shapes[] = {{"q,o   fwd", false, 4096, 4096, 2},  {"k,v   fwd", false, 1024, 4096, 2},
                          {"gate,up fwd", false, 14336, 4096, 2}, {"down  fwd", false, 4096, 14336, 1},
                          {"q,o   dX", true, 4096, 4096, 2},   {"k,v   dX", true, 4096, 1024, 2},
                          {"gate,up dX", true, 4096, 14336, 2},  {"down  dX", true, 14336, 4096, 1}};
  constexpr int kTokens = 512, kMaxRank = 64;
  const float one = 1.f, zero = 0.f;
  for (const int adapters : {1, 8, 16, 32}) {  // 16: where the fused kernel starts to pay (it lost at 8, won at 32)
    const int cycle[4] = {8, 16, 32, 64};
    std::vector<int32_t> seg{0}, rank{0};
    for (int g = 0; g < adapters; ++g) {
      seg.push_back(seg.back() + kTokens);
      rank.push_back(rank.back() + cycle[g % 4]);
    }
    const int T = seg.back(), R = rank.back();
    // scaling 1 (nullptr): the fused kernel's B side carries the scaling (the library's (s B)ᵀ, dh = s dY Bᵀ)
    const Segments segments{upload(seg), upload(rank), nullptr, adapters, T, R, err};
    const Bf16* h = random_device(size_t(T) * kMaxRank, 1);
    std::printf("%d adapters x %d tokens (ranks 8-64)\n", adapters, kTokens);
    std::printf("  %-11s %6s %6s | %8s %8s %7s %8s | %8s %6s %8s %6s | %8s %7s %7s | %8s %6s %8s %6s\n", "GEMM", "N",
                "K", "cublas", "cublas+C", "expand", "today", "ours", "ours/c", "striped", "/c", "fused", "/today",
                "/cublas", "plain", "/c", "sw8", "/c");
    double sum_cublas = 0, sum_today = 0, sum_ours = 0, sum_striped = 0, sum_fused = 0, sum_plain = 0, sum_sw8 = 0;
    for (const GemmShape& s : shapes) {
      const int N = s.n, K = s.k;
      Bf16* a = random_device(size_t(T) * K, 2);  // x or dY
      Bf16* w = random_device(size_t(N) * K, 3);
      Bf16* lora_b = random_device(size_t(R) * N, 4);  // B [R, N] (forward) or A [R, N = d_in] (dX)
      Bf16* lora_bt = nullptr;  // Bᵀ [N, bt_width]: the fused forward's B side, which it fills
      Bf16 *y_cublas = nullptr, *y_ours = nullptr;
      CHECK_CUDA(cudaMalloc(&lora_bt, size_t(N) * bt_width(adapters, R) * sizeof(Bf16)));
      CHECK_CUDA(cudaMalloc(&y_cublas, size_t(T) * N * sizeof(Bf16)));
      CHECK_CUDA(cudaMalloc(&y_ours, size_t(T) * N * sizeof(Bf16)));
      // cuBLAS sees the row-major matrices as their column-major transposes: y^T = W . x^T (TN), dX^T = W^T . dY^T (NN).
      auto run_cublas = [&](const float* beta) {
        if (s.backward)
          CHECK_CUBLAS(cublasGemmEx(cublas, CUBLAS_OP_N, CUBLAS_OP_N, N, T, K, &one, w, CUDA_R_16BF, N, a, CUDA_R_16BF,
                                    K, beta, y_cublas, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        else
          CHECK_CUBLAS(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, N, T, K, &one, w, CUDA_R_16BF, K, a, CUDA_R_16BF,
                                    K, beta, y_cublas, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      };
      const ExpandForm<Bf16> expand{h, lora_b, y_cublas, kMaxRank, N, kMaxRank, 0.f};
      const float cublas_ms = time_ms([&] { run_cublas(&zero); });
      const float cublas_c_ms = time_ms([&] { run_cublas(&one); });
      const float expand_ms = time_form<LoraExpand>(segments, expand, sms);
      // W's leading dimension: K (forward, W [N, K]) or N (backward, W [K, N]).
      const auto time_base = [&](int64_t columns) {
        const BaseForm<Bf16> base{a, w, y_ours, K, s.backward ? N : K, K, N, 1 << 30, s.backward, columns};
        return s.backward ? time_form<Backward>(segments, base, sms) : time_form<Forward>(segments, base, sms);
      };
      const float striped_ms = time_base(kStripeColumns);
      run_cublas(&zero);
      const double striped_diff = max_row_diff(y_ours, y_cublas, N, seg);
      const float ours_ms = time_base(N);
      run_cublas(&zero);
      const double ours_diff = max_row_diff(y_ours, y_cublas, N, seg);
      const float today = cublas_c_ms + expand_ms;
      std::printf("  %-11s %6d %6d | %8.3f %8.3f %7.3f %8.3f | %8.3f %6.3f %8.3f %6.3f |", s.name, N, K, cublas_ms,
                  cublas_c_ms, expand_ms, today, ours_ms, ours_ms / cublas_ms, striped_ms, striped_ms / cublas_ms);
      std::fflush(stdout);  // (the fused kernel's first run on a GPU follows)
      float fused_ms = -1, transpose_ms = 0;
      if (s.backward)
        fused_ms = time_form<FusedBackward>(
            segments, FusedBackwardForm<Bf16>{a, w, h, lora_b, y_ours, N, K, kMaxRank, kMaxRank}, sms);
      else
        fused_ms = time_fused_forward(segments, FusedForwardForm<Bf16>{a, w, h, lora_bt, y_ours, K, N, kMaxRank,
                                                                        bt_width(adapters, R), kMaxRank},
                                      lora_b, sms, transpose_ms);
      run_form<LoraExpand>(segments, expand, sms);
      run_cublas(&one);  // today's y: the expand's output, the base's product added in cuBLAS's epilogue
      const double fused_diff = max_row_diff(y_ours, y_cublas, N, seg);
      std::printf(" %8.3f %7.3f %7.3f |", fused_ms, fused_ms / today, fused_ms / cublas_ms);
      std::fflush(stdout);
      const auto time_plain = [&](int swizzle) {
        return s.backward ? PlainGemm<Config, cutlass::layout::RowMajor>::time(a, w, y_ours, T, N, K, swizzle, sms)
                          : PlainGemm<Config, cutlass::layout::ColumnMajor>::time(a, w, y_ours, T, N, K, swizzle, sms);
      };
      run_cublas(&zero);
      const float plain_ms = time_plain(1);
      const double plain_diff = max_row_diff(y_ours, y_cublas, N, seg);
      const float sw8_ms = time_plain(8);
      const double sw8_diff = max_row_diff(y_ours, y_cublas, N, seg);
      std::printf(" %8.3f %6.3f %8.3f %6.3f  max diff: ours %.1e, striped %.1e, fused %.1e (%d stripes), plain %.1e, "
                  "sw8 %.1e", plain_ms, plain_ms / cublas_ms, sw8_ms, sw8_ms / cublas_ms, ours_diff, striped_diff,
                  fused_diff, stripe_count(N), plain_diff, sw8_diff);
      if (!s.backward) std::printf(" (of fused: transpose %.3f)", transpose_ms);
      std::printf("\n");
      sum_cublas += s.per_layer * cublas_ms, sum_today += s.per_layer * today;
      sum_ours += s.per_layer * ours_ms, sum_striped += s.per_layer * striped_ms, sum_fused += s.per_layer * fused_ms;
      sum_plain += s.per_layer * plain_ms, sum_sw8 += s.per_layer * sw8_ms;
      for (void* p : {static_cast<void*>(a), static_cast<void*>(w), static_cast<void*>(lora_b),
                      static_cast<void*>(lora_bt), static_cast<void*>(y_cublas), static_cast<void*>(y_ours)})
        CHECK_CUDA(cudaFree(p));
    }
    std::printf("  one layer's 14 GEMMs: cublas %.3f | today %.3f | ours %.3f (%.3fx cublas) | striped %.3f "
                "(%.3fx) | fused %.3f (%.3fx today, %.3fx cublas) | plain %.3f (%.3fx) | sw8 %.3f (%.3fx)\n",
                sum_cublas, sum_today, sum_ours, sum_ours / sum_cublas, sum_striped, sum_striped / sum_cublas,
                sum_fused, sum_fused / sum_today, sum_fused / sum_cublas, sum_plain, sum_plain / sum_cublas, sum_sw8,
                sum_sw8 / sum_cublas);
    CHECK_CUDA(cudaFree(const_cast<Bf16*>(h)));
  }
  return index_errors(err);
}
