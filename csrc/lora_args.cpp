#include "lora_args.h"

#include <c10/util/Exception.h>

#include <string>

namespace alto {

void check_matrix(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is missing (None)");
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                    t.scalar_type(), " but the other operands are ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but the other operands are on ", ref.device());
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                    " must be a floating-point tensor, got ", t.scalar_type());
}

static void check_index(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
                    " but must be on the operands' device ", ref.device());
  TORCH_CHECK_VALUE(t.numel() >= 1, op, ": ", name, " must have G+1 >= 1 entries");
}

SegmentDims check_segments(const char* op, const at::Tensor& ref, const at::Tensor& seg_indptr,
                           const at::Tensor& rank_indptr, const std::optional<at::Tensor>& scaling,
                           int64_t num_tokens, int64_t total_rank) {
  check_index(op, "seg_indptr", seg_indptr, ref);
  check_index(op, "rank_indptr", rank_indptr, ref);
  const int64_t G = seg_indptr.numel() - 1;
  TORCH_CHECK_VALUE(rank_indptr.numel() == G + 1, op, ": rank_indptr has ", rank_indptr.numel(),
                    " entries but seg_indptr has ", G + 1, " (both must be G+1)");
  if (scaling.has_value()) {
    const at::Tensor& s = *scaling;
    TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() == G, op, ": scaling must have shape [G] = [", G,
                      "], got ", s.sizes());
    // float64 operands (exact-math checks on the CPU) may carry float64 scales.
    const bool ok = s.scalar_type() == at::kFloat ||
                    (s.scalar_type() == at::kDouble && ref.scalar_type() == at::kDouble);
    TORCH_CHECK_VALUE(ok, op, ": scaling must be float32 (or float64 with float64 operands), got ",
                      s.scalar_type(), " with ", ref.scalar_type(), " operands");
    TORCH_CHECK_VALUE(s.device() == ref.device(), op, ": scaling is on ", s.device(),
                      " but must be on ", ref.device());
  }
  return {G, num_tokens, total_rank};
}

static void check_one_indptr(const char* op, const char* name, const at::Tensor& host,
                             int64_t total, const char* total_name) {
  const int32_t* p = host.contiguous().data_ptr<int32_t>();
  const int64_t G = host.numel() - 1;
  TORCH_CHECK_VALUE(p[0] == 0, op, ": ", name, "[0] must be 0, got ", p[0]);
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK_VALUE(p[g] <= p[g + 1], op, ": ", name, " must be non-decreasing, but ", name, "[",
                      g, "]=", p[g], " > ", name, "[", g + 1, "]=", p[g + 1]);
  }
  TORCH_CHECK_VALUE(p[G] == total, op, ": ", name, "[G]=", p[G], " must equal ", total_name, "=",
                    total);
}

void check_indptr_values(const char* op, const at::Tensor& seg_host, const at::Tensor& rank_host,
                         int64_t num_tokens, int64_t total_rank, int64_t max_rank) {
  check_one_indptr(op, "seg_indptr", seg_host, num_tokens, "the number of tokens");
  check_one_indptr(op, "rank_indptr", rank_host, total_rank, "the total rank R");
  if (max_rank < 0) return;
  const int32_t* r = rank_host.contiguous().data_ptr<int32_t>();
  for (int64_t g = 0; g + 1 < rank_host.numel(); ++g) {
    TORCH_CHECK_VALUE(r[g + 1] - r[g] <= max_rank, op, ": adapter ", g, " has rank ",
                      r[g + 1] - r[g], " (from rank_indptr) but h_width is only ", max_rank);
  }
}

}  // namespace alto

namespace alto {

SegmentDims check_shrink_args(const at::Tensor& x, const at::Tensor& W, const at::Tensor& seg_indptr,
                              const at::Tensor& rank_indptr, int64_t h_width,
                              const std::optional<at::Tensor>& scaling) {
  const char* op = "alto::lora_shrink";
  check_matrix(op, "x", x, x);
  check_matrix(op, "W", W, x);
  TORCH_CHECK_VALUE(W.size(1) == x.size(1), op, ": W has ", W.size(1),
                    " columns but x has ", x.size(1), " features (W must be [R, d_in])");
  TORCH_CHECK_VALUE(h_width >= 0, op, ": h_width must be >= 0, got ", h_width);
  return check_segments(op, x, seg_indptr, rank_indptr, scaling, x.size(0), W.size(0));
}

SegmentDims check_expand_args(const at::Tensor& y, const at::Tensor& h, const at::Tensor& W,
                              const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                              const std::optional<at::Tensor>& scaling) {
  const char* op = "alto::lora_expand";
  check_matrix(op, "y", y, y);
  check_matrix(op, "h", h, y);
  check_matrix(op, "W", W, y);
  TORCH_CHECK_VALUE(h.size(0) == y.size(0), op, ": h has ", h.size(0), " rows but y has ",
                    y.size(0), " (one row per token)");
  TORCH_CHECK_VALUE(W.size(1) == y.size(1), op, ": W has ", W.size(1), " columns but y has ",
                    y.size(1), " (W must be [R, d_out])");
  return check_segments(op, y, seg_indptr, rank_indptr, scaling, y.size(0), W.size(0));
}

SegmentDims check_matmul_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& h, const at::Tensor& W,
                              const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                              const std::optional<at::Tensor>& scaling) {
  const char* op = "alto::lora_matmul";
  check_matrix(op, "a", a, a);
  check_matrix(op, "b", b, a);
  check_matrix(op, "h", h, a);
  check_matrix(op, "W", W, a);
  TORCH_CHECK_VALUE(b.size(0) == a.size(1), op, ": b has ", b.size(0), " rows but a has ", a.size(1),
                    " columns (b must be [K, N])");
  TORCH_CHECK_VALUE(h.size(0) == a.size(0), op, ": h has ", h.size(0), " rows but a has ", a.size(0),
                    " (one row per token)");
  TORCH_CHECK_VALUE(W.size(1) == b.size(1), op, ": W has ", W.size(1), " columns but b has ", b.size(1),
                    " (W must be [R, N])");
  return check_segments(op, a, seg_indptr, rank_indptr, scaling, a.size(0), W.size(0));
}

SegmentDims check_weight_grad_args(const at::Tensor& h, const at::Tensor& x,
                                   const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                                   int64_t total_rank, const std::optional<at::Tensor>& scaling) {
  const char* op = "alto::lora_weight_grad";
  check_matrix(op, "x", x, x);
  check_matrix(op, "h", h, x);
  TORCH_CHECK_VALUE(h.size(0) == x.size(0), op, ": h has ", h.size(0), " rows but x has ",
                    x.size(0), " (one row per token)");
  TORCH_CHECK_VALUE(total_rank >= 0, op, ": total_rank must be >= 0, got ", total_rank);
  return check_segments(op, x, seg_indptr, rank_indptr, scaling, x.size(0), total_rank);
}

AdamwDims check_packed_adamw_args(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& row_slot,
                                  const at::Tensor& slot_call, const at::Tensor& hyper, const at::Tensor& norms,
                                  const at::Tensor& counts) {
  const char* op = "alto::packed_adamw_";
  const size_t P = params.size();
  TORCH_CHECK_VALUE(grads.size() == P && exp_avgs.size() == P && exp_avg_sqs.size() == P, op, ": params, grads, ",
                    "exp_avgs and exp_avg_sqs must have one entry per pack, got ", P, ", ", grads.size(), ", ",
                    exp_avgs.size(), ", ", exp_avg_sqs.size());
  TORCH_CHECK_VALUE(hyper.dim() == 2 && hyper.size(1) == 3, op, ": hyper must be [n, 3] (lr, weight_decay, ",
                    "max_norm), got ", hyper.sizes());
  const at::Tensor& ref = hyper;
  TORCH_CHECK_VALUE(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble, op,
                    ": hyper must be float32 or float64 (the weights' dtype), got ", ref.scalar_type());
  const int64_t n = hyper.size(0);
  int64_t rows = 0;
  auto check_pack = [&](const at::Tensor& t, const char* name, size_t i, const at::Tensor& shape) {
    TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type() && t.device() == ref.device(), op, ": ", name, "[", i,
                      "] is ", t.scalar_type(), " on ", t.device(), ", hyper is ", ref.scalar_type(), " on ",
                      ref.device());
    TORCH_CHECK_VALUE(t.dim() == 2 && t.sizes() == shape.sizes() && t.is_contiguous(), op, ": ", name, "[", i,
                      "] must be contiguous and shaped as params[", i, "] ", shape.sizes(), ", got ", t.sizes());
  };
  for (size_t i = 0; i < P; ++i) {
    check_pack(params[i], "params", i, params[i]);
    check_pack(exp_avgs[i], "exp_avgs", i, params[i]);
    check_pack(exp_avg_sqs[i], "exp_avg_sqs", i, params[i]);
    const std::optional<at::Tensor> g = grads[i];
    if (g.has_value() && g->defined()) check_pack(*g, "grads", i, params[i]);
    rows += params[i].size(0);
  }
  auto check_vector = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size) {
    TORCH_CHECK_VALUE(t.dim() == 1 && t.scalar_type() == dtype && t.device() == ref.device() &&
                          (size < 0 || t.numel() == size),
                      op, ": ", name, " must be a 1-D ", dtype, " tensor on ", ref.device(),
                      size < 0 ? "" : " of size ", size < 0 ? std::string() : std::to_string(size), ", got ",
                      t.scalar_type(), " ", t.sizes(), " on ", t.device());
  };
  check_vector(row_slot, "row_slot", at::kInt, rows);
  check_vector(slot_call, "slot_call", at::kInt, -1);
  check_vector(counts, "counts", at::kFloat, slot_call.numel());
  TORCH_CHECK_VALUE(counts.is_contiguous(), op, ": counts must be contiguous (it is updated in place)");
  check_vector(norms, "norms", ref.scalar_type(), n);
  return {rows, slot_call.numel(), n};
}

int64_t check_row_sq_norms_args(at::TensorList tensors) {
  const char* op = "alto::row_sq_norms";
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": needs at least one tensor");
  int64_t rows = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.dim() == 2 && t.is_contiguous() &&
                          (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                      op, ": tensors[", i, "] must be a 2-D contiguous float32 or float64 tensor, got ",
                      t.scalar_type(), " ", t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == tensors[0].scalar_type() && t.device() == tensors[0].device(), op,
                      ": tensors[", i, "] is ", t.scalar_type(), " on ", t.device(), ", tensors[0] is ",
                      tensors[0].scalar_type(), " on ", tensors[0].device());
    rows += t.size(0);
  }
  return rows;
}

}  // namespace alto
