// Autocast kernels for the InfoNCE forward ops. Under torch.autocast the embeddings are cast
// to the autocast dtype (bf16/fp16: the tensor-core path, as open_clip's matmul would run)
// while logit_scale keeps its precision (1/0.07 rounded to bf16 would be 0.2% off). The cast
// is an ordinary differentiable op, so gradients reach the fp32 inputs in fp32; the backward
// ops need no autocast kernel (autocast is off in backward, and they get the cast tensors).
// The CPU keys get the same treatment (the CPU kernels accept bf16 and accumulate in fp32).
// impl passes through unchanged (the kernels judge it against the cast inputs).
#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

namespace semcomp {
namespace {

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_fwd_autocast(const at::Tensor& a,
                                                                    const at::Tensor& b,
                                                                    const at::Tensor& logit_scale,
                                                                    int64_t chunk_size,
                                                                    int64_t impl) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("semcomp::infonce_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 int64_t)>();
  const auto dt = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dt, a, kDevice), at::autocast::cached_cast(dt, b, kDevice),
                 logit_scale, chunk_size, impl);
}

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
std::tuple<at::Tensor, at::Tensor> infonce_rect_fwd_autocast(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& logit_scale,
                                                             int64_t offset, int64_t chunk_size,
                                                             int64_t impl) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("semcomp::infonce_rect_fwd", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                 int64_t, int64_t)>();
  const auto dt = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dt, q, kDevice), at::autocast::cached_cast(dt, k, kDevice),
                 logit_scale, offset, chunk_size, impl);
}

}  // namespace

TORCH_LIBRARY_IMPL(semcomp, AutocastCUDA, m) {
  m.impl("infonce_fwd", &infonce_fwd_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("infonce_rect_fwd",
         &infonce_rect_fwd_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(semcomp, AutocastCPU, m) {
  m.impl("infonce_fwd", &infonce_fwd_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("infonce_rect_fwd",
         &infonce_rect_fwd_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace semcomp
