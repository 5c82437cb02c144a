// alto::packed_adamw_ on the CPU: the same update as the CUDA kernel (csrc/adamw_math.h), row by
// row, rows split between threads (each element's update is independent: the result does not
// depend on the thread count). Index values are checked here and raise ValueError. Also
// alto::row_sq_norms, the clip's input (each row summed in order by one thread).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../adamw_math.h"
#include "../lora_args.h"

namespace alto::ref {
namespace {

template <class T>
void packed_adamw_cpu(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const int32_t* row_slot,
                      const int32_t* slot_call, const std::vector<AdamwFactors<T>>& factors, double beta1,
                      double beta2, double eps) {
  int64_t row_offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t rows = params[i].size(0), width = params[i].size(1);
    const std::optional<at::Tensor> g = grads[i];
    if (g.has_value() && g->defined() && params[i].numel() > 0) {
      T* w = params[i].data_ptr<T>();
      const T* gp = g->data_ptr<T>();
      T* m = exp_avgs[i].data_ptr<T>();
      T* v = exp_avg_sqs[i].data_ptr<T>();
      const int32_t* slots = row_slot + row_offset;
      const AdamwConstants<T> constants(beta1, beta2, eps);
      at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / width), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int32_t s = slots[r];
          const int32_t k = s < 0 ? -1 : slot_call[s];
          if (k < 0 || factors[k].grad_scale == T(0)) continue;
          for (int64_t e = r * width; e < (r + 1) * width; ++e) {
            adamw_update<T>(w[e], gp[e], m[e], v[e], factors[k], constants);
          }
        }
      });
    }
    row_offset += rows;
  }
}

void packed_adamw_(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, const at::Tensor& row_slot_in, const at::Tensor& slot_call_in,
                   const at::Tensor& hyper_in, const at::Tensor& norms_in, const at::Tensor& counts, double beta1,
                   double beta2, double eps) {
  const char* op = "alto::packed_adamw_";
  const AdamwDims dims = check_packed_adamw_args(params, grads, exp_avgs, exp_avg_sqs, row_slot_in, slot_call_in,
                                                 hyper_in, norms_in, counts);
  const at::Tensor row_slot = row_slot_in.contiguous(), slot_call = slot_call_in.contiguous();
  const int32_t* rs = row_slot.data_ptr<int32_t>();
  const int32_t* sc = slot_call.data_ptr<int32_t>();
  for (int64_t r = 0; r < dims.rows; ++r) {
    TORCH_CHECK_VALUE(rs[r] >= -1 && rs[r] < dims.slots, op, ": row_slot[", r, "]=", rs[r], " is not -1 or a slot < ",
                      dims.slots);
  }
  std::vector<bool> used(dims.calls, false);
  for (int64_t s = 0; s < dims.slots; ++s) {
    TORCH_CHECK_VALUE(sc[s] >= -1 && sc[s] < dims.calls, op, ": slot_call[", s, "]=", sc[s],
                      " is not -1 or an entry < ", dims.calls);
    TORCH_CHECK_VALUE(sc[s] < 0 || !used[sc[s]], op, ": slot_call[", s, "]=", sc[s], " is another slot's entry too");
    if (sc[s] >= 0) used[sc[s]] = true;
  }
  AT_DISPATCH_FLOATING_TYPES(hyper_in.scalar_type(), "packed_adamw_", [&] {
    const at::Tensor hyper = hyper_in.contiguous(), norms = norms_in.contiguous();
    const scalar_t* h = hyper.data_ptr<scalar_t>();
    const scalar_t* nm = norms.data_ptr<scalar_t>();
    float* count = counts.data_ptr<float>();
    std::vector<AdamwFactors<scalar_t>> factors(dims.calls, AdamwFactors<scalar_t>{0, 0, 0, 1});
    for (int64_t s = 0; s < dims.slots; ++s) {  // this step's count first (torch's order), then the update
      const int32_t k = sc[s];
      if (k < 0) continue;
      factors[k] = adamw_factors<scalar_t>(nm[k], h[3 * k], h[3 * k + 1], h[3 * k + 2], count[s] + 1.0, beta1, beta2);
      if (factors[k].grad_scale != scalar_t(0)) count[s] += 1.0f;
    }
    packed_adamw_cpu<scalar_t>(params, grads, exp_avgs, exp_avg_sqs, rs, sc, factors, beta1, beta2, eps);
  });
}

at::Tensor row_sq_norms(at::TensorList tensors) {
  const int64_t rows = check_row_sq_norms_args(tensors);
  at::Tensor out = at::empty({rows}, tensors[0].options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "row_sq_norms", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (const at::Tensor& t : tensors) {
      const int64_t width = t.size(1);
      const scalar_t* x = t.data_ptr<scalar_t>();
      at::parallel_for(0, t.size(0), std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)),
                       [&](int64_t begin, int64_t end) {
                         for (int64_t r = begin; r < end; ++r) {
                           scalar_t acc = 0;
                           for (int64_t c = 0; c < width; ++c) acc += x[r * width + c] * x[r * width + c];
                           o[r] = acc;
                         }
                       });
      o += t.size(0);
    }
  });
  return out;
}

}  // namespace
}  // namespace alto::ref

TORCH_LIBRARY_IMPL(alto, CPU, m) {
  m.impl("packed_adamw_", &alto::ref::packed_adamw_);
  m.impl("row_sq_norms", &alto::ref::row_sq_norms);
}
