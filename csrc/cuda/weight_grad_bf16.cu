// lora_weight_grad for bf16 (see grouped_gemm.cuh): one kernel configuration per file.
#include "grouped_gemm.cuh"
ALTO_INSTANTIATE(weight_grad, (alto::cuda::DType::kBF16, alto::cuda::DType::kBF16), const alto::cuda::Segments&,
                 const void*, int64_t, const void*, void*, int64_t, const alto::cuda::Launch&)
