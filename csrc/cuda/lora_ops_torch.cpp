// CUDA kernels of the alto ops: argument checks, outputs and workspaces, then the torch-free
// CUTLASS entry points (lora_kernels.h). Cases CUTLASS cannot take (non-Hopper GPU, float32,
// sizes that are not multiples of 8, unaligned views) run the ATen reference (csrc/cpu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../cpu/lora_ref.h"
#include "../lora_args.h"
#include "device_errors.h"
#include "lora_kernels.h"

namespace alto {
namespace {

bool is_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// CUTLASS path: Hopper, bf16/fp16, row-contiguous operands with 16-byte aligned rows.
bool cutlass_ok(std::initializer_list<const at::Tensor*> mats) {
  const at::Tensor& first = **mats.begin();
  const auto dt = first.scalar_type();
  if (dt != at::kBFloat16 && dt != at::kHalf) return false;
  if (at::cuda::getDeviceProperties(first.get_device())->major != 9) return false;
  for (const at::Tensor* t : mats) {
    if (!t->is_contiguous() || t->size(1) % 8 != 0 || !is_aligned(*t)) return false;
  }
  return true;
}

// Calls fn(std::integral_constant<DType, D>) for the tensor's dtype (bf16 or fp16).
template <class Fn>
void with_dtype(const at::Tensor& t, Fn&& fn) {
  using cuda::DType;
  if (t.scalar_type() == at::kBFloat16) {
    fn(std::integral_constant<DType, DType::kBF16>{});
  } else {
    fn(std::integral_constant<DType, DType::kF16>{});
  }
}

// One CUTLASS launch: workspace of `workspace_fn(G, sm_count)` bytes, then
// `launch_fn(segments, launch)`; checks the status and, in sync mode, the index record.
template <class WorkspaceFn, class LaunchFn>
void run_kernel(const at::Tensor& ref, const SegmentDims& dims, const at::Tensor& seg_indptr,
                const at::Tensor& rank_indptr, const std::optional<at::Tensor>& scaling,
                WorkspaceFn&& workspace_fn, LaunchFn&& launch_fn) {
  const int device = ref.get_device();
  const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const int G = static_cast<int>(dims.num_groups);
  const size_t bytes = workspace_fn(G, sms);
  const at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, ref.options().dtype(at::kByte));
  const at::Tensor seg = seg_indptr.contiguous(), rank = rank_indptr.contiguous();
  const std::optional<at::Tensor> scale =
      scaling.has_value() ? std::optional(scaling->contiguous()) : std::nullopt;
  const cuda::Segments segments{seg.data_ptr<int32_t>(),
                                rank.data_ptr<int32_t>(),
                                scale.has_value() ? scale->data_ptr<float>() : nullptr,
                                G,
                                dims.num_tokens,
                                dims.total_rank,
                                device_error_record()};
  const cuda::Launch launch{ws.data_ptr(), bytes, device, sms,
                            at::cuda::getCurrentCUDAStream(device).stream()};
  const cuda::Status status = launch_fn(segments, launch);
  TORCH_CHECK(status == nullptr, "ALTO CUDA kernel: ", status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (sync_checks()) {
    C10_CUDA_CHECK(cudaStreamSynchronize(launch.stream));
    raise_recorded_device_error();
  }
}

at::Tensor lora_shrink_cuda(const at::Tensor& x_in, const at::Tensor& W_in,
                            const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                            int64_t h_width, const std::optional<at::Tensor>& scaling) {
  const SegmentDims dims = check_shrink_args(x_in, W_in, seg_indptr, rank_indptr, h_width, scaling);
  raise_recorded_device_error();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), W = W_in.contiguous();
  if (!cutlass_ok({&x, &W}) || h_width % 8 != 0)
    return ref::lora_shrink(x, W, seg_indptr, rank_indptr, h_width, scaling);
  if (dims.num_groups == 0 || dims.num_tokens == 0 || h_width == 0)
    return at::zeros({dims.num_tokens, h_width}, x.options());
  const int sms = at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;
  const int splits = cuda::shrink_splits(dims.num_tokens, static_cast<int>(dims.num_groups), h_width,
                                         x.size(1), sms);
  // Columns >= r_g are not written by the GEMM: they must read as zero (a split K's sums write
  // every column).
  at::Tensor h = splits > 1 ? at::empty({dims.num_tokens, h_width}, x.options())
                            : at::zeros({dims.num_tokens, h_width}, x.options());
  with_dtype(x, [&](auto D) {
    constexpr cuda::DType dt = decltype(D)::value;
    run_kernel(x, dims, seg_indptr, rank_indptr, scaling,
               [&](int G, int sm_count) {
                 return cuda::shrink_workspace_bytes<dt>(G, sm_count, splits, dims.num_tokens, h_width);
               },
               [&](const cuda::Segments& s, const cuda::Launch& l) {
                 return cuda::shrink<dt>(s, x.data_ptr(), W.data_ptr(), h.data_ptr(), x.size(1),
                                         h_width, splits, l);
               });
  });
  return h;
}

void lora_expand_cuda_(at::Tensor& y, const at::Tensor& h_in, const at::Tensor& W_in,
                       const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                       const std::optional<at::Tensor>& scaling, bool accumulate) {
  const SegmentDims dims = check_expand_args(y, h_in, W_in, seg_indptr, rank_indptr, scaling);
  raise_recorded_device_error();
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor h = h_in.contiguous(), W = W_in.contiguous();
  if (!cutlass_ok({&y, &h, &W}))
    return ref::lora_expand_(y, h, W, seg_indptr, rank_indptr, scaling, accumulate);
  if (dims.num_groups == 0 || y.numel() == 0) return;
  with_dtype(y, [&](auto D) {
    constexpr cuda::DType dt = decltype(D)::value;
    run_kernel(y, dims, seg_indptr, rank_indptr, scaling, cuda::expand_workspace_bytes<dt>,
               [&](const cuda::Segments& s, const cuda::Launch& l) {
                 return cuda::expand<dt>(s, h.data_ptr(), h.size(1), W.data_ptr(), y.data_ptr(),
                                         y.size(1), accumulate, l);
               });
  });
}

// b is the base weight W [N, K] transposed (a linear's forward: W's K-major rows) or the weight
// itself [K, N] (its dX): the fused kernels read W as it is stored. Elsewhere (another GPU, fp16:
// lora_kernels.h builds them for bf16 only; other strides, a K not in whole K tiles, a scaled dX, no
// adapter rank, no output column) a . b, then lora_expand_ adding into it: the output read and
// written as often as by the expand writing first and the base GEMM adding into it (beta = 1), which
// needs every row in a segment of rank > 0.
at::Tensor lora_matmul_cuda(const at::Tensor& a_in, const at::Tensor& b, const at::Tensor& h_in, const at::Tensor& W_in,
                            const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                            const std::optional<at::Tensor>& scaling) {
  const SegmentDims dims = check_matmul_args(a_in, b, h_in, W_in, seg_indptr, rank_indptr, scaling);
  raise_recorded_device_error();
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), h = h_in.contiguous(), W = W_in.contiguous();
  const int64_t K = a.size(1), N = b.size(1);
  const bool transposed = b.dim() == 2 && b.stride(0) == 1 && b.stride(1) == K;  // b = weight.t()
  const at::Tensor weight = transposed ? b.t() : b;  // as stored: [N, K] or [K, N]
  const bool fused = a.scalar_type() == at::kBFloat16 && dims.num_groups > 0 && dims.num_tokens > 0 && K > 0 &&
                     N > 0 && dims.total_rank > 0 && h.size(1) > 0 && (transposed || b.is_contiguous()) &&
                     (transposed || !scaling.has_value()) && K % cuda::fused_k_tile() == 0 &&
                     cutlass_ok({&a, &h, &W, &weight});
  if (!fused) {
    at::Tensor out = at::mm(a, b);
    lora_expand_cuda_(out, h, W, seg_indptr, rank_indptr, scaling, /*accumulate=*/true);
    return out;
  }
  at::Tensor out = at::empty({dims.num_tokens, N}, a.options());
  const int sms = at::cuda::getDeviceProperties(a.get_device())->multiProcessorCount;
  const auto launch = [&](auto wide) {
    constexpr cuda::DType dt = cuda::DType::kBF16;
    constexpr bool w = decltype(wide)::value;
    if (transposed) {
      const at::Tensor bt = at::empty({N, cuda::fused_bt_width(static_cast<int>(dims.num_groups), dims.total_rank)},
                                      a.options());
      run_kernel(a, dims, seg_indptr, rank_indptr, scaling,
                 [&](int G, int sm_count) { return cuda::fused_forward_workspace_bytes<dt, w>(G, sm_count, N); },
                 [&](const cuda::Segments& s, const cuda::Launch& l) {
                   return cuda::fused_forward<dt, w>(s, a.data_ptr(), weight.data_ptr(), h.data_ptr(), h.size(1),
                                                     W.data_ptr(), bt.data_ptr(), out.data_ptr(), K, N, l);
                 });
    } else {
      run_kernel(a, dims, seg_indptr, rank_indptr, scaling,
                 [&](int G, int sm_count) { return cuda::fused_backward_workspace_bytes<dt, w>(G, sm_count, N); },
                 [&](const cuda::Segments& s, const cuda::Launch& l) {
                   return cuda::fused_backward<dt, w>(s, a.data_ptr(), weight.data_ptr(), h.data_ptr(), h.size(1),
                                                      W.data_ptr(), out.data_ptr(), N, K, l);
                 });
    }
  };
  if (cuda::fused_wide(dims.num_tokens, N, sms)) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
  return out;
}

at::Tensor lora_weight_grad_cuda(const at::Tensor& h_in, const at::Tensor& x_in,
                                 const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                                 int64_t total_rank, const std::optional<at::Tensor>& scaling,
                                 std::optional<at::ScalarType> out_dtype) {
  const SegmentDims dims =
      check_weight_grad_args(h_in, x_in, seg_indptr, rank_indptr, total_rank, scaling);
  raise_recorded_device_error();
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor h = h_in.contiguous(), x = x_in.contiguous();
  const at::ScalarType out_type = out_dtype.value_or(x.scalar_type());
  if (!cutlass_ok({&x, &h}) || (out_type != x.scalar_type() && out_type != at::kFloat))
    return ref::lora_weight_grad(h, x, seg_indptr, rank_indptr, total_rank, scaling, out_dtype);
  // Every row is written: by its adapter's tiles, or zeroed by the setup kernel (no tokens).
  at::Tensor out = at::empty({total_rank, x.size(1)}, x.options().dtype(out_type));
  if (dims.num_groups == 0 || out.numel() == 0) return out.zero_();  // no groups: no setup kernel
  with_dtype(x, [&](auto D) {
    constexpr cuda::DType dt = decltype(D)::value;
    const auto launch = [&](auto O) {
      constexpr cuda::DType ot = decltype(O)::value;
      run_kernel(x, dims, seg_indptr, rank_indptr, scaling, cuda::weight_grad_workspace_bytes<dt, ot>,
                 [&](const cuda::Segments& s, const cuda::Launch& l) {
                   return cuda::weight_grad<dt, ot>(s, h.data_ptr(), h.size(1), x.data_ptr(),
                                                    out.data_ptr(), x.size(1), l);
                 });
    };
    if (out_type == at::kFloat) {
      launch(std::integral_constant<cuda::DType, cuda::DType::kF32>{});
    } else {
      launch(std::integral_constant<cuda::DType, dt>{});
    }
  });
  return out;
}

}  // namespace
}  // namespace alto

TORCH_LIBRARY_IMPL(alto, CUDA, m) {
  m.impl("lora_shrink", &alto::lora_shrink_cuda);
  m.impl("lora_expand_", &alto::lora_expand_cuda_);
  m.impl("lora_matmul", &alto::lora_matmul_cuda);
  m.impl("lora_weight_grad", &alto::lora_weight_grad_cuda);
}
