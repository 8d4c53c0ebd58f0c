// The fused selective scan of Mamba mixers (src/model/ssm.rs) as one libtorch autograd
// function: transformers' `mamba_selective_scan` PyTorch path (delta softplus, discretized A and
// B, the recurrence, the C readout, the D skip and the silu(z) gate) in one pass per channel,
// without the [batch, d, T, N] tensors the PyTorch path materializes. Channel loops live in
// ssm_kernels.c; this file holds shape checks, threading (at::parallel_for over channel blocks)
// and the autograd glue. Same rules as fused.cpp: no exception crosses the C ABI.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>

#include "shim_common.h"

extern "C" {
void vtk_ssm_fwd(const float* u, const float* dt, const float* z, const float* B, const float* C,
                 const float* A, const float* D, const float* bias, float* y, int64_t nb,
                 int64_t nd, int64_t T, int64_t N, int64_t c0, int64_t c1);
int vtk_ssm_bwd(const float* gy, const float* u, const float* dt, const float* z, const float* B,
                const float* C, const float* A, const float* D, const float* bias, float* gu,
                float* gdt, float* gz, float* gA, float* gD, float* gbias, float* gB_acc,
                float* gC_acc, int64_t nb, int64_t nd, int64_t T, int64_t N, int64_t c0,
                int64_t c1);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using vt_shim::guarded;

void check_f32_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
}

struct SelectiveScan : public torch::autograd::Function<SelectiveScan> {
  // u, dt, z [b, d, T]; A [d, N]; B, C [b, T, N]; D, bias [d]. Returns y [b, d, T].
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& u, const at::Tensor& dt,
                            const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                            const at::Tensor& D, const at::Tensor& z, const at::Tensor& bias) {
    at::Tensor uc = u.contiguous(), dtc = dt.contiguous(), zc = z.contiguous();
    at::Tensor Ac = A.contiguous(), Bc = B.contiguous(), Cc = C.contiguous();
    at::Tensor Dc = D.contiguous(), bc = bias.contiguous();
    const int64_t nb = uc.size(0), nd = uc.size(1), T = uc.size(2), N = Ac.size(1);
    at::Tensor y = at::empty(uc.sizes(), uc.options());
    const float *up = uc.data_ptr<float>(), *dp = dtc.data_ptr<float>(),
                *zp = zc.data_ptr<float>(), *Ap = Ac.data_ptr<float>(),
                *Bp = Bc.data_ptr<float>(), *Cp = Cc.data_ptr<float>(),
                *Dp = Dc.data_ptr<float>(), *bp = bc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, nd, 1, [&](int64_t c0, int64_t c1) {
      vtk_ssm_fwd(up, dp, zp, Bp, Cp, Ap, Dp, bp, yp, nb, nd, T, N, c0, c1);
    });
    ctx->save_for_backward({uc, dtc, Ac, Bc, Cc, Dc, zc, bc});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "fused selective scan: higher-order gradients (backward with create_graph) are "
                "not supported; run with VOLTTRAIN_FUSED_KERNELS=0");
    if (!grads[0].defined()) {
      return variable_list(8);
    }
    auto s = ctx->get_saved_variables();
    const at::Tensor &u = s[0], &dt = s[1], &A = s[2], &B = s[3], &C = s[4], &D = s[5],
                     &z = s[6], &bias = s[7];
    const at::Tensor gy = grads[0].contiguous();
    const int64_t nb = u.size(0), nd = u.size(1), T = u.size(2), N = A.size(1);
    at::Tensor gu = at::empty_like(u), gdt = at::empty_like(dt), gz = at::empty_like(z);
    at::Tensor gA = at::empty_like(A), gD = at::empty_like(D), gbias = at::empty_like(bias);
    // One block of channels per task; block k adds into slice k of the B/C accumulators.
    const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), nd));
    at::Tensor gB_acc = at::zeros({nblk, nb, T, N}, u.options());
    at::Tensor gC_acc = at::zeros({nblk, nb, T, N}, u.options());
    std::atomic<int> failed{0};
    const float *gyp = gy.data_ptr<float>(), *up = u.data_ptr<float>(),
                *dp = dt.data_ptr<float>(), *zp = z.data_ptr<float>(), *Ap = A.data_ptr<float>(),
                *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>(), *Dp = D.data_ptr<float>(),
                *bp = bias.data_ptr<float>();
    float *gup = gu.data_ptr<float>(), *gdp = gdt.data_ptr<float>(), *gzp = gz.data_ptr<float>(),
          *gAp = gA.data_ptr<float>(), *gDp = gD.data_ptr<float>(), *gbp = gbias.data_ptr<float>(),
          *gBp = gB_acc.data_ptr<float>(), *gCp = gC_acc.data_ptr<float>();
    at::parallel_for(0, nblk, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t c0 = k * nd / nblk, c1 = (k + 1) * nd / nblk;
        if (vtk_ssm_bwd(gyp, up, dp, zp, Bp, Cp, Ap, Dp, bp, gup, gdp, gzp, gAp, gDp, gbp,
                        gBp + k * nb * T * N, gCp + k * nb * T * N, nb, nd, T, N, c0,
                        c1) != 0) {
          failed.store(1);
        }
      }
    });
    TORCH_CHECK(failed.load() == 0, "fused selective scan: out of memory for the scan buffer");
    return {gu, gdt, gA, gB_acc.sum(0), gC_acc.sum(0), gD, gz, gbias};
  }
};

const at::Tensor& deref(at::Tensor* t, const char* name) {
  if (t == nullptr || !t->defined()) {
    throw std::invalid_argument(std::string(name) + " is undefined");
  }
  return *t;
}

}  // namespace

extern "C" {

// y = selective_scan(u, dt, A, B, C, D, z, dt_bias) as transformers' `mamba_selective_scan`
// with delta_softplus: u, dt, z [b, d, T]; A [d, N]; B, C [b, T, N]; D, dt_bias [d]; all fp32
// on the CPU. Gradients for every input.
int vt_fused_selective_scan(at::Tensor* u, at::Tensor* dt, at::Tensor* A, at::Tensor* B,
                            at::Tensor* C, at::Tensor* D, at::Tensor* z, at::Tensor* bias,
                            at::Tensor** out, char** err) {
  return guarded(err, "fused selective scan", [&] {
    const at::Tensor& us = deref(u, "u");
    const at::Tensor& ds = deref(dt, "dt");
    const at::Tensor& As = deref(A, "A");
    const at::Tensor& Bs = deref(B, "B");
    const at::Tensor& Cs = deref(C, "C");
    const at::Tensor& Ds = deref(D, "D");
    const at::Tensor& zs = deref(z, "z");
    const at::Tensor& bs = deref(bias, "dt_bias");
    const char* names[] = {"u", "dt", "A", "B", "C", "D", "z", "dt_bias"};
    const at::Tensor* all[] = {&us, &ds, &As, &Bs, &Cs, &Ds, &zs, &bs};
    for (int i = 0; i < 8; ++i) {
      check_f32_cpu(*all[i], names[i]);
    }
    TORCH_CHECK(us.dim() == 3, "u must be [batch, d, seq], got ", us.sizes());
    const int64_t nb = us.size(0), nd = us.size(1), T = us.size(2);
    TORCH_CHECK(ds.sizes() == us.sizes() && zs.sizes() == us.sizes(), "dt ", ds.sizes(),
                " and z ", zs.sizes(), " must match u ", us.sizes());
    TORCH_CHECK(As.dim() == 2 && As.size(0) == nd, "A must be [", nd, ", state], got ",
                As.sizes());
    const int64_t N = As.size(1);
    TORCH_CHECK(Bs.dim() == 3 && Bs.size(0) == nb && Bs.size(1) == T && Bs.size(2) == N &&
                    Cs.sizes() == Bs.sizes(),
                "B ", Bs.sizes(), " and C ", Cs.sizes(), " must be [", nb, ", ", T, ", ", N, "]");
    TORCH_CHECK(Ds.dim() == 1 && Ds.size(0) == nd && bs.dim() == 1 && bs.size(0) == nd, "D ",
                Ds.sizes(), " and dt_bias ", bs.sizes(), " must be [", nd, "]");
    *out = new at::Tensor(SelectiveScan::apply(us, ds, As, Bs, Cs, Ds, zs, bs));
  });
}

}  // extern "C"
