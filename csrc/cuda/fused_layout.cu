// The fused base + LoRA GEMMs' layout facts and tile choice the glue needs (lora_kernels.h), defined once.
#include "grouped_gemm.cuh"

int64_t alto::cuda::fused_bt_width(int num_groups, int64_t total_rank) {
  return detail::bt_width(num_groups, total_rank);
}

int64_t alto::cuda::fused_k_tile() {
  using Wide = detail::FusedConfig<true>::TileShape;
  using Narrow = detail::FusedConfig<false>::TileShape;
  return std::max<int64_t>(cute::size<2>(Wide{}), cute::size<2>(Narrow{}));
}

// The wide tiles where they fill every SM at least once (their count with no partial M tile, a lower
// bound: the segments' lengths are on the device), else the narrow ones.
bool alto::cuda::fused_wide(int64_t tokens, int64_t n, int sm_count) {
  using Wide = detail::FusedConfig<true>::TileShape;
  const int64_t m_tile = cute::size<0>(Wide{}), n_tile = cute::size<1>(Wide{});
  return (tokens + m_tile - 1) / m_tile * ((n + n_tile - 1) / n_tile) >= sm_count;
}
