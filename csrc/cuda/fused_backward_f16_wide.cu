// The fused base + LoRA dX GEMM for f16, wide tiles (see grouped_gemm.cuh): one kernel configuration per file.
#include "grouped_gemm.cuh"
ALTO_INSTANTIATE(fused_backward, (alto::cuda::DType::kF16, true), const alto::cuda::Segments&, const void*, const void*,
                 const void*, int64_t, const void*, void*, int64_t, int64_t, const alto::cuda::Launch&)
