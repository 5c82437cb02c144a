// alto::packed_adamw_ on CUDA: argument checks, the packs' table (copied to the device from pinned
// memory, without waiting), then the two kernels of packed_adamw.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../lora_args.h"
#include "packed_adamw.h"

namespace alto {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void packed_adamw_cuda_(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& row_slot_in,
                        const at::Tensor& slot_call_in, const at::Tensor& hyper_in, const at::Tensor& norms_in,
                        const at::Tensor& counts, double beta1, double beta2, double eps) {
  const AdamwDims dims = check_packed_adamw_args(params, grads, exp_avgs, exp_avg_sqs, row_slot_in, slot_call_in,
                                                 hyper_in, norms_in, counts);
  const c10::cuda::CUDAGuard guard(hyper_in.device());
  const int64_t vec_elems = 16 / static_cast<int64_t>(hyper_in.element_size());
  std::vector<cuda::AdamwPack> packs;
  int64_t row_offset = 0, chunks = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& w = params[i];
    const std::optional<at::Tensor> g = grads[i];
    if (g.has_value() && g->defined() && w.numel() > 0) {
      cuda::AdamwPack p{w.data_ptr(), g->data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                        w.size(1), w.numel(), row_offset, chunks, 0};
      p.vectorized = w.size(1) % vec_elems == 0 && aligned16(p.w) && aligned16(p.g) && aligned16(p.m) &&
                     aligned16(p.v);
      packs.push_back(p);
      chunks += (w.numel() + cuda::kAdamwChunk - 1) / cuda::kAdamwChunk;
    }
    row_offset += w.size(0);
  }
  if (dims.slots == 0) return;
  const auto bytes = static_cast<int64_t>(packs.size() * sizeof(cuda::AdamwPack));
  at::Tensor table;
  if (bytes > 0) {
    at::Tensor staging = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(staging.data_ptr(), packs.data(), bytes);
    table = staging.to(hyper_in.device(), /*non_blocking=*/true);
  }
  const at::Tensor row_slot = row_slot_in.contiguous(), slot_call = slot_call_in.contiguous();
  const at::Tensor hyper = hyper_in.contiguous(), norms = norms_in.contiguous();
  // scratch for each entry's factors (AdamwFactors<T>: 4 values of the weights' dtype)
  const at::Tensor factors = at::empty({std::max<int64_t>(dims.calls, 1), 4}, hyper.options());
  cuda::AdamwArgs args{bytes > 0 ? static_cast<const cuda::AdamwPack*>(table.data_ptr()) : nullptr,
                       static_cast<int64_t>(packs.size()),
                       chunks,
                       row_slot.data_ptr<int32_t>(),
                       slot_call.data_ptr<int32_t>(),
                       dims.slots,
                       dims.calls,
                       hyper.data_ptr(),
                       norms.data_ptr(),
                       counts.data_ptr<float>(),
                       factors.data_ptr(),
                       beta1,
                       beta2,
                       eps};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(hyper.scalar_type(), "packed_adamw_",
                             [&] { C10_CUDA_CHECK(cuda::packed_adamw<scalar_t>(args, stream)); });
}

}  // namespace
}  // namespace alto

TORCH_LIBRARY_IMPL(alto, CUDA, m) {
  m.impl("packed_adamw_", &alto::packed_adamw_cuda_);
}
