// alto::packed_adamw_'s and alto::row_sq_norms' CUDA kernels (see packed_adamw.h; the math: csrc/adamw_math.h).
#include "../adamw_math.h"
#include "lora_kernels.h"
#include "packed_adamw.h"

namespace alto::cuda {
namespace {

constexpr int kThreads = 256;

// Each stepped adapter's factors for this step, and its step counted (a not-finite norm: neither).
// One block: its threads first count the slots naming each entry (an entry named twice is stepped by
// neither slot: grad_scale 0, as a not-finite norm), so no two threads write one entry's factors.
template <class T>
__global__ void adamw_factors_kernel(AdamwArgs a) {
  const T* hyper = static_cast<const T*>(a.hyper);
  const T* norms = static_cast<const T*>(a.norms);
  auto* factors = static_cast<AdamwFactors<T>*>(a.factors);
  for (int64_t k = threadIdx.x; k < a.num_calls; k += blockDim.x) a.claims[k] = 0;
  __syncthreads();
  for (int64_t s = threadIdx.x; s < a.num_slots; s += blockDim.x) {
    const int32_t k = a.slot_call[s];
    if (k < -1 || k >= a.num_calls) {
      report_error(a.error, kErrSlotCall, static_cast<int32_t>(s), k, static_cast<int32_t>(a.num_calls));
    } else if (k >= 0) {
      atomicAdd(&a.claims[k], 1);
    }
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < a.num_slots; s += blockDim.x) {
    const int32_t k = a.slot_call[s];
    if (k < 0 || k >= a.num_calls) continue;
    if (a.claims[k] != 1) {  // every slot naming it writes the same skip
      report_error(a.error, kErrSlotCallTwice, static_cast<int32_t>(s), k, 0);
      factors[k] = AdamwFactors<T>{T(0), T(0), T(0), T(1)};
      continue;
    }
    const AdamwFactors<T> f = adamw_factors<T>(norms[k], hyper[3 * k], hyper[3 * k + 1], hyper[3 * k + 2],
                                               static_cast<double>(a.counts[s]) + 1.0, a.beta1, a.beta2);
    factors[k] = f;
    if (f.grad_scale != T(0)) a.counts[s] += 1.0f;
  }
}

template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Vec {
  T x[kVec];
};

// The elements [begin, end) of one pack, kVec at a time (kVec divides the width: no access spans rows).
template <class T, int kVec>
__device__ void update_range(const AdamwArgs& a, const AdamwPack& p, int64_t begin, int64_t end) {
  const auto* factors = static_cast<const AdamwFactors<T>*>(a.factors);
  const AdamwConstants<T> constants(a.beta1, a.beta2, a.eps);
  auto* w = static_cast<Vec<T, kVec>*>(p.w);
  const auto* g = static_cast<const Vec<T, kVec>*>(p.g);
  auto* m = static_cast<Vec<T, kVec>*>(p.m);
  auto* v = static_cast<Vec<T, kVec>*>(p.v);
  for (int64_t e = begin + threadIdx.x * kVec; e < end; e += kThreads * kVec) {
    const int64_t row = p.row_offset + e / p.width;
    const int32_t s = a.row_slot[row];
    if (s < -1 || s >= a.num_slots) {
      // reported once per row, by its first element's thread (kVec divides the width)
      if (e % p.width == 0) report_error(a.error, kErrRowSlot, static_cast<int32_t>(row), s, static_cast<int32_t>(a.num_slots));
      continue;
    }
    if (s < 0) continue;
    const int32_t k = a.slot_call[s];
    if (k < 0 || k >= a.num_calls) continue;
    const AdamwFactors<T> f = factors[k];
    if (f.grad_scale == T(0)) continue;
    const int64_t i = e / kVec;
    Vec<T, kVec> wv = w[i], mv = m[i], vv = v[i];
    const Vec<T, kVec> gv = g[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) adamw_update<T>(wv.x[j], gv.x[j], mv.x[j], vv.x[j], f, constants);
    w[i] = wv;
    m[i] = mv;
    v[i] = vv;
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) adamw_update_kernel(AdamwArgs a) {
  const int64_t chunk = blockIdx.x;
  int64_t lo = 0, hi = a.num_packs - 1;  // the last pack whose first chunk is <= this one
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (a.packs[mid].chunk_begin <= chunk) lo = mid; else hi = mid - 1;
  }
  const AdamwPack p = a.packs[lo];
  const int64_t begin = (chunk - p.chunk_begin) * kAdamwChunk;
  const int64_t end = begin + kAdamwChunk < p.numel ? begin + kAdamwChunk : p.numel;
  constexpr int kVec = 16 / sizeof(T);
  if (p.vectorized) {
    update_range<T, kVec>(a, p, begin, end);
  } else {
    update_range<T, 1>(a, p, begin, end);
  }
}

constexpr int kWarpsPerBlock = kThreads / 32;

template <class T, int kVec>
__device__ T row_sum_of_squares(const T* row, int64_t width, int lane) {
  T acc = T(0);
  const auto* v = reinterpret_cast<const Vec<T, kVec>*>(row);
  for (int64_t i = lane; i < width / kVec; i += 32) {
    const Vec<T, kVec> x = v[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc += x.x[j] * x.x[j];
  }
  return acc;
}

template <class T>
__global__ void __launch_bounds__(kThreads) row_sq_norms_kernel(const RowTensor* tensors, int64_t num_tensors,
                                                                 int64_t rows, T* out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;  // a whole warp: the shuffles below see every lane of theirs
  int64_t lo = 0, hi = num_tensors - 1;  // the last tensor whose first row is <= this one
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tensors[mid].row_begin <= row) lo = mid; else hi = mid - 1;
  }
  const RowTensor t = tensors[lo];
  const T* data = static_cast<const T*>(t.data) + (row - t.row_begin) * t.width;
  constexpr int kVec = 16 / sizeof(T);
  T acc = t.vectorized ? row_sum_of_squares<T, kVec>(data, t.width, lane)
                       : row_sum_of_squares<T, 1>(data, t.width, lane);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) out[row] = acc;
}

}  // namespace

template <class T>
cudaError_t row_sq_norms(const RowTensor* tensors, int64_t num_tensors, int64_t rows, T* out, cudaStream_t stream) {
  if (rows > 0) {
    const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
    row_sq_norms_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(tensors, num_tensors, rows, out);
  }
  return cudaGetLastError();
}

template cudaError_t row_sq_norms<float>(const RowTensor*, int64_t, int64_t, float*, cudaStream_t);
template cudaError_t row_sq_norms<double>(const RowTensor*, int64_t, int64_t, double*, cudaStream_t);

template <class T>
cudaError_t packed_adamw(const AdamwArgs& args, cudaStream_t stream) {
  if (args.num_slots > 0) adamw_factors_kernel<T><<<1, kThreads, 0, stream>>>(args);
  if (args.num_chunks > 0) {
    adamw_update_kernel<T><<<static_cast<unsigned>(args.num_chunks), kThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template cudaError_t packed_adamw<float>(const AdamwArgs&, cudaStream_t);
template cudaError_t packed_adamw<double>(const AdamwArgs&, cudaStream_t);

}  // namespace alto::cuda
