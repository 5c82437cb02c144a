// lora_weight_grad, bf16 in, float32 out (see grouped_gemm.cuh): one kernel configuration per file.
#include "grouped_gemm.cuh"
ALTO_INSTANTIATE(weight_grad, (alto::cuda::DType::kBF16, alto::cuda::DType::kF32), const alto::cuda::Segments&,
                 const void*, int64_t, const void*, void*, int64_t, const alto::cuda::Launch&)
