// One CUTLASS sm_90a grouped GEMM over all adapters of a step (TMA + wgmma, warp-specialized
// cooperative, persistent), with its problems built on the device from the segment indices.
// Included by the per-configuration .cu files; each instantiates one op (shrink: its whole and its
// split-K form; expand; weight_grad) for one dtype.
#pragma once
#include <atomic>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include "lora_kernels.h"
#include "tile_configs.cuh"
#include "two_phase_mainloop.cuh"

namespace alto::cuda::detail {

using namespace cute;

template <DType D> struct CutlassElement;
template <> struct CutlassElement<DType::kBF16> { using type = cutlass::bfloat16_t; };
template <> struct CutlassElement<DType::kF16> { using type = cutlass::half_t; };
template <> struct CutlassElement<DType::kF32> { using type = float; };

constexpr size_t kArrayAlign = 128;
inline size_t align_up(size_t n) { return (n + kArrayAlign - 1) / kArrayAlign * kArrayAlign; }

// D = alpha_g * A_g . B_g (+ beta * C_g), fp32 accumulation, C aliasing D when accumulating.
// Operands in Element, output in ElementD; tile shape and schedules from Config (tile_configs.cuh).
// TwoPhase: D = alpha_g * (A_g . B_g + A2_g . B2_g) (+ beta * C_g), the second pair's K after the
// first's (TwoPhaseMainloop; the first pair's K is the same in every group).
template <class Element, class LayoutA, class LayoutB, class LayoutD, class Config, class ElementD = Element,
          bool TwoPhase = false>
struct GroupedGemm {
  static constexpr bool kTwoPhase = TwoPhase;
  using TileShape = typename Config::TileShape;
  using KernelSchedule = typename Config::KernelSchedule;
  using EpilogueSchedule = typename Config::EpilogueSchedule;
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  static constexpr int kAlign = 8;  // operand elements: 16 bytes, what TMA needs
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));
  using ClusterShape = typename Config::ClusterShape;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementD, LayoutD*, kAlignD,
      ElementD, LayoutD*, kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float>>::CollectiveOp;

  using BuiltMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
      LayoutB*, kAlign, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage) +
          (TwoPhase ? 2 * sizeof(cute::TmaDescriptor) : 0))>,  // the second pair's descriptors
      KernelSchedule>::CollectiveOp;
  using CollectiveMainloop = cute::conditional_t<TwoPhase, TwoPhaseMainloop<BuiltMainloop>, BuiltMainloop>;

  using Kernel =
      cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideC = typename Kernel::InternalStrideC;
  using StrideD = typename Kernel::InternalStrideD;

  // Per-adapter argument arrays, carved from the front of the workspace (a2, b2: TwoPhase only).
  struct Arrays {
    Shape3* shapes;
    const Element** a;
    const Element** b;
    const ElementD** c;
    ElementD** d;
    StrideA* sa;
    StrideB* sb;
    StrideC* sc;
    StrideD* sd;
    const Element** a2;
    const Element** b2;
    StrideA* sa2;
    StrideB* sb2;
  };

  static size_t arrays_bytes(int G) {
    const size_t second = TwoPhase ? 2 * align_up(G * sizeof(void*)) + align_up(G * sizeof(StrideA)) +
                                         align_up(G * sizeof(StrideB))
                                   : 0;
    return align_up(G * sizeof(Shape3)) + 4 * align_up(G * sizeof(void*)) +
           align_up(G * sizeof(StrideA)) + align_up(G * sizeof(StrideB)) +
           align_up(G * sizeof(StrideC)) + align_up(G * sizeof(StrideD)) + second;
  }

  static Arrays carve(void* workspace, int G) {
    char* p = static_cast<char*>(workspace);
    auto take = [&](size_t bytes) { void* q = p; p += align_up(bytes); return q; };
    Arrays arr;
    arr.shapes = static_cast<Shape3*>(take(G * sizeof(Shape3)));
    arr.a = static_cast<const Element**>(take(G * sizeof(void*)));
    arr.b = static_cast<const Element**>(take(G * sizeof(void*)));
    arr.c = static_cast<const ElementD**>(take(G * sizeof(void*)));
    arr.d = static_cast<ElementD**>(take(G * sizeof(void*)));
    arr.sa = static_cast<StrideA*>(take(G * sizeof(StrideA)));
    arr.sb = static_cast<StrideB*>(take(G * sizeof(StrideB)));
    arr.sc = static_cast<StrideC*>(take(G * sizeof(StrideC)));
    arr.sd = static_cast<StrideD*>(take(G * sizeof(StrideD)));
    if constexpr (TwoPhase) {
      arr.a2 = static_cast<const Element**>(take(G * sizeof(void*)));
      arr.b2 = static_cast<const Element**>(take(G * sizeof(void*)));
      arr.sa2 = static_cast<StrideA*>(take(G * sizeof(StrideA)));
      arr.sb2 = static_cast<StrideB*>(take(G * sizeof(StrideB)));
    }
    return arr;
  }

  static typename CollectiveMainloop::Arguments mainloop_arguments(const Arrays& arr, int k_first) {
    if constexpr (TwoPhase)
      return {arr.a, arr.sa, arr.b, arr.sb, arr.a2, arr.sa2, arr.b2, arr.sb2, k_first};
    else
      return {arr.a, arr.sa, arr.b, arr.sb};
  }

  // k_first: the first pair's K (TwoPhase), else unused.
  static typename Gemm::Arguments arguments(const Arrays& arr, int G, const float* alpha, float beta,
                                            int device, int sm_count, int k_first = 0) {
    cutlass::KernelHardwareInfo hw;
    hw.device_id = device;
    hw.sm_count = sm_count;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        // No host copy of the shapes: the persistent grid reads them on the device.
        {G, arr.shapes, nullptr},
        mainloop_arguments(arr, k_first),
        {{}, arr.c, arr.sc, arr.d, arr.sd},
        hw};
    using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
    args.scheduler.raster_order = Config::kAlongN ? Raster::AlongN : Raster::AlongM;
    auto& fusion = args.epilogue.thread;
    fusion.alpha = 1.0f;
    fusion.beta = beta;
    if (alpha != nullptr) {  // alpha of group g = alpha[g]
      fusion.alpha_ptr = alpha;
      fusion.dAlpha = {_0{}, _0{}, 1};
    }
    return args;
  }

  static size_t workspace_bytes(int G, int sm_count) {
    Arrays none{};
    return arrays_bytes(G) + Gemm::get_workspace_size(arguments(none, G, nullptr, 0.f, 0, sm_count, 0));
  }

  // The kernel's shared memory is above the 48 KiB default: allowed once per device. (CUTLASS's
  // Gemm::initialize sets it at every launch: a driver call per GEMM, ~130 a step at 4 layers,
  // in a step whose time is its host's when it has few tokens.)
  static bool allow_shared_memory(int device) {
    static std::atomic<uint64_t> allowed{0};  // bit d: done on device d
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (bit != 0 && (allowed.load(std::memory_order_relaxed) & bit) != 0) return true;
    constexpr int smem = Kernel::SharedStorageSize;
    if (smem >= (48 << 10) &&
        cudaFuncSetAttribute(cutlass::device_kernel<Kernel>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             smem) != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the op reports its own error
      return false;
    }
    allowed.fetch_or(bit, std::memory_order_relaxed);
    return true;
  }

  // Gemm::initialize's steps but the attribute (allow_shared_memory), then the launch.
  static Status run(const Arrays& arr, int G, const float* alpha, float beta, const Launch& launch,
                    int k_first = 0) {
    auto args = arguments(arr, G, alpha, beta, launch.device, launch.sm_count, k_first);
    if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return "CUTLASS cannot run this problem";
    char* cutlass_ws = static_cast<char*>(launch.workspace) + arrays_bytes(G);
    if (Kernel::initialize_workspace(args, cutlass_ws, launch.stream) != cutlass::Status::kSuccess)
      return "CUTLASS grouped GEMM workspace initialization failed";
    if (!allow_shared_memory(launch.device)) return "CUTLASS grouped GEMM shared memory attribute failed";
    auto params = Kernel::to_underlying_arguments(args, cutlass_ws);
    if (Gemm::run(params, launch.stream) != cutlass::Status::kSuccess) return "CUTLASS grouped GEMM launch failed";
    return nullptr;
  }
};

// One adapter's validated ranges: token rows [t0, t0+n), weight rows [r0, r0+r); g: its index.
struct GroupRange {
  int64_t t0, n, r0, r;
  int g;
};

// Validates adapter g's indices; an invalid adapter gets an empty range (nothing read or written).
__device__ inline GroupRange group_range(const Segments& seg, int g, int64_t max_rank) {
  const int32_t s0 = seg.seg_indptr[g], s1 = seg.seg_indptr[g + 1];
  const int32_t r0 = seg.rank_indptr[g], r1 = seg.rank_indptr[g + 1];
  const int last = seg.num_groups - 1;
  bool ok = true;
  if (g == 0 && s0 != 0) { report_error(seg.error, kErrSegStart, g, s0, 0); ok = false; }
  if (g == 0 && r0 != 0) { report_error(seg.error, kErrRankStart, g, r0, 0); ok = false; }
  if (s1 < s0) { report_error(seg.error, kErrSegOrder, g, s0, s1); ok = false; }
  if (r1 < r0) { report_error(seg.error, kErrRankOrder, g, r0, r1); ok = false; }
  if (g == last && s1 != seg.num_tokens) { report_error(seg.error, kErrSegEnd, g, s1, 0); ok = false; }
  if (g == last && r1 != seg.total_rank) { report_error(seg.error, kErrRankEnd, g, r1, 0); ok = false; }
  if (s0 < 0 || s1 > seg.num_tokens) { report_error(seg.error, kErrSegEnd, g, s0 < 0 ? s0 : s1, 0); ok = false; }
  if (r0 < 0 || r1 > seg.total_rank) { report_error(seg.error, kErrRankEnd, g, r0 < 0 ? r0 : r1, 0); ok = false; }
  if (ok && r1 - r0 > max_rank) { report_error(seg.error, kErrRankWidth, g, r1 - r0, static_cast<int32_t>(max_rank)); ok = false; }
  if (!ok) return {0, 0, 0, 0, g};
  return {s0, s1 - s0, r0, r1 - r0, g};
}

// One adapter's GEMM D[m, n] = A[m, k] . B[k, n] (+ A2[m, k2] . B2[k2, n], a TwoPhase GEMM's): base
// pointers and leading dimensions (the layouts, row- or column-major, are fixed by the GroupedGemm type).
template <class E, class ED = E>
struct GroupProblem {
  int64_t m, n, k;
  const E* a;
  int64_t lda;
  const E* b;
  int64_t ldb;
  ED* d;
  int64_t ldd;
  const E* a2 = nullptr;
  int64_t lda2 = 0;
  const E* b2 = nullptr;
  int64_t ldb2 = 0;
  int64_t k2 = 0;
};

// The stride of a ptr-array operand has one dynamic mode (the leading dimension) beside a unit
// mode and the group mode: set the dynamic one.
template <class Stride>
__device__ inline Stride leading_stride(int64_t ld) {
  Stride s{};
  if constexpr (cute::is_static<decltype(get<0>(s))>::value) {
    get<1>(s) = ld;
  } else {
    get<0>(s) = ld;
  }
  return s;
}

// A Form whose problems are stripes of the output's columns (kStripeMajor: the fused forms) orders
// them stripe by stripe across adapters; the others adapter by adapter.
template <class Form, class = void> struct StripeMajor : std::false_type {};
template <class Form>
struct StripeMajor<Form, std::void_t<decltype(Form::kStripeMajor)>> : std::bool_constant<Form::kStripeMajor> {};

// Builds every adapter's problem from Form::problem(range, split): form.splits problems per
// adapter (a Form that splits its K or its output's columns), adapter g's split s at index
// g * splits + s, or s * G + g where StripeMajor (the group scheduler hands out the problems' tiles
// in index order: there, one stripe of every adapter before the next stripe). C aliases D
// (in-place accumulation when beta = 1). An empty problem gets no tiles from the group scheduler;
// a Form whose output rows must still read as zero then (kClearsEmptyGroups) has the block clear
// them, so the glue need not zero-fill the whole output first.
template <class GG, class Form>
__global__ void setup_problems(Segments seg, Form form, typename GG::Arrays arr) {
  if constexpr (Form::kClearsEmptyGroups) {
    for (int g = 0; g < seg.num_groups; ++g) {  // rare: an adapter with a rank but no tokens
      const GroupRange rg = group_range(seg, g, form.max_rank);
      if (rg.n == 0 && rg.r > 0) form.clear(rg, threadIdx.x, blockDim.x);
    }
  }
  constexpr bool stripe_major = StripeMajor<Form>::value;
  static_assert(!(stripe_major && Form::kScaled), "a scaled form's alpha is indexed by adapter");
  for (int g = threadIdx.x; g < seg.num_groups * form.splits; g += blockDim.x) {
    const int adapter = stripe_major ? g % seg.num_groups : g / form.splits;
    const int split = stripe_major ? g / seg.num_groups : g % form.splits;
    const auto p = form.problem(group_range(seg, adapter, form.max_rank), split);
    const bool empty = p.m == 0 || p.n == 0 || p.k + p.k2 == 0;
    arr.shapes[g] = empty ? typename GG::Shape3{0, 0, 0}
                          : typename GG::Shape3{int(p.m), int(p.n), int(p.k + p.k2)};
    arr.a[g] = p.a;
    arr.b[g] = p.b;
    arr.c[g] = p.d;
    arr.d[g] = p.d;
    arr.sa[g] = leading_stride<typename GG::StrideA>(p.lda);
    arr.sb[g] = leading_stride<typename GG::StrideB>(p.ldb);
    arr.sc[g] = leading_stride<typename GG::StrideC>(p.ldd);
    arr.sd[g] = leading_stride<typename GG::StrideD>(p.ldd);
    if constexpr (GG::kTwoPhase) {
      arr.a2[g] = p.a2;
      arr.b2[g] = p.b2;
      arr.sa2[g] = leading_stride<typename GG::StrideA>(p.lda2);
      arr.sb2[g] = leading_stride<typename GG::StrideB>(p.ldb2);
    }
  }
}

// The setup kernel, then the grouped GEMM of its problems (alpha: each adapter's scaling, or 1 where
// the Form's products are scaled later: a split K's partial sums, where they are added up).
template <class GG, class Form>
Status launch_form(const Segments& seg, const Form& form, const Launch& launch) {
  if (seg.num_groups == 0) return nullptr;
  const int problems = seg.num_groups * form.splits;
  auto arr = GG::carve(launch.workspace, problems);
  setup_problems<GG, Form><<<1, 256, 0, launch.stream>>>(seg, form, arr);
  if (cudaGetLastError() != cudaSuccess) return "ALTO setup kernel launch failed";
  int k_first = 0;
  if constexpr (GG::kTwoPhase) k_first = static_cast<int>(form.k_first);
  return GG::run(arr, problems, Form::kScaled ? seg.scaling : nullptr, form.beta, launch, k_first);
}

// ---- the forms: shrink (whole, or its K split), expand, weight_grad ----------------------------

// Each form's GEMM type takes its configuration in use (tile_configs.cuh) unless given another
// (bench/tile_configs.cu times every candidate).

// shrink: h_g[n, 0:r] = x_g[n, d] . W_g[r, d]^T   (M=n, N=r, K=d; h row-major with ld out_ld)
template <class Element, class Config = tiles::Candidate<tiles::kShrink>>
using ShrinkGemm = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                               cutlass::layout::RowMajor, Config>;
// The same GEMM with its K split (ShrinkSplitForm): float32 partial products.
template <class Element, class Config = tiles::Candidate<tiles::kShrink>>
using ShrinkPartialGemm = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                                      cutlass::layout::RowMajor, Config, float>;

constexpr int64_t kMinSplitK = 512;  // columns of x per split at least: 8 K tiles, beside a tile's fixed cost
constexpr int64_t kMaxSplits = 16;

// How many K chunks a shrink of `tokens` rows in `groups` adapters, out_ld wide, over d columns
// runs in: as many as its tiles (at most one partial M tile per adapter beside the whole ones, times
// the output's N tiles) fit into the SMs' one wave, so no wave is left part full; 1 where they fill
// half of it already (the partial sums would cost more than the split saves).
template <class Config = tiles::Candidate<tiles::kShrink>>
inline int shrink_splits(int64_t tokens, int groups, int64_t out_ld, int64_t d, int sm_count) {
  using Tile = typename Config::TileShape;
  const int64_t m_tiles = (tokens + size<0>(Tile{}) - 1) / size<0>(Tile{}) + groups;
  const int64_t n_tiles = (out_ld + size<1>(Tile{}) - 1) / size<1>(Tile{});
  const int64_t tiles = m_tiles * n_tiles;
  if (tiles == 0 || 2 * tiles > sm_count) return 1;  // (0: no output columns, or no tokens and no adapters)
  int64_t splits = sm_count / tiles;
  splits = splits < kMaxSplits ? splits : kMaxSplits;
  splits = splits < d / kMinSplitK ? splits : d / kMinSplitK;
  return splits < 2 ? 1 : static_cast<int>(splits);
}

// The columns of x in each chunk of a split shrink: a whole number of K tiles.
template <class Config = tiles::Candidate<tiles::kShrink>>
inline int64_t shrink_k_chunk(int64_t d, int splits) {
  constexpr int64_t kTile = size<2>(typename Config::TileShape{});
  return ((d + splits - 1) / splits + kTile - 1) / kTile * kTile;
}

template <class E>
struct ShrinkForm {
  static constexpr bool kClearsEmptyGroups = false;
  static constexpr bool kScaled = true;
  const E* x;
  const E* w;
  E* out;
  int64_t d, out_ld, max_rank;
  float beta = 0.f;
  int splits = 1;
  __device__ GroupProblem<E> problem(GroupRange rg, int) const {
    return {rg.n, rg.r, d, x + rg.t0 * d, d, w + rg.r0 * d, d, out + rg.t0 * out_ld, out_ld};
  }
};

// The shrink with its K (d) split in `splits` chunks of k_chunk columns (the last shorter, none
// empty): split s of adapter g writes its float32 partial product into block s of `partial`
// ([splits, T, out_ld]); reduce_splits adds the blocks up. Why: the shrink's output is only r_g
// wide (one N tile), so a step of few tokens has a few M tiles to spread over the SMs (one
// adapter of 512 tokens: 4 CTAs of 132, each reading a whole row block of x); its K split,
// the SMs each read a part of x.
template <class E>
struct ShrinkSplitForm {
  static constexpr bool kClearsEmptyGroups = false;
  static constexpr bool kScaled = false;  // reduce_splits scales the sums
  const E* x;
  const E* w;
  float* partial;
  int64_t d, out_ld, max_rank, tokens, k_chunk;
  float beta = 0.f;
  int splits;
  __device__ GroupProblem<E, float> problem(GroupRange rg, int s) const {
    const int64_t k0 = s * k_chunk, k = d - k0 < k_chunk ? d - k0 : k_chunk;
    return {rg.n, rg.r, k, x + rg.t0 * d + k0, d, w + rg.r0 * d + k0, d,
            partial + (s * tokens + rg.t0) * out_ld, out_ld};
  }
};

// out[t, c] = s_g * sum over the splits of partial[s, t, c] for c < r_g of t's adapter g, and 0 in
// the other columns (the whole row is written: the glue need not zero it). Rows of an adapter
// that group_range finds invalid (an error recorded) are zero. One block per row.
template <class E>
__global__ void reduce_splits(Segments seg, const float* partial, E* out, int64_t out_ld, int splits) {
  const int64_t t = blockIdx.x;
  int lo = 0, hi = seg.num_groups - 1;  // the last adapter whose first token is <= t
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (seg.seg_indptr[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const GroupRange rg = group_range(seg, lo, out_ld);
  const bool mine = t >= rg.t0 && t < rg.t0 + rg.n;
  const float scale = seg.scaling != nullptr ? seg.scaling[lo] : 1.f;
  for (int64_t c = threadIdx.x; c < out_ld; c += blockDim.x) {
    float sum = 0.f;
    if (mine && c < rg.r) {
      for (int s = 0; s < splits; ++s) sum += partial[(s * seg.num_tokens + t) * out_ld + c];
      sum *= scale;
    }
    out[t * out_ld + c] = E(sum);
  }
}

// expand: y_g[n, d] (+)= h_g[n, 0:r] . W_g[r, d]   (M=n, N=d, K=r; C = D = y; beta 0 = y not read)
template <class Element, class Config = tiles::Candidate<tiles::kExpand>>
using ExpandGemm = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::RowMajor,
                               cutlass::layout::RowMajor, Config>;

template <class E>
struct ExpandForm {
  static constexpr bool kClearsEmptyGroups = false;
  static constexpr bool kScaled = true;
  const E* h;
  const E* w;
  E* y;
  int64_t h_ld, d, max_rank;
  float beta = 1.f;
  int splits = 1;
  __device__ GroupProblem<E> problem(GroupRange rg, int) const {
    return {rg.n, d, rg.r, h + rg.t0 * h_ld, h_ld, w + rg.r0 * d, d, y + rg.t0 * d, d};
  }
};

// weight_grad, computed transposed so the long feature dim is M:
// out_g^T[d, r] = x_g^T[d, n] . h_g[n, 0:r]   (M=d, N=r, K=n; x_g^T and out_g^T column-major, ld d)
// The output may be float32: the gradient of float32 master weights, with no cast pass after.
template <class Element, class ElementOut, class Config = tiles::Candidate<tiles::kWeightGrad>>
using WeightGradGemm = GroupedGemm<Element, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor,
                                   cutlass::layout::ColumnMajor, Config, ElementOut>;

template <class E, class EO>
struct WeightGradForm {
  static constexpr bool kClearsEmptyGroups = true;  // no tokens: a zero gradient
  static constexpr bool kScaled = true;
  const E* h;
  const E* x;
  EO* out;
  int64_t h_ld, d, max_rank;
  float beta = 0.f;
  int splits = 1;
  __device__ GroupProblem<E, EO> problem(GroupRange rg, int) const {
    return {d, rg.r, rg.n, x + rg.t0 * d, d, h + rg.t0 * h_ld, h_ld, out + rg.r0 * d, d};
  }
  __device__ void clear(GroupRange rg, int lane, int lanes) const {
    for (int64_t i = lane; i < rg.r * d; i += lanes) out[rg.r0 * d + i] = EO(0);
  }
};

// fused: the base's GEMM with each adapter's LoRA term appended to its K (TwoPhase), over the rows of
// the adapters' segments (every row of a valid input: the last segment ends at T):
//   forward  y_g[n, d_out] = x_g[n, d_in] . W[d_out, d_in]ᵀ + h_g[n, 0:r] . Bt_g[d_out, 0:r]ᵀ
//            (Bt_g = (s_g B_g)ᵀ: the adapter's scaled B transposed, so that its K runs along memory
//            as W's does and both operands of the B side share one shared-memory layout; all
//            adapters' in one [d_out, bt_width(G, R)] buffer, adapter g's columns from bt_column(g, r0))
//   backward dX_g[n, d_in] = dY_g[n, d_out] . W[d_out, d_in] + dh_g[n, 0:r] . A[r0:r0+r, d_in]
// The first phase's K (d_in; d_out) must be a whole number of K tiles and h's width a multiple of 8
// (TMA reads 16-byte aligned rows); ranks may be any.

// Adapter g's first column in the transposed B buffer: 16-byte aligned whatever the ranks before it.
__host__ __device__ inline int64_t bt_column(int g, int64_t r0) { return (r0 + 7) / 8 * 8 + 8 * g; }
inline int64_t bt_width(int groups, int64_t total_rank) { return bt_column(groups, total_rank); }

// bt[n, bt_column(g, r0) + k] = s_g * b[r0 + k, n] for every adapter g's rows (b [R, n_cols], any
// dtype E), through shared memory so that both sides are read and written along memory. A block moves
// 32 rank rows by kTransposeColumns columns in one go: a thread has 16 independent loads in flight, then
// 16 stores, and finds its rank row's adapter (a binary search of the rank offsets: dependent loads),
// column and scale once. (A 32 x 32 tile a block ran at ~17% of the copy rate, a loop over four of them
// at ~22%: each thread's few loads in flight could not cover the memory's latency; bench/RESULTS.md,
// 2026-12-07.) Rows of an invalid adapter (group_range) are not written.
inline constexpr int64_t kTransposeColumns = 128;
template <class E>
__global__ void transpose_scaled(Segments seg, const E* b, E* bt, int64_t n_cols, int64_t bt_ld) {
  __shared__ float tile[32][kTransposeColumns + 1];  // (+1: a column's 32 ranks read from 32 banks)
  const int64_t r_base = int64_t(blockIdx.y) * 32, n_base = int64_t(blockIdx.x) * kTransposeColumns;
  const int64_t r = r_base + threadIdx.x;  // the rank row this thread writes
  int64_t column = -1;  // its column in bt (-1: not written)
  float scale = 1.f;
  if (r < seg.total_rank) {
    int lo = 0, hi = seg.num_groups - 1;  // the last adapter whose first rank row is <= r
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (seg.rank_indptr[mid] <= r) lo = mid; else hi = mid - 1;
    }
    const int32_t r0 = seg.rank_indptr[lo];
    if (r0 <= r && r < seg.rank_indptr[lo + 1] && r0 >= 0) {  // (else group_range reports the bad index)
      column = bt_column(lo, r0) + (r - r0);
      if (seg.scaling != nullptr) scale = seg.scaling[lo];
    }
  }
  // (constant trip counts, unrolled: the loads are issued before any of them is waited for; blockDim (32, 8))
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // read rows r_base + i, columns along threadIdx.x
    const int i = threadIdx.y + 8 * k;
    const int64_t row = r_base + i;
#pragma unroll
    for (int m = 0; m < kTransposeColumns / 32; ++m) {
      const int j = threadIdx.x + 32 * m;
      const int64_t n = n_base + j;
      tile[i][j] = row < seg.total_rank && n < n_cols ? float(b[row * n_cols + n]) : 0.f;
    }
  }
  __syncthreads();
  if (column < 0) return;
#pragma unroll
  for (int k = 0; k < kTransposeColumns / 8; ++k) {  // write column n_base + j, ranks along threadIdx.x
    const int j = threadIdx.y + 8 * k;
    const int64_t n = n_base + j;
    if (n < n_cols) bt[n * bt_ld + column] = E(scale * tile[threadIdx.x][j]);
  }
}

template <class E>
void launch_transpose_scaled(const Segments& seg, const E* b, E* bt, int64_t n_cols, int64_t bt_ld,
                             cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n_cols + kTransposeColumns - 1) / kTransposeColumns),
                  static_cast<unsigned>((seg.total_rank + 31) / 32));
  transpose_scaled<E><<<grid, dim3(32, 8), 0, stream>>>(seg, b, bt, n_cols, bt_ld);
}
template <class Element, class Config>
using FusedForwardGemm = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor,
                                     cutlass::layout::RowMajor, Config, Element, true>;
template <class Element, class Config>
using FusedBackwardGemm = GroupedGemm<Element, cutlass::layout::RowMajor, cutlass::layout::RowMajor,
                                      cutlass::layout::RowMajor, Config, Element, true>;

// The fused GEMMs' problems are each adapter's rows times one stripe of the output's columns, ordered
// stripe by stripe across adapters (StripeMajor). Why: the group scheduler hands out one problem's
// tiles after another's, so with whole-width problems a wave of tiles (132 on an H100) held one or two
// adapters' rows against thousands of W's columns, and every adapter streamed all of W again (117 MiB
// at Llama-3-8B's MLP widths, past an H100's 50 MiB of L2): our GEMMs of the base ran up to 1.25x
// cuBLAS's (bench/RESULTS.md, 2026-12-07). A stripe of 8 wide tiles makes a wave ~16 M tiles by 8 N
// tiles, the fewest rows and columns (bytes per K column) 132 tiles of 128 x 256 can read, and the
// next wave finds the stripe's W in L2. (The narrow tiles, 128 x 128, run where there is less than a
// wave of wide ones: 16 to a stripe.) CUTLASS's own swizzle does not serve: its group scheduler
// sizes it from a grid of (SMs, 1) and so leaves it at 1.
constexpr int64_t kStripeColumns = 2048;
inline int stripe_count(int64_t n) {
  return n > 0 ? static_cast<int>((n + kStripeColumns - 1) / kStripeColumns) : 1;
}

template <class E>
struct FusedForwardForm {
  static constexpr bool kClearsEmptyGroups = false;
  static constexpr bool kScaled = false;  // s is in Bt
  static constexpr bool kStripeMajor = true;
  const E* x;
  const E* w;
  const E* h;
  const E* bt;
  E* y;
  int64_t d_in, d_out, h_ld, bt_ld, max_rank;
  float beta = 0.f;
  int splits = stripe_count(d_out);
  int64_t k_first = d_in;
  __device__ GroupProblem<E> problem(GroupRange rg, int s) const {
    const int64_t n0 = s * kStripeColumns, n = d_out - n0 < kStripeColumns ? d_out - n0 : kStripeColumns;
    return {rg.n, n, d_in, x + rg.t0 * d_in, d_in, w + n0 * d_in, d_in, y + rg.t0 * d_out + n0, d_out,
            h + rg.t0 * h_ld, h_ld, bt + n0 * bt_ld + bt_column(rg.g, rg.r0), bt_ld, rg.r};
  }
};

template <class E>
struct FusedBackwardForm {
  static constexpr bool kClearsEmptyGroups = false;
  static constexpr bool kScaled = false;  // s is in dh
  static constexpr bool kStripeMajor = true;
  const E* dy;
  const E* w;
  const E* dh;
  const E* a;
  E* dx;
  int64_t d_in, d_out, h_ld, max_rank;
  float beta = 0.f;
  int splits = stripe_count(d_in);
  int64_t k_first = d_out;
  __device__ GroupProblem<E> problem(GroupRange rg, int s) const {
    const int64_t n0 = s * kStripeColumns, n = d_in - n0 < kStripeColumns ? d_in - n0 : kStripeColumns;
    return {rg.n, n, d_out, dy + rg.t0 * d_out, d_out, w + n0, d_in, dx + rg.t0 * d_in + n0, d_in,
            dh + rg.t0 * h_ld, h_ld, a + rg.r0 * d_in + n0, d_in, rg.r};
  }
};

}  // namespace alto::cuda::detail

// ---- entry points (lora_kernels.h), instantiated per dtype in the .cu files --------------------

namespace alto::cuda {

template <DType D>
size_t shrink_workspace_bytes(int num_groups, int sm_count, int splits, int64_t tokens, int64_t out_ld) {
  using E = typename detail::CutlassElement<D>::type;
  if (splits == 1) return detail::ShrinkGemm<E>::workspace_bytes(num_groups, sm_count);
  return detail::align_up(detail::ShrinkPartialGemm<E>::workspace_bytes(num_groups * splits, sm_count)) +
         static_cast<size_t>(splits) * tokens * out_ld * sizeof(float);
}
template <DType D>
Status shrink(const Segments& seg, const void* x, const void* W, void* out, int64_t d,
              int64_t out_ld, int splits, const Launch& launch) {
  using E = typename detail::CutlassElement<D>::type;
  if (splits == 1) {
    detail::ShrinkForm<E> form{static_cast<const E*>(x), static_cast<const E*>(W),
                                static_cast<E*>(out), d, out_ld, /*max_rank=*/out_ld};
    return detail::launch_form<detail::ShrinkGemm<E>>(seg, form, launch);
  }
  if (seg.num_groups == 0 || seg.num_tokens == 0) return nullptr;  // (the reduction reads adapter 0)
  using GG = detail::ShrinkPartialGemm<E>;
  const int64_t k_chunk = detail::shrink_k_chunk(d, splits);
  const int chunks = static_cast<int>((d + k_chunk - 1) / k_chunk);  // <= splits, none empty
  float* partial = reinterpret_cast<float*>(
      static_cast<char*>(launch.workspace) +
      detail::align_up(GG::workspace_bytes(seg.num_groups * chunks, launch.sm_count)));
  detail::ShrinkSplitForm<E> form{static_cast<const E*>(x), static_cast<const E*>(W), partial, d, out_ld,
                                   /*max_rank=*/out_ld, seg.num_tokens, k_chunk, 0.f, chunks};
  if (const Status status = detail::launch_form<GG>(seg, form, launch)) return status;
  detail::reduce_splits<E><<<static_cast<unsigned>(seg.num_tokens), 128, 0, launch.stream>>>(
      seg, partial, static_cast<E*>(out), out_ld, chunks);
  return cudaGetLastError() == cudaSuccess ? nullptr : "ALTO split-K reduction launch failed";
}

template <DType D> size_t expand_workspace_bytes(int num_groups, int sm_count) {
  return detail::ExpandGemm<typename detail::CutlassElement<D>::type>::workspace_bytes(num_groups, sm_count);
}
template <DType D>
Status expand(const Segments& seg, const void* h, int64_t h_ld, const void* W, void* y, int64_t d,
              bool accumulate, const Launch& launch) {
  using GG = detail::ExpandGemm<typename detail::CutlassElement<D>::type>;
  using E = typename GG::Gemm::ElementA;
  detail::ExpandForm<E> form{static_cast<const E*>(h), static_cast<const E*>(W),
                              static_cast<E*>(y), h_ld, d, /*max_rank=*/h_ld,
                              /*beta=*/accumulate ? 1.f : 0.f};
  return detail::launch_form<GG>(seg, form, launch);
}

template <DType D, DType Out> size_t weight_grad_workspace_bytes(int num_groups, int sm_count) {
  return detail::WeightGradGemm<typename detail::CutlassElement<D>::type,
                                typename detail::CutlassElement<Out>::type>::workspace_bytes(num_groups, sm_count);
}
template <DType D, DType Out>
Status weight_grad(const Segments& seg, const void* h, int64_t h_ld, const void* x, void* out,
                   int64_t d, const Launch& launch) {
  using E = typename detail::CutlassElement<D>::type;
  using EO = typename detail::CutlassElement<Out>::type;
  using GG = detail::WeightGradGemm<E, EO>;
  detail::WeightGradForm<E, EO> form{static_cast<const E*>(h), static_cast<const E*>(x),
                                      static_cast<EO*>(out), h_ld, d, /*max_rank=*/h_ld};
  return detail::launch_form<GG>(seg, form, launch);
}

namespace detail {
template <bool Wide> using FusedConfig = tiles::Candidate<Wide ? tiles::kFusedWide : tiles::kFusedNarrow>;
static_assert(kStripeColumns % cute::size<1>(FusedConfig<true>::TileShape{}) == 0 &&
                  kStripeColumns % cute::size<1>(FusedConfig<false>::TileShape{}) == 0,
              "a stripe is whole N tiles");
}

template <DType D, bool Wide> size_t fused_forward_workspace_bytes(int num_groups, int sm_count, int64_t d_out) {
  using E = typename detail::CutlassElement<D>::type;
  const int problems = num_groups * detail::stripe_count(d_out);
  return detail::FusedForwardGemm<E, detail::FusedConfig<Wide>>::workspace_bytes(problems, sm_count);
}
template <DType D, bool Wide>
Status fused_forward(const Segments& seg, const void* x, const void* W, const void* h, int64_t h_ld,
                     const void* b, void* bt, void* y, int64_t d_in, int64_t d_out, const Launch& launch) {
  using E = typename detail::CutlassElement<D>::type;
  if (seg.num_groups == 0) return nullptr;
  const int64_t bt_ld = detail::bt_width(seg.num_groups, seg.total_rank);
  if (seg.total_rank > 0) {
    detail::launch_transpose_scaled(seg, static_cast<const E*>(b), static_cast<E*>(bt), d_out, bt_ld, launch.stream);
    if (cudaGetLastError() != cudaSuccess) return "ALTO transpose kernel launch failed";
  }
  detail::FusedForwardForm<E> form{static_cast<const E*>(x), static_cast<const E*>(W), static_cast<const E*>(h),
                                    static_cast<const E*>(bt), static_cast<E*>(y), d_in, d_out, h_ld, bt_ld,
                                    /*max_rank=*/h_ld};
  return detail::launch_form<detail::FusedForwardGemm<E, detail::FusedConfig<Wide>>>(seg, form, launch);
}

template <DType D, bool Wide> size_t fused_backward_workspace_bytes(int num_groups, int sm_count, int64_t d_in) {
  using E = typename detail::CutlassElement<D>::type;
  const int problems = num_groups * detail::stripe_count(d_in);
  return detail::FusedBackwardGemm<E, detail::FusedConfig<Wide>>::workspace_bytes(problems, sm_count);
}
template <DType D, bool Wide>
Status fused_backward(const Segments& seg, const void* dy, const void* W, const void* dh, int64_t h_ld,
                      const void* a, void* dx, int64_t d_in, int64_t d_out, const Launch& launch) {
  using E = typename detail::CutlassElement<D>::type;
  detail::FusedBackwardForm<E> form{static_cast<const E*>(dy), static_cast<const E*>(W), static_cast<const E*>(dh),
                                     static_cast<const E*>(a), static_cast<E*>(dx), d_in, d_out, h_ld,
                                     /*max_rank=*/h_ld};
  return detail::launch_form<detail::FusedBackwardGemm<E, detail::FusedConfig<Wide>>>(seg, form, launch);
}

}  // namespace alto::cuda

// Instantiates one op's two entry points for one dtype (one line per .cu file) where its workspace
// function takes (num_groups, sm_count); TYPES is the template argument list in parentheses, e.g.
// (kBF16) or (kBF16, kF32). (The shrink's and the fused GEMMs' take more: their files spell theirs out.)
#define ALTO_UNPAREN(...) __VA_ARGS__
#define ALTO_INSTANTIATE(OP, TYPES, ...)                                                         \
  template size_t alto::cuda::OP##_workspace_bytes<ALTO_UNPAREN TYPES>(int, int);                \
  template alto::cuda::Status alto::cuda::OP<ALTO_UNPAREN TYPES>(__VA_ARGS__);
