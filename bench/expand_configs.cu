// Which CUTLASS tile shape / schedule writes the expand output fastest? The expand GEMM of a
// training step (y_g = s_g h_g W_g, K = rank <= 64, y written without being read) is bound by
// the bytes of y, so each configuration is timed on the engine's real shapes and reported as
// write bandwidth. One configuration per binary (ALTO_CONFIG: an index into the candidates of
// csrc/cuda/tile_configs.cuh, the table the kernels choose from), built in parallel by
// `bash bench/device_run.sh expand_configs`; each binary checks sampled rows against the host.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda/grouped_gemm.cuh"

using namespace alto::cuda;
using namespace alto::cuda::detail;
using Bf16 = cutlass::bfloat16_t;
using RowMajor = cutlass::layout::RowMajor;
#ifndef ALTO_CONFIG
#error "ALTO_CONFIG: an index into csrc/cuda/tile_configs.cuh's candidates"
#endif
static_assert(0 <= ALTO_CONFIG && ALTO_CONFIG < tiles::kCandidates, "ALTO_CONFIG: an index into the candidates");
using Config = tiles::Candidate<ALTO_CONFIG>;  // the one table of candidates
using GG = GroupedGemm<Bf16, RowMajor, RowMajor, RowMajor, Config, Bf16>;
constexpr bool kInUse = ALTO_CONFIG == tiles::kExpand;

#define CHECK_CUDA(x)                                                              \
  do {                                                                             \
    cudaError_t e = (x);                                                           \
    if (e != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e));                 \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)

template <class T>
T* upload(const std::vector<T>& v) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, v.size() * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

int main() {
  constexpr int kAdapters = 32, kTokens = 512, kHWidth = 64, kIters = 20;
  const int ranks_cycle[4] = {8, 16, 32, 64};
  std::vector<int32_t> seg{0}, rank{0};
  for (int g = 0; g < kAdapters; ++g) {
    seg.push_back(seg.back() + kTokens);
    rank.push_back(rank.back() + ranks_cycle[g % 4]);
  }
  const int T = seg.back(), R = rank.back();
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  int32_t* err = nullptr;
  CHECK_CUDA(cudaMalloc(&err, 4 * sizeof(int32_t)));
  CHECK_CUDA(cudaMemset(err, 0, 4 * sizeof(int32_t)));
  std::vector<float> scale_host(kAdapters);
  for (int g = 0; g < kAdapters; ++g) scale_host[g] = 2.0f;
  const Segments segments{upload(seg), upload(rank), upload(scale_host), kAdapters, T, R, err};

  std::srand(0);
  auto rand_bf16 = [](size_t n) {
    std::vector<Bf16> v(n);
    for (auto& x : v) x = Bf16(static_cast<float>(std::rand()) / RAND_MAX - 0.5f);
    return v;
  };
  const std::vector<Bf16> h_host = rand_bf16(static_cast<size_t>(T) * kHWidth);
  const Bf16* h = upload(h_host);
  std::printf("%s%s\n", Config::kName, kInUse ? " (in use)" : "");
  for (const int d : {1024, 4096, 14336}) {
    const std::vector<Bf16> w_host = rand_bf16(static_cast<size_t>(R) * d);
    const Bf16* w = upload(w_host);
    Bf16* y = nullptr;
    CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(T) * d * sizeof(Bf16)));
    const size_t ws_bytes = GG::workspace_bytes(kAdapters, sms);
    void* ws = nullptr;
    CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
    const Launch launch{ws, ws_bytes, 0, sms, nullptr};
    const ExpandForm<Bf16> form{h, w, y, kHWidth, d, kHWidth, /*beta=*/0.f};
    for (int i = 0; i < 3; ++i) {
      if (const Status s = launch_form<GG>(segments, form, launch)) { std::printf("  d=%d: %s\n", d, s); return 1; }
    }
    cudaEvent_t start, stop;
    CHECK_CUDA(cudaEventCreate(&start));
    CHECK_CUDA(cudaEventCreate(&stop));
    CHECK_CUDA(cudaEventRecord(start));
    for (int i = 0; i < kIters; ++i) launch_form<GG>(segments, form, launch);
    CHECK_CUDA(cudaEventRecord(stop));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    ms /= kIters;
    // Sampled rows against the host: every adapter's first and last token.
    std::vector<Bf16> y_host(static_cast<size_t>(T) * d);
    CHECK_CUDA(cudaMemcpy(y_host.data(), y, y_host.size() * sizeof(Bf16), cudaMemcpyDeviceToHost));
    double max_rel = 0;
    for (int g = 0; g < kAdapters; ++g) {
      for (const int t : {seg[g], seg[g + 1] - 1}) {
        for (int j = 0; j < d; j += 97) {
          double ref = 0;
          for (int k = 0; k < rank[g + 1] - rank[g]; ++k)
            ref += float(h_host[size_t(t) * kHWidth + k]) * float(w_host[size_t(rank[g] + k) * d + j]);
          ref *= scale_host[g];
          max_rel = std::fmax(max_rel, std::fabs(float(y_host[size_t(t) * d + j]) - ref) / (std::fabs(ref) + 1e-2));
        }
      }
    }
    const double gb = static_cast<double>(T) * d * sizeof(Bf16) / 1e9;
    std::printf("  d_out=%5d: %.3f ms, y %.2f GB written at %.2f TB/s, max rel err %.1e\n", d, ms, gb,
                gb / ms, max_rel);
    CHECK_CUDA(cudaFree(y));
    CHECK_CUDA(cudaFree(ws));
    CHECK_CUDA(cudaFree(const_cast<Bf16*>(w)));
  }
  return 0;
}
