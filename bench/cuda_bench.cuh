// What the standalone CUDA benches (bench/tile_configs.cu, bench/base_gemm.cu) share: the tile
// configuration a binary times (ALTO_CONFIG), error checks, device buffers, random bf16 data, and the
// timing of one grouped-GEMM form's launches.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/grouped_gemm.cuh"

#define CHECK_CUDA(x)                                                              \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e));                 \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

#ifndef ALTO_CONFIG
#error "ALTO_CONFIG: an index into csrc/cuda/tile_configs.cuh's candidates (one per binary)"
#endif
static_assert(0 <= ALTO_CONFIG && ALTO_CONFIG < alto::cuda::tiles::kCandidates,
              "ALTO_CONFIG: an index into the candidates");

namespace bench {

using Bf16 = cutlass::bfloat16_t;
using Config = alto::cuda::tiles::Candidate<ALTO_CONFIG>;  // the one table of candidates

template <class T>
T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, v.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

template <class T>
std::vector<T> download(const T* p, size_t n) {
  std::vector<T> v(n);
  CHECK_CUDA(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

// Uniform in [-0.5, 0.5) (xorshift: std::rand over 10^9 elements would take a minute).
inline std::vector<Bf16> random_bf16(size_t n) {
  static uint64_t state = 88172645463325252ull;
  std::vector<Bf16> v(n);
  for (auto& x : v) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    x = Bf16(static_cast<float>(state >> 40) / static_cast<float>(1 << 24) - 0.5f);
  }
  return v;
}

constexpr int kIters = 20;

// Milliseconds of one call of fn (the mean of kIters after 3 warm-ups), by CUDA events.
template <class Fn>
float time_ms(Fn&& fn) {
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaEventRecord(start));
  for (int i = 0; i < kIters; ++i) fn();
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return ms / kIters;
}

// Launches of a grouped-GEMM form over seg's adapters, with a workspace of their own.
template <class GG, class Form>
struct FormLaunch {
  const alto::cuda::Segments& seg;
  const Form& form;
  int sms;
  size_t bytes = GG::workspace_bytes(seg.num_groups * form.splits, sms);
  void* ws = [this] { void* p = nullptr; CHECK_CUDA(cudaMalloc(&p, bytes)); return p; }();
  ~FormLaunch() { CHECK_CUDA(cudaFree(ws)); }  // (waits for the launches)
  // false (the reason printed) where it did not launch
  bool operator()() const {
    const alto::cuda::Status s = alto::cuda::detail::launch_form<GG>(seg, form, {ws, bytes, 0, sms, nullptr});
    if (s) std::printf("    %s\n", s);
    return s == nullptr;
  }
};

// One launch (false where it did not launch).
template <class GG, class Form>
bool run_form(const alto::cuda::Segments& seg, const Form& form, int sms) {
  return FormLaunch<GG, Form>{seg, form, sms}();
}

// Milliseconds of one launch, or -1 where it did not launch.
template <class GG, class Form>
float time_form(const alto::cuda::Segments& seg, const Form& form, int sms) {
  const FormLaunch<GG, Form> launch{seg, form, sms};
  return launch() ? time_ms([&] { launch(); }) : -1.f;
}

// The exit code after the kernels ran: 1 (and the error printed) where one recorded an index error.
inline int index_errors(const int32_t* err) {
  int32_t flags[4];
  CHECK_CUDA(cudaMemcpy(flags, err, sizeof(flags), cudaMemcpyDeviceToHost));
  if (flags[0] == 0) return 0;
  std::printf("index error recorded: %d\n", flags[0]);
  return 1;
}

}  // namespace bench
