// Reference implementations of the segmented LoRA ops, written with ATen so they run on any
// device: registered as the CPU kernels, and the CUDA path's fallback where CUTLASS cannot run
// (non-Hopper GPU, float32/float64, unaligned sizes). They read the index tensors on the host.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace alto::ref {

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& W, const at::Tensor& seg_indptr,
                       const at::Tensor& rank_indptr, int64_t h_width,
                       const std::optional<at::Tensor>& scaling);
void lora_expand_(at::Tensor& y, const at::Tensor& h, const at::Tensor& W,
                  const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                  const std::optional<at::Tensor>& scaling, bool accumulate);
at::Tensor lora_matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& h, const at::Tensor& W,
                       const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                       const std::optional<at::Tensor>& scaling);
at::Tensor lora_weight_grad(const at::Tensor& h, const at::Tensor& x, const at::Tensor& seg_indptr,
                            const at::Tensor& rank_indptr, int64_t total_rank,
                            const std::optional<at::Tensor>& scaling,
                            std::optional<at::ScalarType> out_dtype);

}  // namespace alto::ref
