// The one schema file of the op library: every alto:: op is declared here and nowhere else.
// Kernels: csrc/cpu/ (reference, any device), csrc/cuda/ (CUTLASS, sm_90a). Fake kernels and
// autograd formulas: python/alto_ext/_ops.py.
//
// Layout contract (segmented multi-adapter LoRA; README "The op library"):
//   rows seg_indptr[g]:seg_indptr[g+1] of a token-major tensor belong to adapter slot g;
//   rows rank_indptr[g]:rank_indptr[g+1] of a rank-major weight ([R, d]) are adapter g's;
//   scaling[g] (float32, or float64 with float64 operands; optional = 1) multiplies adapter g's product.
// Both A (lora_A, [R, d_in]) and B (lora_B transposed, [R, d_out]) are stored rank-major, so one
// shrink / expand / weight-grad kernel each serves forward and backward.
#include <torch/library.h>

TORCH_LIBRARY(alto, m) {
  // h[t, 0:r_g] = scaling[g] * x[t] . W_g^T for t in segment g; columns >= r_g are zero.
  m.def("lora_shrink(Tensor x, Tensor W, Tensor seg_indptr, Tensor rank_indptr, int h_width, "
        "Tensor? scaling=None) -> Tensor");
  // y[t] += scaling[g] * h[t, 0:r_g] . W_g for t in segment g (in place). accumulate=False:
  // y[t] = ... instead (y is not read), for t in segments with r_g > 0; other rows untouched.
  m.def("lora_expand_(Tensor(a!) y, Tensor h, Tensor W, Tensor seg_indptr, Tensor rank_indptr, "
        "Tensor? scaling=None, bool accumulate=True) -> ()");
  // out = a . b plus every adapter's scaling[g] * h[t, 0:r_g] . W_g on its rows t (a [T, K], b [K, N],
  // h [T, H], W [R, N]): a base linear (b = its weight transposed) or its dX (b = the weight) with its
  // adapters' term, the output written once. On Hopper one GEMM per call, the adapters' K after the
  // base's (csrc/cuda/grouped_gemm.cuh's fused forms); elsewhere a . b then lora_expand_. On CUDA the
  // rows of an adapter whose indices are invalid are not written (the error is raised as for every op).
  m.def("lora_matmul(Tensor a, Tensor b, Tensor h, Tensor W, Tensor seg_indptr, Tensor rank_indptr, "
        "Tensor? scaling=None) -> Tensor");
  // Functional form of lora_expand_ (returns a new tensor; differentiable).
  m.def("lora_expand(Tensor y, Tensor h, Tensor W, Tensor seg_indptr, Tensor rank_indptr, "
        "Tensor? scaling=None) -> Tensor");
  // out[rank rows of g] = scaling[g] * h_g[:, 0:r_g]^T . x_g; rows of adapters with no tokens are zero.
  // out_dtype (default x's) = the weights' dtype, e.g. float32 masters of bf16 compute.
  m.def("lora_weight_grad(Tensor h, Tensor x, Tensor seg_indptr, Tensor rank_indptr, int total_rank, "
        "Tensor? scaling=None, ScalarType? out_dtype=None) -> Tensor");

  // AdamW of every adapter's rows of every pack at once (alto.optim.MultiAdamW; csrc/adamw_math.h):
  // row i of the packs, end to end, belongs to optimizer slot row_slot[i] (-1: none); slot s is
  // stepped this call as entry k = slot_call[s] (-1: not stepped; an entry is one slot's), with
  // hyper[k] = (lr, weight_decay, max_norm; inf: no limit), its gradient norm norms[k]
  // (clip_grad_norm_'s clip; not finite: not stepped) and step count counts[s] + 1 (counts[s]
  // updated). A pack whose gradient is None is not stepped; its rows still count in row_slot.
  // Moments and counts as torch's fused AdamW keeps them. The CPU kernel raises ValueError for a
  // bad index before writing anything; the CUDA one skips it (never reads past), steps the rest and
  // records it: ValueError at the next ALTO CUDA op (at once with sync checks).
  m.def("packed_adamw_(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor row_slot, Tensor slot_call, Tensor hyper, Tensor norms, Tensor(d!) counts, float beta1, "
        "float beta2, float eps) -> ()");

  // Each row's sum of squares of 2-D contiguous tensors of one float dtype and device, their rows
  // end to end: [rows of all] in their dtype (MultiLoraModel.grad_norms: every pack's in one launch).
  m.def("row_sq_norms(Tensor[] tensors) -> Tensor");

  // Adapter migration between ranks (csrc/dist/transfer.cpp): tensors of one device <-> one flat
  // uint8 buffer; send/recv move that buffer through the torch process group named group_name.
  m.def("pack_tensors(Tensor[] tensors) -> Tensor");
  m.def("unpack_tensors(Tensor flat, Tensor(a!)[] outs) -> ()");
  m.def("send_tensors(Tensor[] tensors, str group_name, int dst, int tag=0) -> ()");
  m.def("recv_tensors(Tensor(a!)[] outs, str group_name, int src, int tag=0) -> ()");
}
