// lora_expand (functional) = copy of y + lora_expand_, for every backend at once.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace alto {

static at::Tensor lora_expand(const at::Tensor& y, const at::Tensor& h, const at::Tensor& W,
                              const at::Tensor& seg_indptr, const at::Tensor& rank_indptr,
                              const std::optional<at::Tensor>& scaling) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("alto::lora_expand_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, bool)>();
  at::Tensor out = y.clone(at::MemoryFormat::Contiguous);
  op.call(out, h, W, seg_indptr, rank_indptr, scaling, /*accumulate=*/true);
  return out;
}

}  // namespace alto

TORCH_LIBRARY_IMPL(alto, CompositeExplicitAutograd, m) {
  m.impl("lora_expand", &alto::lora_expand);
}
