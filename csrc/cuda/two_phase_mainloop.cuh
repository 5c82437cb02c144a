// A grouped-GEMM mainloop with two K phases: group g computes D_g = A_g B_g + A2_g B2_g, its K loop
// reading (A_g, B_g) over the first k_first columns, then (A2_g, B2_g) over the group's remaining
// K - k_first columns, into one accumulator. Why: a LoRA projection's output is the base's
// x Wᵀ plus the adapter's h (s B)ᵀ; with the adapter's K columns appended to the base's, the
// adapter's product never leaves the registers (no expand writing it, no base GEMM reading it back as
// C: bench/RESULTS.md, 2026-12-07). The same kernel serves dX = dY W + dh A.
//
// It is CUTLASS's ptr-array sm_90 TMA warp-specialized mainloop (the one GroupedGemm builds) with two
// more TMA descriptors per group: the MMA consumer, the pipeline and the shared-memory tiles are the
// base's; only the producer's loads choose their source by K tile. Each group's phase-2 descriptors
// carry that group's K extent (its rank), so TMA fills the tile's columns past it with zeros, and
// its M extent, so a partial M tile reads zeros below the group's rows.
#pragma once
#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>

namespace alto::cuda::detail {

using namespace cute;

template <class Base>
struct TwoPhaseMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::InternalElementA;
  using typename Base::InternalElementB;
  using typename Base::InternalStrideA;
  using typename Base::InternalStrideB;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::PipelineStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TensorStorage;
  using typename Base::TileShape;
  using typename Base::TMA_A;
  using typename Base::TMA_B;
  using typename Base::DispatchPolicy;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;

  struct TensorMapStorage : cute::aligned_struct<128, _0> {
    cute::TmaDescriptor smem_tensormap_A;
    cute::TmaDescriptor smem_tensormap_B;
    cute::TmaDescriptor smem_tensormap_A2;
    cute::TmaDescriptor smem_tensormap_B2;
  };
  static constexpr int kTensorMaps = 4;

  struct Arguments {
    ElementA const** ptr_A;
    StrideA dA;
    ElementB const** ptr_B;
    StrideB dB;
    ElementA const** ptr_A2;
    StrideA dA2;
    ElementB const** ptr_B2;
    StrideB dB2;
    int k_first;  // the first phase's K in every group: a whole number of K tiles
  };

  struct Params : Base::Params {
    TMA_A tma_load_a2;
    TMA_B tma_load_b2;
    InternalElementA const** ptr_A2;
    StrideA dA2;
    InternalElementB const** ptr_B2;
    StrideB dB2;
    int k_first;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape problem_shapes, Arguments const& args, void* workspace) {
    // The base builds each pair's TMA descriptors from its pointer arrays (placeholders: every
    // group's pointers, dims and strides are written on the device before its first load).
    Params params;
    static_cast<typename Base::Params&>(params) = Base::to_underlying_arguments(
        problem_shapes, typename Base::Arguments{args.ptr_A, args.dA, args.ptr_B, args.dB}, workspace);
    const auto second = Base::to_underlying_arguments(
        problem_shapes, typename Base::Arguments{args.ptr_A2, args.dA2, args.ptr_B2, args.dB2}, workspace);
    params.tma_load_a2 = second.tma_load_a;
    params.tma_load_b2 = second.tma_load_b;
    params.ptr_A2 = second.ptr_A;
    params.dA2 = args.dA2;
    params.ptr_B2 = second.ptr_B;
    params.dB2 = args.dB2;
    params.k_first = args.k_first;
    return params;
  }

  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&, int sm_count) {
    return kTensorMaps * sizeof(cute::TmaDescriptor) * sm_count;  // each SM's copies, one block per map
  }

  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape problem_shapes, Arguments const& args) {
    constexpr int kTileK = size<2>(TileShape{});
    return args.k_first > 0 && args.k_first % kTileK == 0 &&
           Base::can_implement(problem_shapes, typename Base::Arguments{args.ptr_A, args.dA, args.ptr_B, args.dB});
  }

  // gA, gB as the base's, then gA2, gB2: the same tiling of the second pair's TMA coordinates.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& params) const {
    auto [M, N, K, L] = problem_shape_MNKL;
    const auto first = Base::load_init(problem_shape_MNKL, params);
    Tensor mA2 = params.tma_load_a2.get_tma_tensor(make_shape(M, K, 1));
    Tensor mB2 = params.tma_load_b2.get_tma_tensor(make_shape(N, K, 1));
    Tensor gA2 = local_tile(mA2, TileShape{}, make_coord(_, _, _), Step<_1, Underscore, _1>{});
    Tensor gB2 = local_tile(mB2, TileShape{}, make_coord(_, _, _), Step<Underscore, _1, _1>{});
    return cute::make_tuple(get<0>(first), get<1>(first), gA2, gB2);
  }

  // The producer: K tile k < k_first / BLK_K from (A, B) at k, the others from (A2, B2) at
  // k - k_first / BLK_K, into the same pipeline stages the consumer reads.
  template <class TensorA, class TensorB, class TensorA2, class TensorB2, class Maps, class KTileIterator,
            class BlockCoord>
  CUTLASS_DEVICE void load(Params const& params, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorA2, TensorB2> const& load_inputs, Maps const& maps,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    using ClusterShape = typename DispatchPolicy::ClusterShape;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});  // (BLK_M,BLK_K,PIPE)
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});  // (BLK_N,BLK_K,PIPE)
    constexpr uint32_t cluster_x = get<0>(ClusterShape{});
    const uint32_t block_x = block_rank_in_cluster % cluster_x, block_y = block_rank_in_cluster / cluster_x;
    auto [m, n, k_unused, l] = blk_coord;
    // Each operand's slice of this CTA within its cluster (A is multicast along N, B along M).
    auto tma_a = params.tma_load_a.get_slice(block_y);
    auto tma_b = params.tma_load_b.get_slice(block_x);
    auto tma_a2 = params.tma_load_a2.get_slice(block_y);
    auto tma_b2 = params.tma_load_b2.get_slice(block_x);
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m, _, l));  // (TMA,TMA_M,TMA_K,k)
    Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n, _, l));
    Tensor tAgA2 = tma_a2.partition_S(get<2>(load_inputs)(_, _, m, _, l));
    Tensor tBgB2 = tma_b2.partition_S(get<3>(load_inputs)(_, _, n, _, l));
    Tensor tAsA = tma_a.partition_D(sA);  // (TMA,TMA_M,TMA_K,PIPE)
    Tensor tBsB = tma_b.partition_D(sB);
    uint16_t mask_a = 0, mask_b = 0;  // the cluster's CTAs that receive each multicast tile
    auto cluster_layout = Layout<ClusterShape>{};
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>)
      for (int j = 0; j < size<1>(cluster_layout); ++j) mask_a |= uint16_t(1) << cluster_layout(block_x, j, Int<0>{});
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>)
      for (int i = 0; i < size<0>(cluster_layout); ++i) mask_b |= uint16_t(1) << cluster_layout(i, block_y, Int<0>{});
    const int first_tiles = params.k_first / size<2>(TileShape{});
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count, ++k_tile_iter) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const int k = *k_tile_iter;
      if (k < first_tiles) {
        copy(params.tma_load_a.with(get<0>(maps), *barrier, mask_a), tAgA(_, _, _, k), tAsA(_, _, _, stage));
        copy(params.tma_load_b.with(get<1>(maps), *barrier, mask_b), tBgB(_, _, _, k), tBsB(_, _, _, stage));
      } else {
        const int k2 = k - first_tiles;
        copy(params.tma_load_a2.with(get<2>(maps), *barrier, mask_a), tAgA2(_, _, _, k2), tAsA(_, _, _, stage));
        copy(params.tma_load_b2.with(get<3>(maps), *barrier, mask_b), tBgB2(_, _, _, k2), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }

  // ---- the four descriptors: each SM's global copies, edited in shared memory per group ----------

  CUTLASS_DEVICE auto tensormaps_init(Params const& params, TensorMapStorage& shared, int32_t sm_count, int32_t sm_idx) {
    cute::TmaDescriptor* global = reinterpret_cast<cute::TmaDescriptor*>(params.tensormaps);
    if (cute::elect_one_sync()) {
      shared.smem_tensormap_A = *params.tma_load_a.get_tma_descriptor();
      shared.smem_tensormap_B = *params.tma_load_b.get_tma_descriptor();
      shared.smem_tensormap_A2 = *params.tma_load_a2.get_tma_descriptor();
      shared.smem_tensormap_B2 = *params.tma_load_b2.get_tma_descriptor();
    }
    __syncwarp();
    return cute::make_tuple(&global[sm_idx], &global[sm_idx + sm_count], &global[sm_idx + 2 * sm_count],
                            &global[sm_idx + 3 * sm_count]);
  }

  // One descriptor's dims and strides for a [rows, cols] operand of group `group` (cols >= 1: a
  // descriptor cannot have an empty dim; a group whose phase has no columns never loads it).
  template <class Element, class Tma, class Stride>
  CUTLASS_DEVICE static void set_extent(cute::TmaDescriptor& desc, Tma const& tma, uint32_t rows, uint32_t cols,
                                        Stride const& stride) {
    cute::array<uint32_t, 5> shape = {1, 1, 1, 1, 1};
    cute::array<uint64_t, 5> strides = {0, 0, 0, 0, 0};
    Element const* none = nullptr;
    Tensor t = make_tensor(none, make_shape(rows, cols > 0 ? cols : 1u, Int<1>{}), stride);
    cute::detail::fill_tma_gmem_shape_stride(tma, t, shape, strides);
    for (uint64_t& s : strides) s = s * sizeof_bits_v<Element> / 8;
    cute::tma_descriptor_replace_dims_strides_in_shared_mem(desc, shape, strides);
  }

  template <class Maps, class ProblemShape_MNKL>
  CUTLASS_DEVICE void tensormaps_perform_update(TensorMapStorage& shared, Params const& params, Maps const&,
                                                ProblemShape_MNKL problem_shape_mnkl, int32_t group) {
    if (!cute::elect_one_sync()) return;
    cute::tma_descriptor_replace_addr_in_shared_mem(shared.smem_tensormap_A, params.ptr_A[group]);
    cute::tma_descriptor_replace_addr_in_shared_mem(shared.smem_tensormap_B, params.ptr_B[group]);
    cute::tma_descriptor_replace_addr_in_shared_mem(shared.smem_tensormap_A2, params.ptr_A2[group]);
    cute::tma_descriptor_replace_addr_in_shared_mem(shared.smem_tensormap_B2, params.ptr_B2[group]);
    const uint32_t M = get<0>(problem_shape_mnkl), N = get<1>(problem_shape_mnkl), K = get<2>(problem_shape_mnkl);
    const uint32_t k1 = params.k_first, k2 = K > k1 ? K - k1 : 0;
    set_extent<InternalElementA>(shared.smem_tensormap_A, params.tma_load_a, M, k1, params.dA[group]);
    set_extent<InternalElementB>(shared.smem_tensormap_B, params.tma_load_b, N, k1, params.dB[group]);
    set_extent<InternalElementA>(shared.smem_tensormap_A2, params.tma_load_a2, M, k2, params.dA2[group]);
    set_extent<InternalElementB>(shared.smem_tensormap_B2, params.tma_load_b2, N, k2, params.dB2[group]);
  }

  template <class Maps>
  CUTLASS_DEVICE void tensormaps_cp_fence_release(TensorMapStorage& shared, Maps const& maps) {
    if (cute::elect_one_sync()) {
      cute::tma_desc_commit_group();
      cute::tma_desc_wait_group();
    }
    // the whole warp (the fence is aligned)
    tma_descriptor_cp_fence_release(get<0>(maps), shared.smem_tensormap_A);
    tma_descriptor_cp_fence_release(get<1>(maps), shared.smem_tensormap_B);
    tma_descriptor_cp_fence_release(get<2>(maps), shared.smem_tensormap_A2);
    tma_descriptor_cp_fence_release(get<3>(maps), shared.smem_tensormap_B2);
  }

  template <class Maps>
  CUTLASS_DEVICE void tensormaps_fence_acquire(Maps const& maps) {
    cute::tma_descriptor_fence_acquire(get<0>(maps));
    cute::tma_descriptor_fence_acquire(get<1>(maps));
    cute::tma_descriptor_fence_acquire(get<2>(maps));
    cute::tma_descriptor_fence_acquire(get<3>(maps));
  }
};

}  // namespace alto::cuda::detail
