// lora_expand_ for bf16 (see grouped_gemm.cuh): one kernel configuration per file.
#include "grouped_gemm.cuh"
ALTO_INSTANTIATE(expand, (alto::cuda::DType::kBF16), const alto::cuda::Segments&, const void*, int64_t,
                 const void*, void*, int64_t, bool, const alto::cuda::Launch&)
