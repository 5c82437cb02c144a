// lora_shrink for f16 (see grouped_gemm.cuh): its grouped GEMM, and the same with a split K
// (float32 partial products: ShrinkPartialGemm) for steps of few tokens.
#include "grouped_gemm.cuh"
template size_t alto::cuda::shrink_workspace_bytes<alto::cuda::DType::kF16>(int, int, int, int64_t, int64_t);
template alto::cuda::Status alto::cuda::shrink<alto::cuda::DType::kF16>(const alto::cuda::Segments&, const void*,
                                                                       const void*, void*, int64_t, int64_t, int,
                                                                       const alto::cuda::Launch&);
