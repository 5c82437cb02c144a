// The fused base + LoRA GEMMs' layout facts the glue needs (lora_kernels.h), defined once.
#include "grouped_gemm.cuh"

int64_t alto::cuda::fused_bt_width(int num_groups, int64_t total_rank) {
  return detail::bt_width(num_groups, total_rank);
}

int64_t alto::cuda::fused_k_tile() {
  using Forward = tiles::Candidate<tiles::kFusedForward>::TileShape;
  using Backward = tiles::Candidate<tiles::kFusedBackward>::TileShape;
  return std::max<int64_t>(cute::size<2>(Forward{}), cute::size<2>(Backward{}));
}
