// Fused CPU training ops for VoltTrain (src/fused.rs), as libtorch autograd functions, plus the
// two optimizer-side calls tch lacks (dropping a gradient, libtorch's fused AdamW kernel).
//
// Each fused op replaces a chain of ATen kernels whose intermediate tensors would each make a
// pass over memory and be kept for backward: RMSNorm (5 kernels forward, ~10 backward), SwiGLU's
// silu(gate) * up, rotary embeddings, and the LM head's cross-entropy. The row loops live in
// kernels.c (compiled with AVX2/FMA on x86-64, see build.rs); this file holds the autograd
// glue, shape and dtype checks, and threading (at::parallel_for, i.e. libtorch's own OpenMP
// pool and thread count).
//
// Same rules as dist_shim.cpp: no C++ exception crosses the C ABI (shim_common.h), tensors are
// `at::Tensor*` as tch's `Tensor::as_ptr` gives them, and returned tensors are new
// `at::Tensor*` that tch takes ownership of (`Tensor::from_ptr`).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "shim_common.h"

extern "C" {
void vtk_rms_fwd(const float* x, const float* w, float* y, float* rstd, int64_t r0, int64_t r1,
                 int64_t h, float eps);
void vtk_rms_bwd(const float* gy, const float* x, const float* w, const float* rstd, float* gx,
                 float* gw_acc, int64_t r0, int64_t r1, int64_t h);
void vtk_swiglu_fwd(const float* g, const float* u, float* y, int64_t i0, int64_t i1);
void vtk_swiglu_bwd(const float* gy, const float* g, const float* u, float* gg, float* gu,
                    int64_t i0, int64_t i1);
void vtk_rope(const float* x, const float* cos_t, const float* sin_t, float* y, int64_t r0,
              int64_t r1, int64_t t, int64_t cb, int64_t heads, int64_t d, int inverse);
int64_t vtk_ce_rows(float* logits, const int64_t* targets, double* loss, int64_t r0, int64_t r1,
                    int64_t v, int64_t ignore, float scale, float cap, int grad);
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

// Rows per task: about 64 KiB of floats, at least one row.
int64_t grain_rows(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width));
}

constexpr int64_t kElemGrain = 32768;

// The backward passes are row loops, not differentiable libtorch ops: a higher-order gradient
// (backward with create_graph) would silently miss their contribution, so refuse it.
void once_differentiable(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), op,
              ": higher-order gradients (backward with create_graph) are not supported by the "
              "fused CPU ops; run with VOLTTRAIN_FUSED_KERNELS=0");
}

// ------------------------------------------------------------------------------- RMSNorm
struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    at::Tensor xc = x.contiguous(), wc = w.contiguous();
    const int64_t h = xc.size(-1), rows = xc.numel() / std::max<int64_t>(1, h);
    at::Tensor y = at::empty(xc.sizes(), xc.options());
    at::Tensor rstd = at::empty({rows}, xc.options());
    const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
    float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
    const float e = static_cast<float>(eps);
    at::parallel_for(0, rows, grain_rows(h), [&](int64_t b, int64_t end) {
      vtk_rms_fwd(xp, wp, yp, rp, b, end, h, e);
    });
    ctx->save_for_backward({xc, wc, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    once_differentiable("fused rms_norm");
    if (!grads[0].defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const at::Tensor gy = grads[0].contiguous();
    const int64_t h = x.size(-1), rows = x.numel() / std::max<int64_t>(1, h);
    at::Tensor gx = at::empty(x.sizes(), x.options());
    const bool need_w = ctx->needs_input_grad(1);
    // Rows in one block per thread; block k accumulates its weight gradient into row k of `acc`
    // (indexed by block, not by thread id, so it holds whatever the OpenMP team looks like).
    const int64_t nblk = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    at::Tensor acc;
    float* accp = nullptr;
    if (need_w) {
      acc = at::zeros({nblk, h}, x.options());
      accp = acc.data_ptr<float>();
    }
    const float *gp = gy.data_ptr<float>(), *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(),
                *rp = rstd.data_ptr<float>();
    float* op = gx.data_ptr<float>();
    at::parallel_for(0, nblk, 1, [&](int64_t b, int64_t end) {
      for (int64_t k = b; k < end; ++k) {
        float* a = accp == nullptr ? nullptr : accp + k * h;
        vtk_rms_bwd(gp, xp, wp, rp, op, a, k * rows / nblk, (k + 1) * rows / nblk, h);
      }
    });
    at::Tensor gw = need_w ? acc.sum(0).view(w.sizes()) : at::Tensor();
    return {gx, gw, at::Tensor()};
  }
};

// -------------------------------------------------------------------------------- SwiGLU
struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    at::Tensor g = gate.contiguous(), u = up.contiguous();
    at::Tensor y = at::empty(g.sizes(), g.options());
    const float *gp = g.data_ptr<float>(), *up_ = u.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, g.numel(), kElemGrain,
                     [&](int64_t b, int64_t end) { vtk_swiglu_fwd(gp, up_, yp, b, end); });
    ctx->save_for_backward({g, u});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    once_differentiable("fused swiglu");
    if (!grads[0].defined()) {
      return {at::Tensor(), at::Tensor()};
    }
    auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &u = saved[1];
    const at::Tensor gy = grads[0].contiguous();
    at::Tensor gg = at::empty(g.sizes(), g.options()), gu = at::empty(u.sizes(), u.options());
    const float *dp = gy.data_ptr<float>(), *gp = g.data_ptr<float>(), *up_ = u.data_ptr<float>();
    float *ggp = gg.data_ptr<float>(), *gup = gu.data_ptr<float>();
    at::parallel_for(0, g.numel(), kElemGrain, [&](int64_t b, int64_t end) {
      vtk_swiglu_bwd(dp, gp, up_, ggp, gup, b, end);
    });
    return {gg, gu};
  }
};

// ---------------------------------------------------------------------------------- RoPE
// x: [b, t, heads, d]; cos, sin: [cb, t, d], cb = 1 or b. Only cos and sin are kept for
// backward (the map is linear in x).
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y,
               bool inverse) {
  const int64_t b = x.size(0), t = x.size(1), heads = x.size(2), d = x.size(3);
  const int64_t cb = cos.size(0);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, b * t, grain_rows(heads * d), [&](int64_t r0, int64_t r1) {
    vtk_rope(xp, cp, sp, yp, r0, r1, t, cb, heads, d, inverse ? 1 : 0);
  });
}

struct Rope : public torch::autograd::Function<Rope> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos,
                            const at::Tensor& sin) {
    at::Tensor xc = x.contiguous(), c = cos.contiguous(), s = sin.contiguous();
    at::Tensor y = at::empty(xc.sizes(), xc.options());
    rope_rows(xc, c, s, y, false);
    ctx->save_for_backward({c, s});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    once_differentiable("fused rope");
    if (!grads[0].defined()) {
      return {at::Tensor(), at::Tensor(), at::Tensor()};
    }
    auto saved = ctx->get_saved_variables();
    const at::Tensor gy = grads[0].contiguous();
    at::Tensor gx = at::empty(gy.sizes(), gy.options());
    rope_rows(gy, saved[0], saved[1], gx, true);
    return {gx, at::Tensor(), at::Tensor()};
  }
};

// ------------------------------------------------------------- LM head + cross-entropy
// loss = scale * sum_r CE(h_r W^T, target_r), in chunks of rows: each chunk's logits are
// computed, overwritten in place by their gradient (softmax - onehot, times scale), multiplied
// into the gradients of h (its rows) and W (accumulated), and dropped before the next chunk,
// so at most one chunk of [rows, vocab] logits is ever alive (kCeChunkBytes; the whole
// [n, vocab] fp32 logits are 200 MiB for 1024 tokens of a 49k vocabulary, and the largest
// transient of a QLoRA step). The gradients are formed in forward (the loss ends the graph, so
// nothing else can change them) and handed over in backward, times its incoming gradient.
//
// A chunk also streams the whole [vocab, k] W through its two products, so a chunk of few rows
// turns them into matrix-vector-like products bound by reading W: Gemma 2's 256k x 2304 head
// (2.4 GB) in 32 MiB chunks is 32 rows, and 127 tokens read it 8 times, which made the fused
// soft-capped head 1.5x slower than the unfused chain (7.3 s against 4.8 s per forward +
// backward, 2 threads; one chunk: 3.7 s). So a chunk has at least k / 8 rows (its logits at
// least 1/8 of W's size) unless that is more than kCeChunkMaxBytes of logits.
constexpr int64_t kCeChunkBytes = int64_t{32} << 20;
constexpr int64_t kCeChunkMaxBytes = int64_t{256} << 20;

struct CeRows {
  at::Tensor gh, gw;  // gradients of h and W (scaled), when asked for
  double loss_sum;    // unscaled
};

// `chunk_rows` 0 picks about kCeChunkBytes of logits per chunk, or k / 8 rows where that is more
// (up to kCeChunkMaxBytes), and at least 16 rows.
// `cap` > 0 soft-caps each chunk of logits (cap * tanh(z / cap)) before the cross-entropy.
CeRows ce_rows(const at::Tensor& h, const at::Tensor& w, const at::Tensor& targets,
               int64_t ignore, double scale, double cap, bool want_gh, bool want_gw,
               int64_t chunk_rows) {
  const int64_t n = h.size(0), v = w.size(0);
  if (chunk_rows <= 0) {
    const int64_t row_bytes = 4 * std::max<int64_t>(1, v);
    const int64_t reuse = std::min<int64_t>(w.size(1) / 8, kCeChunkMaxBytes / row_bytes);
    chunk_rows = std::max<int64_t>({16, kCeChunkBytes / row_bytes, reuse});
  }
  const bool grad = want_gh || want_gw;
  at::Tensor loss = at::empty({n}, h.options().dtype(at::kDouble));
  at::Tensor gh = want_gh ? at::empty_like(h, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor gw;
  const int64_t* tp = targets.data_ptr<int64_t>();
  double* lossp = loss.data_ptr<double>();
  const float s = static_cast<float>(scale);
  const float fcap = cap > 0.0 ? static_cast<float>(cap) : 0.0f;
  const at::Tensor wt = w.t();
  for (int64_t c0 = 0; c0 < n; c0 += chunk_rows) {
    const int64_t m = std::min(chunk_rows, n - c0);
    const at::Tensor hc = h.narrow(0, c0, m);
    at::Tensor logits = at::mm(hc, wt);
    float* lp = logits.data_ptr<float>();
    std::atomic<int64_t> bad{-1};
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
      const int64_t r =
          vtk_ce_rows(lp, tp + c0, lossp + c0, r0, r1, v, ignore, s, fcap, grad ? 1 : 0);
      if (r >= 0) {
        bad.store(r);
      }
    });
    const int64_t r = bad.load();
    TORCH_CHECK(r < 0, "target ", (r < 0 ? 0 : tp[c0 + r]), " at row ", c0 + r,
                " is outside the vocabulary [0, ", v, ")");
    if (want_gh) {
      at::Tensor ghc = gh.narrow(0, c0, m);
      at::mm_out(ghc, logits, w);
    }
    if (want_gw) {
      if (gw.defined()) {
        gw.addmm_(logits.t(), hc);
      } else {
        gw = at::mm(logits.t(), hc);
      }
    }
  }
  return {gh, gw, loss.sum().item<double>()};
}

struct LinearCe : public torch::autograd::Function<LinearCe> {
  // Returns {scale * loss_sum, loss_sum}; the second output is for reporting only.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& w,
                               const at::Tensor& targets, int64_t ignore, double scale,
                               double cap, int64_t chunk_rows) {
    at::Tensor hc = h.contiguous();
    CeRows out = ce_rows(hc, w, targets, ignore, scale, cap, h.requires_grad(),
                         w.requires_grad(), chunk_rows);
    if (out.gh.defined()) {
      ctx->saved_data["grad_h"] = out.gh;
    }
    if (out.gw.defined()) {
      ctx->saved_data["grad_w"] = out.gw;
    }
    ctx->saved_data["pending"] = true;
    at::Tensor unscaled = at::scalar_tensor(out.loss_sum, h.options().dtype(at::kDouble));
    ctx->mark_non_differentiable({unscaled});
    return {at::scalar_tensor(out.loss_sum * scale, h.options()), unscaled};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    once_differentiable("fused cross-entropy");
    auto take = [&](const char* key) -> at::Tensor {
      auto it = ctx->saved_data.find(key);
      if (it == ctx->saved_data.end()) {
        return at::Tensor();
      }
      at::Tensor t = it->second.toTensor();
      ctx->saved_data.erase(it);
      return t;
    };
    TORCH_CHECK(ctx->saved_data.count("pending") == 1,
                "fused cross-entropy: backward ran twice (retain_graph is not supported)");
    ctx->saved_data.erase("pending");
    at::Tensor gh = take("grad_h"), gw = take("grad_w");
    if (grads[0].defined()) {
      const double g = grads[0].item<double>();
      if (g != 1.0) {
        if (gh.defined()) gh.mul_(g);
        if (gw.defined()) gw.mul_(g);
      }
    } else {
      gh = at::Tensor();
      gw = at::Tensor();
    }
    return {gh, gw, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor& deref(at::Tensor* t, const char* name) {
  if (t == nullptr || !t->defined()) {
    throw std::invalid_argument(std::string(name) + " is undefined");
  }
  return *t;
}

}  // namespace

extern "C" {

// y = weight * (x * rsqrt(mean(x^2, -1) + eps)), x [..., h] and weight [h], both fp32 on CPU.
int vt_fused_rms_norm(at::Tensor* x, at::Tensor* weight, double eps, at::Tensor** out,
                      char** err) {
  return guarded(err, "fused rms_norm", [&] {
    const at::Tensor& xs = deref(x, "x");
    const at::Tensor& ws = deref(weight, "weight");
    check_f32_cpu(xs, "x");
    check_f32_cpu(ws, "weight");
    TORCH_CHECK(xs.dim() >= 1 && ws.dim() == 1 && ws.size(0) == xs.size(-1),
                "weight ", ws.sizes(), " does not match the last dimension of x ", xs.sizes());
    *out = new at::Tensor(RmsNorm::apply(xs, ws, eps));
  });
}

// silu(gate) * up, same shapes, fp32 on CPU.
int vt_fused_swiglu(at::Tensor* gate, at::Tensor* up, at::Tensor** out, char** err) {
  return guarded(err, "fused swiglu", [&] {
    const at::Tensor& g = deref(gate, "gate");
    const at::Tensor& u = deref(up, "up");
    check_f32_cpu(g, "gate");
    check_f32_cpu(u, "up");
    TORCH_CHECK(g.sizes() == u.sizes(), "gate ", g.sizes(), " and up ", u.sizes(), " differ");
    *out = new at::Tensor(SwiGlu::apply(g, u));
  });
}

// x * cos + rotate_half(x) * sin with x [b, t, heads, d] and cos, sin [1 or b, t, d].
int vt_fused_rope(at::Tensor* x, at::Tensor* cos, at::Tensor* sin, at::Tensor** out,
                  char** err) {
  return guarded(err, "fused rope", [&] {
    const at::Tensor& xs = deref(x, "x");
    const at::Tensor& c = deref(cos, "cos");
    const at::Tensor& s = deref(sin, "sin");
    check_f32_cpu(xs, "x");
    check_f32_cpu(c, "cos");
    check_f32_cpu(s, "sin");
    TORCH_CHECK(xs.dim() == 4, "x must be [batch, seq, heads, head_dim], got ", xs.sizes());
    TORCH_CHECK(c.dim() == 3 && c.sizes() == s.sizes() && c.size(1) == xs.size(1) &&
                    c.size(2) == xs.size(3) && (c.size(0) == 1 || c.size(0) == xs.size(0)),
                "cos/sin ", c.sizes(), " do not fit x ", xs.sizes());
    TORCH_CHECK(xs.size(3) % 2 == 0, "head_dim must be even, got ", xs.size(3));
    TORCH_CHECK(!c.requires_grad() && !s.requires_grad(),
                "cos/sin must not require grad (the fused rope has no gradient for them)");
    *out = new at::Tensor(Rope::apply(xs, c, s));
  });
}

// Summed cross-entropy of logits h W^T against `targets` (rows equal to `ignore` skipped),
// times `scale`, in `*out`; the unscaled sum in `*loss_sum`. Without grad mode (or when
// neither h nor W needs a gradient) no graph is built and the logits' gradient is not formed.
// The logits are formed `chunk_rows` rows at a time (0: about 32 MiB of them, see ce_rows).
// `cap` > 0 soft-caps the logits first (cap * tanh(logits / cap)); 0 leaves them as they are.
int vt_fused_linear_ce(at::Tensor* h, at::Tensor* w, at::Tensor* targets, int64_t ignore,
                       double scale, double cap, int64_t chunk_rows, at::Tensor** out,
                       double* loss_sum, char** err) {
  return guarded(err, "fused cross-entropy", [&] {
    const at::Tensor& hs = deref(h, "hidden");
    const at::Tensor& ws = deref(w, "weight");
    const at::Tensor& ts = deref(targets, "targets");
    check_f32_cpu(hs, "hidden");
    check_f32_cpu(ws, "weight");
    TORCH_CHECK(hs.dim() == 2 && ws.dim() == 2 && hs.size(1) == ws.size(1),
                "hidden ", hs.sizes(), " and weight ", ws.sizes(), " do not fit ([n, k], [v, k])");
    TORCH_CHECK(std::isfinite(cap) && cap >= 0.0,
                "the logit soft-cap must be a finite number >= 0 (0: none), got ", cap);
    TORCH_CHECK(ts.scalar_type() == at::kLong && ts.dim() == 1 && ts.size(0) == hs.size(0) &&
                    ts.device().is_cpu(),
                "targets must be int64 [", hs.size(0), "] on the CPU, got ", ts.scalar_type(),
                " ", ts.sizes());
    const at::Tensor tc = ts.contiguous();
    const bool graph =
        at::GradMode::is_enabled() && (hs.requires_grad() || ws.requires_grad());
    if (graph) {
      variable_list r = LinearCe::apply(hs, ws, tc, ignore, scale, cap, chunk_rows);
      *loss_sum = r[1].item<double>();
      *out = new at::Tensor(r[0]);
    } else {
      at::NoGradGuard no_grad;
      CeRows r =
          ce_rows(hs.contiguous(), ws, tc, ignore, scale, cap, false, false, chunk_rows);
      *loss_sum = r.loss_sum;
      *out = new at::Tensor(at::scalar_tensor(r.loss_sum * scale, hs.options()));
    }
  });
}

// Drops `param.grad` (PyTorch's `zero_grad(set_to_none=True)`): the next backward then hands
// its gradient over instead of adding it into a zeroed buffer.
int vt_clear_grad(at::Tensor* param, char** err) {
  return guarded(err, "clear_grad", [&] {
    if (param == nullptr || !param->defined()) {
      throw std::invalid_argument("undefined tensor");
    }
    param->mutable_grad().reset();
  });
}

// One AdamW step of one contiguous parameter through libtorch's fused CPU kernel (what
// `torch.optim.AdamW(fused=True)` runs): one pass over parameter, gradient and moments.
// `step` is the parameter's update count including this one; `max_exp_avg_sq` is null
// unless AMSGrad.
int vt_fused_adamw(at::Tensor* param, at::Tensor* grad, at::Tensor* exp_avg, at::Tensor* exp_avg_sq,
                   at::Tensor* max_exp_avg_sq, double step, double lr, double beta1, double beta2,
                   double weight_decay, double eps, char** err) {
  return guarded(err, "fused_adamw", [&] {
    if (param == nullptr || grad == nullptr || exp_avg == nullptr || exp_avg_sq == nullptr) {
      throw std::invalid_argument("null tensor");
    }
    const bool amsgrad = max_exp_avg_sq != nullptr;
    std::vector<at::Tensor> p{*param}, g{*grad}, m{*exp_avg}, v{*exp_avg_sq}, vm;
    if (amsgrad) {
      vm.push_back(*max_exp_avg_sq);
    }
    std::vector<at::Tensor> steps{at::scalar_tensor(step, at::TensorOptions().dtype(at::kFloat))};
    at::NoGradGuard no_grad;
    at::_fused_adamw_(p, g, m, v, vm, steps, lr, beta1, beta2, weight_decay, eps, amsgrad, false);
  });
}

}  // extern "C"
