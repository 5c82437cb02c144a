// The fused base + LoRA forward GEMM for bf16, wide tiles (see grouped_gemm.cuh): one kernel configuration per file.
#include "grouped_gemm.cuh"
using alto::cuda::DType, alto::cuda::Launch, alto::cuda::Segments, alto::cuda::Status;
template size_t alto::cuda::fused_forward_workspace_bytes<DType::kBF16, true>(int, int, int64_t);
template Status alto::cuda::fused_forward<DType::kBF16, true>(const Segments&, const void*, const void*, const void*,
                                                          int64_t, const void*, void*, void*, int64_t, int64_t,
                                                          const Launch&);
