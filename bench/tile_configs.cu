// Which CUTLASS tile shape / schedule runs each grouped-GEMM form fastest on a step's real shapes?
// The three forms (shrink, expand, weight_grad: csrc/cuda/grouped_gemm.cuh) are bound by the bytes
// of their long operand (x read, y written, x or dy read), so each is timed on co-located shapes
// (32 adapters x 1,024 tokens, the sweep's ranks 8-128, and the same x3 as a q/k/v stack runs them)
// and reported as the bandwidth of its bytes (every operand read or written once). One
// configuration per binary (ALTO_CONFIG: an index into csrc/cuda/tile_configs.cuh's candidates,
// the table the kernels choose from), built in parallel by `bash bench/device_run.sh tile_configs`;
// each result is checked at sampled entries against the host.
#include <algorithm>
#include <cmath>

#include "cuda_bench.cuh"

using namespace alto::cuda;
using namespace alto::cuda::detail;
using namespace bench;
using Shrink = ShrinkGemm<Bf16, Config>;
using Expand = ExpandGemm<Bf16, Config>;
using WeightGrad = WeightGradGemm<Bf16, float, Config>;  // float32: the master weights' gradients

constexpr int kAdapters = 32, kTokens = 1024;
int sms = 0;

void report(const char* form, bool in_use, int d, int width, float ms, double bytes, double max_rel) {
  if (ms < 0) return;
  std::printf("  %-11s%s d=%5d h width %3d: %7.3f ms, %.2f GB at %.2f TB/s, max rel err %.1e\n", form,
              in_use ? "*" : " ", d, width, ms, bytes / 1e9, bytes / 1e9 / ms, max_rel);
}

double rel(double got, double ref) { return std::fabs(got - ref) / (std::fabs(ref) + 1e-2); }

int main() {
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  int32_t* err = nullptr;
  CHECK_CUDA(cudaMalloc(&err, 4 * sizeof(int32_t)));
  CHECK_CUDA(cudaMemset(err, 0, 4 * sizeof(int32_t)));
  std::printf("candidate %d: %s (* = the form's configuration in use)\n", ALTO_CONFIG, Config::kName);
  for (const int stack : {1, 3}) {  // one projection's ranks, or a q/k/v stack's (each rank x3)
    const int cycle[5] = {8, 16, 32, 64, 128};
    std::vector<int32_t> seg{0}, rank{0};
    for (int g = 0; g < kAdapters; ++g) {
      seg.push_back(seg.back() + kTokens);
      rank.push_back(rank.back() + stack * cycle[g % 5]);
    }
    const int T = seg.back(), R = rank.back(), width = stack * 128;
    const std::vector<float> scale(kAdapters, 2.0f);
    const Segments segments{upload(seg), upload(rank), upload(scale), kAdapters, T, R, err};
    const std::vector<Bf16> h_host = random_bf16(static_cast<size_t>(T) * width);
    const Bf16* h = upload(h_host);
    for (const int d : {2048, 4096, 8192, 14336}) {
      const std::vector<Bf16> x_host = random_bf16(static_cast<size_t>(T) * d);
      const std::vector<Bf16> w_host = random_bf16(static_cast<size_t>(R) * d);
      const Bf16* x = upload(x_host);
      const Bf16* w = upload(w_host);
      Bf16* out = nullptr;  // the shrink's h and the expand's y
      CHECK_CUDA(cudaMalloc(&out, static_cast<size_t>(T) * std::max(d, width) * sizeof(Bf16)));
      float* grad = nullptr;
      CHECK_CUDA(cudaMalloc(&grad, static_cast<size_t>(R) * d * sizeof(float)));
      const double big = static_cast<double>(T) * d * 2, small = static_cast<double>(R) * d * 2,
                   hb = static_cast<double>(T) * width * 2;

      // shrink: h[t, k] = s_g sum_j x[t, j] w[r0 + k, j], at each adapter's first and last token
      const float shrink_ms = time_form<Shrink>(segments, ShrinkForm<Bf16>{x, w, out, d, width, width}, sms);
      std::vector<Bf16> got = download(out, static_cast<size_t>(T) * width);
      double worst = 0;
      for (int g = 0; g < kAdapters; ++g)
        for (const int t : {seg[g], seg[g + 1] - 1})
          for (int k = 0; k < rank[g + 1] - rank[g]; k += 7) {
            double ref = 0;
            for (int j = 0; j < d; ++j) ref += float(x_host[size_t(t) * d + j]) * float(w_host[size_t(rank[g] + k) * d + j]);
            worst = std::fmax(worst, rel(float(got[size_t(t) * width + k]), scale[g] * ref));
          }
      report("shrink", ALTO_CONFIG == tiles::kShrink, d, width, shrink_ms, big + small + hb, worst);

      // expand (y written, not read): y[t, j] = s_g sum_k h[t, k] w[r0 + k, j]
      const float expand_ms = time_form<Expand>(segments, ExpandForm<Bf16>{h, w, out, width, d, width, 0.f}, sms);
      got = download(out, static_cast<size_t>(T) * d);
      worst = 0;
      for (int g = 0; g < kAdapters; ++g)
        for (const int t : {seg[g], seg[g + 1] - 1})
          for (int j = 0; j < d; j += 97) {
            double ref = 0;
            for (int k = 0; k < rank[g + 1] - rank[g]; ++k)
              ref += float(h_host[size_t(t) * width + k]) * float(w_host[size_t(rank[g] + k) * d + j]);
            worst = std::fmax(worst, rel(float(got[size_t(t) * d + j]), scale[g] * ref));
          }
      report("expand", ALTO_CONFIG == tiles::kExpand, d, width, expand_ms, big + small + hb, worst);

      // weight_grad (float32 out): grad[r0 + k, j] = s_g sum_{t of g} h[t, k] x[t, j]
      const float grad_ms =
          time_form<WeightGrad>(segments, WeightGradForm<Bf16, float>{h, x, grad, width, d, width}, sms);
      const std::vector<float> grad_host = download(grad, static_cast<size_t>(R) * d);
      worst = 0;
      for (int g = 0; g < kAdapters; g += 3)
        for (int k = 0; k < rank[g + 1] - rank[g]; k += 5)
          for (int j = 0; j < d; j += 997) {
            double ref = 0;
            for (int t = seg[g]; t < seg[g + 1]; ++t)
              ref += float(h_host[size_t(t) * width + k]) * float(x_host[size_t(t) * d + j]);
            worst = std::fmax(worst, rel(grad_host[size_t(rank[g] + k) * d + j], scale[g] * ref));
          }
      report("weight_grad", ALTO_CONFIG == tiles::kWeightGrad, d, width, grad_ms, big + small * 2 + hb, worst);

      CHECK_CUDA(cudaFree(out));
      CHECK_CUDA(cudaFree(grad));
      CHECK_CUDA(cudaFree(const_cast<Bf16*>(x)));
      CHECK_CUDA(cudaFree(const_cast<Bf16*>(w)));
    }
    CHECK_CUDA(cudaFree(const_cast<Bf16*>(h)));
  }
  return index_errors(err);
}
