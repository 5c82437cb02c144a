// alto::packed_adamw_ and alto::row_sq_norms on CUDA: argument checks, the tensors' table (copied to
// the device from pinned memory, without waiting), then the kernels of packed_adamw.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../lora_args.h"
#include "device_errors.h"
#include "packed_adamw.h"

namespace alto {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// As every ALTO CUDA op (device_errors.h): in sync mode, wait and raise what an op recorded.
void after_launch(cudaStream_t stream) {
  if (sync_checks()) {
    C10_CUDA_CHECK(cudaStreamSynchronize(stream));
    raise_recorded_device_error();
  }
}

// A host table of structs on `device`, copied from pinned memory without waiting (the caching
// host allocator keeps the staging block until the copy is done); undefined when empty.
template <class Entry>
at::Tensor table_on(const std::vector<Entry>& entries, const at::Device& device) {
  const auto bytes = static_cast<int64_t>(entries.size() * sizeof(Entry));
  if (bytes == 0) return {};
  at::Tensor staging = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(staging.data_ptr(), entries.data(), bytes);
  return staging.to(device, /*non_blocking=*/true);
}

void packed_adamw_cuda_(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                        at::TensorList exp_avgs, at::TensorList exp_avg_sqs, const at::Tensor& row_slot_in,
                        const at::Tensor& slot_call_in, const at::Tensor& hyper_in, const at::Tensor& norms_in,
                        const at::Tensor& counts, double beta1, double beta2, double eps) {
  const AdamwDims dims = check_packed_adamw_args(params, grads, exp_avgs, exp_avg_sqs, row_slot_in, slot_call_in,
                                                 hyper_in, norms_in, counts);
  raise_recorded_device_error();  // an earlier op's index error, before this one runs
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
  const at::Tensor table = table_on(packs, hyper_in.device());
  const at::Tensor row_slot = row_slot_in.contiguous(), slot_call = slot_call_in.contiguous();
  const at::Tensor hyper = hyper_in.contiguous(), norms = norms_in.contiguous();
  // scratch for each entry's factors (AdamwFactors<T>: 4 values of the weights' dtype)
  const at::Tensor factors = at::empty({std::max<int64_t>(dims.calls, 1), 4}, hyper.options());
  const at::Tensor claims = at::empty({std::max<int64_t>(dims.calls, 1)}, hyper.options().dtype(at::kInt));
  cuda::AdamwArgs args{table.defined() ? static_cast<const cuda::AdamwPack*>(table.data_ptr()) : nullptr,
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
                       claims.data_ptr<int32_t>(),
                       device_error_record(),
                       beta1,
                       beta2,
                       eps};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(hyper.scalar_type(), "packed_adamw_",
                             [&] { C10_CUDA_CHECK(cuda::packed_adamw<scalar_t>(args, stream)); });
  after_launch(stream);
}

at::Tensor row_sq_norms_cuda(at::TensorList tensors) {
  const int64_t rows = check_row_sq_norms_args(tensors);
  raise_recorded_device_error();
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor out = at::empty({rows}, tensors[0].options());
  const int64_t vec_elems = 16 / static_cast<int64_t>(out.element_size());
  std::vector<cuda::RowTensor> table;
  int64_t row_begin = 0;
  for (const at::Tensor& t : tensors) {
    if (t.size(0) > 0) {  // (an empty one would share its first row with the next)
      table.push_back({t.data_ptr(), t.size(1), row_begin, t.size(1) % vec_elems == 0 && aligned16(t.data_ptr())});
    }
    row_begin += t.size(0);
  }
  if (rows == 0) return out;
  const at::Tensor device_table = table_on(table, out.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "row_sq_norms", [&] {
    C10_CUDA_CHECK(cuda::row_sq_norms<scalar_t>(static_cast<const cuda::RowTensor*>(device_table.data_ptr()),
                                                static_cast<int64_t>(table.size()), rows, out.data_ptr<scalar_t>(),
                                                stream));
  });
  after_launch(stream);
  return out;
}

}  // namespace
}  // namespace alto

TORCH_LIBRARY_IMPL(alto, CUDA, m) {
  m.impl("packed_adamw_", &alto::packed_adamw_cuda_);
  m.impl("row_sq_norms", &alto::row_sq_norms_cuda);
}
