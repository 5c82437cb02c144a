// Torch-free entry points of alto::packed_adamw_'s and alto::row_sq_norms' CUDA kernels (the glue:
// packed_adamw_torch.cpp).
// Two launches whatever the number of adapters and packs: one small kernel computes each stepped
// adapter's factors (and counts its step), one steps every stepped row of every pack, a block per
// chunk of kAdamwChunk elements. A bad index value is skipped (never read past) and recorded in the
// device error record (device_errors.h; codes in lora_kernels.h): raised at the next ALTO CUDA op.
// (The rows of a pack without gradient are not read, so not checked: the CPU kernel checks them.)
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace alto::cuda {

inline constexpr int64_t kAdamwChunk = 16384;  // elements per block

// One pack as the update kernel reads it (a table of them is copied to the device each call).
struct AdamwPack {
  void* w;
  const void* g;
  void* m;
  void* v;
  int64_t width;        // elements per row
  int64_t numel;
  int64_t row_offset;   // its first row in row_slot
  int64_t chunk_begin;  // its first chunk: the packs' chunks are numbered end to end
  int64_t vectorized;   // 16-byte accesses: the width a multiple of them and every pointer aligned
};

struct AdamwArgs {
  const AdamwPack* packs;  // device
  int64_t num_packs;
  int64_t num_chunks;
  const int32_t* row_slot;   // [rows of all packs given to the op]
  const int32_t* slot_call;  // [num_slots]
  int64_t num_slots;
  int64_t num_calls;
  const void* hyper;  // [num_calls, 3] T: lr, weight_decay, max_norm
  const void* norms;  // [num_calls] T
  float* counts;      // [num_slots]
  void* factors;      // scratch: [num_calls] AdamwFactors<T>
  int32_t* claims;    // scratch: [num_calls] slots naming each entry
  int32_t* error;     // the device error record
  double beta1, beta2, eps;
};

template <class T>
cudaError_t packed_adamw(const AdamwArgs& args, cudaStream_t stream);

// alto::row_sq_norms: a warp per row, its lanes' partial sums reduced in a fixed order (deterministic).
struct RowTensor {
  const void* data;
  int64_t width;
  int64_t row_begin;   // its first row in the output: the tensors' rows are numbered end to end
  int64_t vectorized;  // 16-byte loads: the width a multiple of them and the pointer aligned
};

template <class T>
cudaError_t row_sq_norms(const RowTensor* tensors, int64_t num_tensors, int64_t rows, T* out, cudaStream_t stream);

}  // namespace alto::cuda
