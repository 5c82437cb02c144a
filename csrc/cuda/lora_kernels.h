// Torch-free entry points of the CUTLASS kernels (sm_90a). The torch glue (lora_ops_torch.cpp)
// checks shapes, allocates outputs and workspaces and calls these with raw pointers.
//
// Each launch = one small setup kernel that turns the segment index tensors into per-adapter GEMM
// problems (validating them on the device; a bad adapter gets an empty problem and an error
// record, so nothing is ever read out of bounds) + one CUTLASS grouped GEMM over all adapters.
// Requirements (checked by the glue): every leading dimension a multiple of 8 elements and every
// base pointer 16-byte aligned (TMA).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace alto::cuda {

enum class DType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };  // kF32: weight_grad's output only

// Error record written by the setup kernels and the packed AdamW kernels (packed_adamw.h): {code,
// index, value_a, value_b}; code 0 = none.
enum ErrorCode : int32_t {
  kErrNone = 0,
  kErrSegStart = 1,       // seg_indptr[0] != 0
  kErrSegOrder = 2,       // seg_indptr decreases at group
  kErrSegEnd = 3,         // seg_indptr[G] != T
  kErrRankStart = 4,      // rank_indptr[0] != 0
  kErrRankOrder = 5,      // rank_indptr decreases at group
  kErrRankEnd = 6,        // rank_indptr[G] != R
  kErrRankWidth = 7,      // r_g > h width
  kErrRowSlot = 8,        // packed_adamw_: row_slot[row] not -1 or a slot
  kErrSlotCall = 9,       // packed_adamw_: slot_call[slot] not -1 or an entry
  kErrSlotCallTwice = 10, // packed_adamw_: slot_call[slot] names another slot's entry too
};

#ifdef __CUDACC__
// Records the first error of a launch in a record the host reads without synchronizing.
__device__ inline void report_error(int32_t* err, int32_t code, int32_t g, int32_t a, int32_t b) {
  if (atomicCAS(err, 0, -1) == 0) {
    err[1] = g;
    err[2] = a;
    err[3] = b;
    __threadfence_system();
    atomicExch(err, code);
  }
}
#endif

struct Segments {
  const int32_t* seg_indptr;   // [G+1] device
  const int32_t* rank_indptr;  // [G+1] device
  const float* scaling;        // [G] device, or nullptr for 1
  int num_groups;              // G
  int64_t num_tokens;          // T
  int64_t total_rank;          // R
  int32_t* error;              // device-visible error record (4 ints)
};

struct Launch {
  void* workspace;         // from *_workspace_bytes
  size_t workspace_bytes;
  int device;
  int sm_count;
  cudaStream_t stream;
};

// Returns nullptr on success, else a static message.
using Status = const char*;

// Each entry point is a template over the dtype, explicitly instantiated once per .cu file
// (shrink_bf16.cu, ...): one kernel configuration per file keeps builds parallel.

// out[t, 0:r_g] = s_g * x[t, :] . W_g^T  (x [T, d], W [R, d], out [T, out_ld]); with splits = 1
// the other columns are untouched, with splits > 1 (d cut in at most that many chunks, for steps
// of few tokens: shrink_splits) they are set to zero.
int shrink_splits(int64_t tokens, int num_groups, int64_t out_ld, int64_t d, int sm_count);
void set_split_k(bool enabled);  // whether shrink_splits may split (ALTO_SPLIT_K=0 at start: never)
bool split_k();
template <DType D>
size_t shrink_workspace_bytes(int num_groups, int sm_count, int splits, int64_t tokens, int64_t out_ld);
template <DType D>
Status shrink(const Segments& seg, const void* x, const void* W, void* out, int64_t d,
              int64_t out_ld, int splits, const Launch& launch);

// y[t, :] += s_g * h[t, 0:r_g] . W_g  (h [T, h_ld], W [R, d], y [T, d]); accumulate=false:
// y[t, :] = ... without reading y (rows of adapters with no rank untouched).
template <DType D> size_t expand_workspace_bytes(int num_groups, int sm_count);
template <DType D>
Status expand(const Segments& seg, const void* h, int64_t h_ld, const void* W, void* y, int64_t d,
              bool accumulate, const Launch& launch);

// out[W_g rows, :] = s_g * h_g[:, 0:r_g]^T . x_g  (h [T, h_ld], x [T, d], out [R, d] in Out = D
// or kF32); rows of adapters without tokens are set to zero.
template <DType D, DType Out> size_t weight_grad_workspace_bytes(int num_groups, int sm_count);
template <DType D, DType Out>
Status weight_grad(const Segments& seg, const void* h, int64_t h_ld, const void* x, void* out,
                   int64_t d, const Launch& launch);

// A base linear and its adapters' LoRA term in one GEMM (one accumulator, the output written once):
// fused_forward: y[t, :] = x[t, :] . W^T + s_g * h[t, 0:r_g] . b_g  (x [T, d_in], W [d_out, d_in],
//   h [T, h_ld], b [R, d_out], y [T, d_out]); bt: a [d_out, fused_bt_width(G, R)] buffer it fills
//   with the adapters' s_g b_gᵀ first.
// fused_backward: dx[t, :] = dy[t, :] . W + dh[t, 0:r_g] . a_g  (dy [T, d_out], dh [T, h_ld],
//   a [R, d_in], dx [T, d_in]; s_g is dh's).
// Every row of every segment is written; d_in (forward) or d_out (backward) a multiple of
// fused_k_tile(), h_ld of 8. Wide: the tile configuration for outputs of many tiles (fused_wide).
// Instantiated for bf16 only (the dtype LoRA trains in on Hopper; each instantiation is a CUTLASS
// kernel of its own, ~45 s of a 2-core build): fp16 takes a @ b then the expand.
int64_t fused_bt_width(int num_groups, int64_t total_rank);
int64_t fused_k_tile();
bool fused_wide(int64_t tokens, int64_t n, int sm_count);
template <DType D, bool Wide>
size_t fused_forward_workspace_bytes(int num_groups, int sm_count, int64_t d_out);
template <DType D, bool Wide>
Status fused_forward(const Segments& seg, const void* x, const void* W, const void* h, int64_t h_ld,
                     const void* b, void* bt, void* y, int64_t d_in, int64_t d_out, const Launch& launch);
template <DType D, bool Wide>
size_t fused_backward_workspace_bytes(int num_groups, int sm_count, int64_t d_in);
template <DType D, bool Wide>
Status fused_backward(const Segments& seg, const void* dy, const void* W, const void* dh, int64_t h_ld,
                      const void* a, void* dx, int64_t d_in, int64_t d_out, const Launch& launch);

}  // namespace alto::cuda
