// lora_expand_ for f16 (see grouped_gemm.cuh): one kernel configuration per file.
#include "grouped_gemm.cuh"
ALTO_INSTANTIATE(expand, (alto::cuda::DType::kF16), const alto::cuda::Segments&, const void*, int64_t,
                 const void*, void*, int64_t, bool, const alto::cuda::Launch&)
