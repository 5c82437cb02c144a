// The tile configurations of the grouped GEMMs, in one table: the kernels (grouped_gemm.cuh) take
// each form's configuration in use from it, and bench/tile_configs.cu times every candidate
// (ALTO_CONFIG = its index; bench/device_run.sh builds 0..kCandidates-1). A new candidate is one
// more Candidate<I> here; choosing another for a form is changing its index below.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/epilogue/dispatch_policy.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>

namespace alto::cuda::tiles {

using namespace cute;
using Cooperative = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
using CooperativeEpilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
using PingpongEpilogue = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;

// A CTA tile (M, N, K), the kernel and epilogue schedules that go with it, the cluster of CTAs
// (2 along M: the W tile read once by TMA multicast for both CTAs' rows), and the order the persistent
// scheduler hands out a group's tiles in: along M (M the fast index) or along N.
template <class Tile, class Kernel = Cooperative, class Epilogue = CooperativeEpilogue,
          class Cluster = Shape<_1, _1, _1>, bool AlongN = false>
struct TileConfig {
  using TileShape = Tile;
  using KernelSchedule = Kernel;
  using EpilogueSchedule = Epilogue;
  using ClusterShape = Cluster;
  static constexpr bool kAlongN = AlongN;
};

template <int I> struct Candidate;
template <> struct Candidate<0> : TileConfig<Shape<_128, _64, _64>> {
  static constexpr const char* kName = "cooperative 128x64x64";
};
template <> struct Candidate<1> : TileConfig<Shape<_128, _128, _64>> {
  static constexpr const char* kName = "cooperative 128x128x64";
};
template <> struct Candidate<2> : TileConfig<Shape<_128, _256, _64>> {
  static constexpr const char* kName = "cooperative 128x256x64";
};
template <> struct Candidate<3> : TileConfig<Shape<_256, _128, _64>> {
  static constexpr const char* kName = "cooperative 256x128x64";
};
template <> struct Candidate<4> : TileConfig<Shape<_64, _128, _64>, Pingpong, PingpongEpilogue> {
  static constexpr const char* kName = "pingpong 64x128x64";
};
template <> struct Candidate<5> : TileConfig<Shape<_64, _256, _64>, Pingpong, PingpongEpilogue> {
  static constexpr const char* kName = "pingpong 64x256x64";
};
template <> struct Candidate<6>
    : TileConfig<Shape<_128, _256, _64>, Cooperative, CooperativeEpilogue, Shape<_2, _1, _1>> {
  static constexpr const char* kName = "cooperative 128x256x64, cluster 2x1";
};
template <> struct Candidate<7>
    : TileConfig<Shape<_256, _128, _64>, Cooperative, CooperativeEpilogue, Shape<_2, _1, _1>> {
  static constexpr const char* kName = "cooperative 256x128x64, cluster 2x1";
};
template <> struct Candidate<8>
    : TileConfig<Shape<_128, _256, _64>, Cooperative, CooperativeEpilogue, Shape<_2, _1, _1>, true> {
  static constexpr const char* kName = "cooperative 128x256x64, cluster 2x1, along N";
};
inline constexpr int kCandidates = 9;

// In use, per form (an index into the candidates):
// Measured with bench/tile_configs.cu (RESULTS.md): the expand writes y 1.1-1.25x faster with
// 128x256 tiles than with 128x128. The shrink and weight_grad ran 19% and 11% faster in sum with
// 256x128 and 128x128 tiles over h widths 128 and 384 (most at 384 and the widest d), not at 64,
// where the 1B step did not move: they keep 128x64 (a choice per width would take the gain).
inline constexpr int kShrink = 0;
inline constexpr int kExpand = 2;
inline constexpr int kWeightGrad = 0;
// The base's GEMM with the LoRA term in its K (grouped_gemm.cuh's fused forms), chosen by
// bench/base_gemm.cu against cuBLAS + the expand (H100, RESULTS.md 2026-12-07): wide tiles in a 2x1
// cluster where they fill the SMs (32 adapters x 512 tokens: 0.918x today's GEMMs), 128x128 where
// they would not (one adapter of 512 tokens: 0.987x, where the wide tiles took 1.31x). The wide ones
// handed out along N within each stripe: 0.963x today's GEMMs at 32 adapters where along M took 0.986x
// (the twenty-third session; a 4x1 cluster took 1.012x).
inline constexpr int kFusedWide = 8;
inline constexpr int kFusedNarrow = 1;

}  // namespace alto::cuda::tiles
