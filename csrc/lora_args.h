// Host-side argument checks shared by every kernel of the op library (CPU and CUDA).
// They never read tensor data (no device sync): shapes, dtypes, devices only. Value checks of the
// index tensors live in check_indptr_values (host copies) and, on CUDA, in the setup kernels.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace alto {

// Problem sizes common to the three ops.
struct SegmentDims {
  int64_t num_groups;   // G
  int64_t num_tokens;   // T
  int64_t total_rank;   // R
};

// Checks seg_indptr / rank_indptr / scaling against each other and against `ref` (device).
SegmentDims check_segments(const char* op, const at::Tensor& ref, const at::Tensor& seg_indptr,
                           const at::Tensor& rank_indptr, const std::optional<at::Tensor>& scaling,
                           int64_t num_tokens, int64_t total_rank);

// `t` is a 2-D tensor named `name` with the dtype and device of `ref`.
void check_matrix(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref);

// Per-op checks (shapes, dtypes, devices, G); shared by every backend so errors read the same.
SegmentDims check_shrink_args(const at::Tensor& x, const at::Tensor& W, const at::Tensor& seg_indptr,
                              const at::Tensor& rank_indptr, int64_t h_width,
                              const std::optional<at::Tensor>& scaling);
SegmentDims check_expand_args(const at::Tensor& y, const at::Tensor& h, const at::Tensor& W,
                              const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                              const std::optional<at::Tensor>& scaling);
SegmentDims check_matmul_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& h, const at::Tensor& W,
                              const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                              const std::optional<at::Tensor>& scaling);
SegmentDims check_weight_grad_args(const at::Tensor& h, const at::Tensor& x,
                                   const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                                   int64_t total_rank, const std::optional<at::Tensor>& scaling);

// alto::packed_adamw_: equal-length lists of 2-D contiguous packs (float32 or float64, one dtype and
// device), gradients None or shaped as their pack; row_slot int32 [every pack's rows], slot_call
// int32 [S], counts float32 [S], hyper [n, 3] and norms [n] in the packs' dtype. Returns {rows, S, n}.
struct AdamwDims {
  int64_t rows;   // rows of all packs, end to end
  int64_t slots;  // S
  int64_t calls;  // n
};
AdamwDims check_packed_adamw_args(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& row_slot,
                                  const at::Tensor& slot_call, const at::Tensor& hyper, const at::Tensor& norms,
                                  const at::Tensor& counts);

// alto::row_sq_norms: at least one 2-D contiguous float tensor, one dtype and device. Returns the rows of all.
int64_t check_row_sq_norms_args(at::TensorList tensors);

// Validates index values on host copies: indptr[0] == 0, non-decreasing, indptr[G] == total, and
// (when max_rank >= 0) every rank length <= max_rank. Raises ValueError naming the argument.
void check_indptr_values(const char* op, const at::Tensor& seg_host, const at::Tensor& rank_host,
                         int64_t num_tokens, int64_t total_rank, int64_t max_rank);

}  // namespace alto
