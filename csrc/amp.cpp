// Mixed precision for VoltTrain (src/amp/): libtorch's autocast state per device type, and the
// two ATen kernels torch.amp.GradScaler runs (unscale with an inf/NaN check, scale update).
//
// tch only wraps the deprecated CUDA-only autocast switch and never sets the autocast dtype
// (libtorch's CUDA default is float16), so `precision: bf16` needs these calls. The same entry
// points serve the CPU and CUDA, so CPU tests run the very code path a GPU runs.
//
// Same rules as the other shims: no C++ exception crosses the C ABI (shim_common.h), tensors are
// `at::Tensor*` as tch's `Tensor::as_ptr` gives them.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include <stdexcept>
#include <vector>

#include "shim_common.h"

namespace {

using vt_shim::guarded;

// 0 = CPU, 1 = CUDA (the Rust side's `AmpDevice`).
at::DeviceType device_type(int d) {
  switch (d) {
    case 0:
      return at::kCPU;
    case 1:
      return at::kCUDA;
    default:
      throw std::invalid_argument("unknown autocast device type " + std::to_string(d));
  }
}

// 0 = float16, 1 = bfloat16 (the Rust side's `AmpDtype`).
at::ScalarType scalar_type(int k) {
  switch (k) {
    case 0:
      return at::kHalf;
    case 1:
      return at::kBFloat16;
    default:
      throw std::invalid_argument("unknown autocast dtype " + std::to_string(k));
  }
}

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return 0;
    case at::kBFloat16:
      return 1;
    default:
      return -1;
  }
}

}  // namespace

extern "C" {

// Enters an autocast region on `device` (what `torch.autocast(device, dtype, enabled)` does on
// entry): stores the previous state in `prev_enabled`/`prev_dtype`, sets enabled and dtype,
// increments the nesting count.
int vt_amp_enter(int device, int dtype, int enabled, int* prev_enabled, int* prev_dtype,
                 char** err) {
  return guarded(err, "autocast enter", [&] {
    const at::DeviceType dt = device_type(device);
    const at::ScalarType st = scalar_type(dtype);
    *prev_enabled = at::autocast::is_autocast_enabled(dt) ? 1 : 0;
    *prev_dtype = dtype_code(at::autocast::get_autocast_dtype(dt));
    at::autocast::set_autocast_enabled(dt, enabled != 0);
    at::autocast::set_autocast_dtype(dt, st);
    at::autocast::increment_nesting();
  });
}

// Leaves the region (torch.autocast's exit): clears the cast cache when the outermost region
// ends, restores the previous state.
int vt_amp_exit(int device, int prev_enabled, int prev_dtype, char** err) {
  return guarded(err, "autocast exit", [&] {
    const at::DeviceType dt = device_type(device);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dt, prev_enabled != 0);
    if (prev_dtype >= 0) {
      at::autocast::set_autocast_dtype(dt, scalar_type(prev_dtype));
    }
  });
}

// Whether autocast is on for `device`; its dtype code in `*dtype` (-1 when neither half kind).
int vt_amp_state(int device, int* enabled, int* dtype, char** err) {
  return guarded(err, "autocast state", [&] {
    const at::DeviceType dt = device_type(device);
    *enabled = at::autocast::is_autocast_enabled(dt) ? 1 : 0;
    *dtype = dtype_code(at::autocast::get_autocast_dtype(dt));
  });
}

// Whether the current CUDA device computes bf16 natively (compute capability 8.0 or newer, what
// `torch.cuda.is_bf16_supported(including_emulation=False)` checks). 0 without CUDA.
int vt_amp_cuda_bf16_supported() {
  try {
    const auto& hooks = at::detail::getCUDAHooks();
    if (!hooks.hasCUDA()) {
      return 0;
    }
    return hooks.supportsBFloat16ConvolutionWithCuDNNv8() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// GradScaler.unscale_'s kernel: every gradient times `inv_scale` in place, `found_inf` set to 1
// when any is inf or NaN (torch._amp_foreach_non_finite_check_and_unscale_).
int vt_amp_unscale(at::Tensor** grads, size_t n, at::Tensor* found_inf, at::Tensor* inv_scale,
                   char** err) {
  return guarded(err, "loss scaler unscale", [&] {
    std::vector<at::Tensor> gs;
    gs.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      if (grads[i] == nullptr || !grads[i]->defined()) {
        throw std::invalid_argument("undefined gradient tensor");
      }
      gs.push_back(*grads[i]);
    }
    if (!gs.empty()) {
      at::_amp_foreach_non_finite_check_and_unscale_(gs, *found_inf, *inv_scale);
    }
  });
}

// GradScaler.update's kernel (torch._amp_update_scale_): backoff on inf, growth after
// `growth_interval` clean steps.
int vt_amp_update_scale(at::Tensor* scale, at::Tensor* growth_tracker, at::Tensor* found_inf,
                        double growth_factor, double backoff_factor, int64_t growth_interval,
                        char** err) {
  return guarded(err, "loss scaler update", [&] {
    at::_amp_update_scale_(*scale, *growth_tracker, *found_inf, growth_factor, backoff_factor,
                           growth_interval);
  });
}

}  // extern "C"
