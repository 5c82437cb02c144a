// The AdamW update of alto::packed_adamw_, written once for the CPU loop (csrc/cpu/packed_adamw.cpp)
// and the CUDA kernel (csrc/cuda/packed_adamw.cu). Torch-free. The math is torch's fused AdamW
// kernel's (torch._fused_adamw_, adamw mode, no amsgrad) with clip_grad_norm_'s clip given as its
// grad scale, in the weights' dtype T (float32 masters, or float64 for the exact-math checks).
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define ALTO_HOST_DEVICE __host__ __device__
#else
#define ALTO_HOST_DEVICE
#endif

namespace alto {

// One adapter's factors for this step; grad_scale == 0: the adapter is not stepped.
template <class T>
struct AdamwFactors {
  T grad_scale;  // the gradient is divided by it: clip_grad_norm_'s 1 / min(1, max_norm / (norm + 1e-6))
  T lr_wd;       // lr * weight_decay (decoupled decay)
  T step_size;   // lr / (1 - beta1^step)
  T bc2_sqrt;    // sqrt(1 - beta2^step)
};

// norm: the adapter's gradient norm (not finite: not stepped); step: its step count, this one included.
template <class T>
ALTO_HOST_DEVICE inline AdamwFactors<T> adamw_factors(T norm, T lr, T weight_decay, T max_norm, double step,
                                                      double beta1, double beta2) {
  using std::isfinite, std::pow, std::sqrt;
  if (!isfinite(norm)) return {T(0), T(0), T(0), T(1)};
  T scale = (norm + T(1e-6)) / max_norm;  // max_norm inf (no limit): 0, so 1 below
  if (!(scale > T(1))) scale = T(1);
  const double bc1 = 1.0 - pow(beta1, step);
  const double bc2 = 1.0 - pow(beta2, step);
  return {scale, lr * weight_decay, static_cast<T>(static_cast<double>(lr) / bc1), static_cast<T>(sqrt(bc2))};
}

// The betas and eps in T, 1 - beta computed in double first (as torch.optim does: in float32,
// 1 - 0.999f is 1.3e-5 off 0.001, which moved a first step's update by 6e-6 of itself).
template <class T>
struct AdamwConstants {
  T beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
  ALTO_HOST_DEVICE AdamwConstants(double b1, double b2, double e)
      : beta1(T(b1)), beta2(T(b2)), one_minus_beta1(T(1.0 - b1)), one_minus_beta2(T(1.0 - b2)), eps(T(e)) {}
};

template <class T>
ALTO_HOST_DEVICE inline void adamw_update(T& w, T grad, T& m, T& v, const AdamwFactors<T>& f,
                                          const AdamwConstants<T>& c) {
  using std::sqrt;
  const T g = grad / f.grad_scale;
  w -= f.lr_wd * w;
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * g * g;
  const T denom = sqrt(v) / f.bc2_sqrt + c.eps;
  w -= f.step_size * m / denom;
}

}  // namespace alto
