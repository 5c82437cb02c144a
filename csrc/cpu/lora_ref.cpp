#include "lora_ref.h"

#include <torch/library.h>

#include <vector>

#include "../lora_args.h"

namespace alto::ref {
namespace {

// Host view of one step's segments: token and rank ranges and the scale of every adapter.
struct HostSegments {
  std::vector<int32_t> seg, rank;
  std::vector<double> scale;  // float32 scales widen exactly
  int64_t groups() const { return static_cast<int64_t>(seg.size()) - 1; }
};

HostSegments read_segments(const char* op, const at::Tensor& seg_indptr,
                           const at::Tensor& rank_indptr, const std::optional<at::Tensor>& scaling,
                           const SegmentDims& dims, int64_t max_rank) {
  at::Tensor seg = seg_indptr.to(at::kCPU).contiguous();
  at::Tensor rank = rank_indptr.to(at::kCPU).contiguous();
  check_indptr_values(op, seg, rank, dims.num_tokens, dims.total_rank, max_rank);
  HostSegments s;
  s.seg.assign(seg.data_ptr<int32_t>(), seg.data_ptr<int32_t>() + seg.numel());
  s.rank.assign(rank.data_ptr<int32_t>(), rank.data_ptr<int32_t>() + rank.numel());
  if (scaling.has_value()) {
    at::Tensor sc = scaling->to(at::kCPU, at::kDouble).contiguous();
    s.scale.assign(sc.data_ptr<double>(), sc.data_ptr<double>() + sc.numel());
  } else {
    s.scale.assign(dims.num_groups, 1.0);
  }
  return s;
}

// Products are accumulated in float32 (float64 for float64 inputs) and rounded once, as the
// CUDA kernels do.
at::ScalarType accum_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& W, const at::Tensor& seg_indptr,
                       const at::Tensor& rank_indptr, int64_t h_width,
                       const std::optional<at::Tensor>& scaling) {
  const SegmentDims dims = check_shrink_args(x, W, seg_indptr, rank_indptr, h_width, scaling);
  const HostSegments s =
      read_segments("alto::lora_shrink", seg_indptr, rank_indptr, scaling, dims, h_width);
  const auto acc = accum_type(x);
  at::Tensor h = at::zeros({dims.num_tokens, h_width}, x.options());
  for (int64_t g = 0; g < s.groups(); ++g) {
    const int64_t t0 = s.seg[g], n = s.seg[g + 1] - t0, r0 = s.rank[g], r = s.rank[g + 1] - r0;
    if (n == 0 || r == 0) continue;
    at::Tensor prod = at::mm(x.narrow(0, t0, n).to(acc), W.narrow(0, r0, r).to(acc).t());
    h.narrow(0, t0, n).narrow(1, 0, r).copy_(prod.mul_(s.scale[g]));
  }
  return h;
}

void lora_expand_(at::Tensor& y, const at::Tensor& h, const at::Tensor& W,
                  const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                  const std::optional<at::Tensor>& scaling, bool accumulate) {
  const SegmentDims dims = check_expand_args(y, h, W, seg_indptr, rank_indptr, scaling);
  const HostSegments s =
      read_segments("alto::lora_expand", seg_indptr, rank_indptr, scaling, dims, h.size(1));
  const auto acc = accum_type(y);
  for (int64_t g = 0; g < s.groups(); ++g) {
    const int64_t t0 = s.seg[g], n = s.seg[g + 1] - t0, r0 = s.rank[g], r = s.rank[g + 1] - r0;
    if (n == 0 || r == 0) continue;
    at::Tensor prod = at::mm(h.narrow(0, t0, n).narrow(1, 0, r).to(acc), W.narrow(0, r0, r).to(acc));
    at::Tensor y_g = y.narrow(0, t0, n);
    prod.mul_(s.scale[g]);
    y_g.copy_(accumulate ? prod.add_(y_g.to(acc)) : prod);
  }
}

at::Tensor lora_matmul(const at::Tensor& a, const at::Tensor& b, const at::Tensor& h, const at::Tensor& W,
                       const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                       const std::optional<at::Tensor>& scaling) {
  check_matmul_args(a, b, h, W, seg_indptr, rank_indptr, scaling);
  at::Tensor out = at::mm(a, b);
  lora_expand_(out, h, W, seg_indptr, rank_indptr, scaling, /*accumulate=*/true);
  return out;
}

at::Tensor lora_weight_grad(const at::Tensor& h, const at::Tensor& x, const at::Tensor& seg_indptr,
                            const at::Tensor& rank_indptr, int64_t total_rank,
                            const std::optional<at::Tensor>& scaling,
                            std::optional<at::ScalarType> out_dtype) {
  const SegmentDims dims = check_weight_grad_args(h, x, seg_indptr, rank_indptr, total_rank, scaling);
  const HostSegments s = read_segments("alto::lora_weight_grad", seg_indptr, rank_indptr, scaling,
                                       dims, h.size(1));
  const auto acc = accum_type(x);
  const auto out_type = out_dtype.value_or(x.scalar_type());
  at::Tensor out = at::zeros({total_rank, x.size(1)}, x.options().dtype(out_type));
  for (int64_t g = 0; g < s.groups(); ++g) {
    const int64_t t0 = s.seg[g], n = s.seg[g + 1] - t0, r0 = s.rank[g], r = s.rank[g + 1] - r0;
    if (n == 0 || r == 0) continue;
    at::Tensor prod = at::mm(h.narrow(0, t0, n).narrow(1, 0, r).to(acc).t(), x.narrow(0, t0, n).to(acc));
    out.narrow(0, r0, r).copy_(prod.mul_(s.scale[g]));
  }
  return out;
}

}  // namespace alto::ref

TORCH_LIBRARY_IMPL(alto, CPU, m) {
  m.impl("lora_shrink", &alto::ref::lora_shrink);
  m.impl("lora_expand_", &alto::ref::lora_expand_);
  m.impl("lora_matmul", &alto::ref::lora_matmul);
  m.impl("lora_weight_grad", &alto::ref::lora_weight_grad);
}
