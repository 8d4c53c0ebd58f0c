// The linear product of a frozen quantized weight (src/quant/qlinear.rs), as one libtorch
// autograd function: forward dequantizes the weight, multiplies and drops it; backward
// dequantizes it again for the input gradient. No dense copy of the weight is kept between the
// two (autograd saves only the packed parts, which the model holds anyway), so a QLoRA step
// holds the packed base plus activations, never a dense base, with or without gradient
// checkpointing. The frozen weight gets no gradient.
//
// Formats (the parts, as src/quant/qlinear.rs passes them):
//   0 four-bit (NF4/FP4): packed uint8 [n/2, 1], code fp32 [16], then either absmax fp32
//     [n/bs] or the double-quantized absmax: codes uint8 [n/bs], absmax2 fp32, code fp32 [256]
//     and `offset`;
//   1 int8: codes int8 [rows, cols], stats fp32 [rows] (row absmax; scale = stats / 127);
//   2 fp8: bits fp8 [rows, cols], scale fp32 [] or [rows, 1] (W = bits / scale). The forward of
//     an FP8 weight multiplies FP8 copies: the caller passes the input quantized to e4m3 with
//     its scale, and the product is `_scaled_mm` on CUDA devices that have it, elsewhere the
//     emulation (the same exact FP8 values widened to fp32, the same scales); backward treats
//     the input's quantization as the identity (straight-through) and returns g (bits / scale).
//
// Dequantization is device-generic libtorch ops, except four-bit on the CPU when `fast` is set
// (the Rust side checked AVX2/FMA): csrc/dequant.c. Both give the same bits
// (code[nibble] * absmax[block] in fp32).
//
// Same rules as fused.cpp: no C++ exception crosses the C ABI (shim_common.h), tensors are
// `at::Tensor*`, returned tensors are new `at::Tensor*` that tch owns.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <initializer_list>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "shim_common.h"

extern "C" {
void vtk_dequant_4bit(const uint8_t* packed, const float* absmax, const float* code, float* out,
                      int64_t b0, int64_t b1, int64_t bs);
void vtk_dequant_4bit_scalar(const uint8_t* packed, const float* absmax, const float* code,
                             float* out, int64_t b0, int64_t b1, int64_t bs);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using vt_shim::guarded;

enum Fmt : int64_t { kFourBit = 0, kInt8 = 1, kFp8 = 2 };

// bitsandbytes' int8 dequantization multiplier 1/127 as the f64 src/quant/int8.rs uses.
constexpr double kInv127 = 7.874015718698502e-3;
constexpr int64_t kNestedBlock = 256;

struct QWeight {
  int64_t fmt = 0, rows = 0, cols = 0, bs = 0;
  double offset = 0.0;
  bool fast = false;
  std::vector<at::Tensor> parts;
};

void check_parts(const QWeight& q) {
  const size_t n = q.parts.size();
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(q.parts[i].defined(), "quantized weight part ", i, " is undefined");
  }
  switch (q.fmt) {
    case kFourBit: {
      TORCH_CHECK(n == 3 || n == 5, "four-bit weight needs 3 or 5 parts, got ", n);
      const int64_t numel = q.rows * q.cols;
      TORCH_CHECK(q.bs > 0 && q.bs % 2 == 0 && numel % q.bs == 0, "four-bit block size ", q.bs,
                  " does not divide ", numel, " values");
      TORCH_CHECK(q.parts[0].scalar_type() == at::kByte && q.parts[0].numel() == numel / 2,
                  "four-bit packed codes must be uint8 with ", numel / 2, " bytes");
      TORCH_CHECK(q.parts[1].scalar_type() == at::kFloat && q.parts[1].numel() == 16,
                  "four-bit code table must be 16 fp32 values");
      TORCH_CHECK(q.parts[2].numel() == numel / q.bs, "four-bit statistics must have ",
                  numel / q.bs, " values, got ", q.parts[2].numel());
      break;
    }
    case kInt8:
      TORCH_CHECK(n == 2 && q.parts[0].scalar_type() == at::kChar && q.parts[0].dim() == 2 &&
                      q.parts[1].numel() == q.parts[0].size(0),
                  "int8 weight needs int8 codes [rows, cols] and one stat per row");
      break;
    case kFp8:
      TORCH_CHECK(n == 2 && q.parts[0].dim() == 2 &&
                      (q.parts[1].numel() == 1 || q.parts[1].numel() == q.parts[0].size(0)),
                  "fp8 weight needs bits [rows, cols] and one scale or one per row");
      break;
    default:
      TORCH_CHECK(false, "unknown quantized format ", q.fmt);
  }
}

// The fp32 absmax of blocks [b0, b1) (decoding the double-quantized statistics with the same
// elementwise operations as FourBitTensor::absmax in src/quant/nf4.rs).
at::Tensor block_absmax(const QWeight& q, int64_t b0, int64_t b1) {
  if (q.parts.size() == 3) {
    return q.parts[2].reshape({-1}).slice(0, b0, b1);
  }
  const at::Tensor& codes = q.parts[2];
  const at::Tensor& absmax2 = q.parts[3];
  const at::Tensor& code = q.parts[4];
  at::Tensor vals = code.index_select(0, codes.reshape({-1}).slice(0, b0, b1).to(at::kLong));
  at::Tensor which = at::arange(b0, b1, codes.options().dtype(at::kLong)).div(
      kNestedBlock, "floor");
  return vals.mul(absmax2.reshape({-1}).index_select(0, which)).add(q.offset);
}

// block_absmax on the CPU as one loop: the same two fp32 operations per block (product, then
// the offset added), without the five small libtorch ops and their temporaries.
at::Tensor cpu_block_absmax(const QWeight& q, int64_t b0, int64_t b1) {
  if (q.parts.size() == 3) {
    return block_absmax(q, b0, b1).contiguous();
  }
  const at::Tensor codes = q.parts[2].reshape({-1}).contiguous();
  const at::Tensor absmax2 = q.parts[3].reshape({-1}).contiguous();
  const at::Tensor code = q.parts[4].contiguous();
  TORCH_CHECK(codes.device().is_cpu() && absmax2.device().is_cpu() && code.device().is_cpu() &&
                  absmax2.scalar_type() == at::kFloat && code.scalar_type() == at::kFloat &&
                  code.numel() == 256 && absmax2.numel() * kNestedBlock >= codes.numel(),
              "double-quantized statistics do not fit");
  at::Tensor out = at::empty({b1 - b0}, absmax2.options());
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const float *a2 = absmax2.data_ptr<float>(), *c2 = code.data_ptr<float>();
  const float off = static_cast<float>(q.offset);
  float* op = out.data_ptr<float>();
  for (int64_t b = b0; b < b1; ++b) {
    const float m = c2[cp[b]] * a2[b / kNestedBlock];
    op[b - b0] = m + off;
  }
  return out;
}

// Rows [r0, r1) of the dense fp32 four-bit weight.
at::Tensor four_bit_rows(const QWeight& q, int64_t r0, int64_t r1) {
  const int64_t s = r0 * q.cols, e = r1 * q.cols, bs = q.bs;
  TORCH_CHECK(s % bs == 0 && e % bs == 0, "rows ", r0, "..", r1, " are not whole blocks of ", bs);
  const int64_t b0 = s / bs, b1 = e / bs;
  at::Tensor bytes = q.parts[0].reshape({-1}).slice(0, s / 2, e / 2);
  const at::Tensor& code = q.parts[1];
  if (q.fast && bytes.device().is_cpu()) {
    at::Tensor absmax = cpu_block_absmax(q, b0, b1);
    at::Tensor bc = bytes.contiguous();
    at::Tensor cc = code.contiguous();
    at::Tensor out = at::empty({e - s}, absmax.options());
    const uint8_t* bp = bc.data_ptr<uint8_t>();
    const float *ap = absmax.data_ptr<float>(), *cp = cc.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, b1 - b0, std::max<int64_t>(1, 16384 / bs), [&](int64_t x0, int64_t x1) {
      vtk_dequant_4bit(bp, ap, cp, op, x0, x1, bs);
    });
    return out.view({r1 - r0, q.cols});
  }
  at::Tensor absmax = block_absmax(q, b0, b1).contiguous();
  at::Tensor hi = bytes.bitwise_right_shift(4);
  at::Tensor lo = bytes.bitwise_and(15);
  at::Tensor idx = at::stack({hi, lo}, 1).reshape({-1}).to(at::kLong);
  return code.index_select(0, idx).view({-1, bs}).mul(absmax.view({-1, 1})).view(
      {r1 - r0, q.cols});
}

// Rows [r0, r1) of the dense weight in `dtype`.
at::Tensor dequant_rows(const QWeight& q, int64_t r0, int64_t r1, at::ScalarType dtype) {
  TORCH_CHECK(0 <= r0 && r0 < r1 && r1 <= q.rows, "rows ", r0, "..", r1, " out of range of ",
              q.rows);
  at::NoGradGuard no_grad;
  at::Tensor out;
  switch (q.fmt) {
    case kFourBit:
      out = four_bit_rows(q, r0, r1);
      break;
    case kInt8:
      out = q.parts[0].slice(0, r0, r1).mul(q.parts[1].reshape({-1, 1}).slice(0, r0, r1)).mul(
          kInv127);
      break;
    default: {
      const at::Tensor& sc = q.parts[1];
      at::Tensor s = sc.numel() == 1 ? sc.reshape({}) : sc.reshape({-1, 1}).slice(0, r0, r1);
      out = q.parts[0].slice(0, r0, r1).to(at::kFloat).div(s);
    }
  }
  return out.scalar_type() == dtype ? out : out.to(dtype);
}

// x2 [m, k] e4m3 with scale xs ([] or [m, 1]) times the FP8 weight's transpose: [m, rows] in
// `out_dtype`. `_scaled_mm` takes the dequantization multipliers (inverse scales).
at::Tensor fp8_product(const QWeight& q, const at::Tensor& xb, const at::Tensor& xs,
                       bool scaled_mm, at::ScalarType out_dtype) {
  at::NoGradGuard no_grad;
  const at::Tensor& wb = q.parts[0];
  at::Tensor inv_x = xs.reciprocal();
  at::Tensor inv_w = q.parts[1].reciprocal();
  inv_w = inv_w.numel() == 1 ? inv_w.reshape({}) : inv_w.reshape({1, -1});
  if (scaled_mm) {
    return at::_scaled_mm(xb, wb.t(), inv_x, inv_w, std::nullopt, std::nullopt, out_dtype,
                          false);
  }
  // the same exact FP8 values in fp32 (products of two FP8 values are exact in fp32), the
  // same multipliers, the same output rounding
  return at::matmul(xb.to(at::kFloat), wb.to(at::kFloat).t()).mul(inv_x).mul(inv_w).to(out_dtype);
}

void save(AutogradContext* ctx, const QWeight& q, at::ScalarType xdtype) {
  ctx->saved_data["fmt"] = q.fmt;
  ctx->saved_data["rows"] = q.rows;
  ctx->saved_data["cols"] = q.cols;
  ctx->saved_data["bs"] = q.bs;
  ctx->saved_data["offset"] = q.offset;
  ctx->saved_data["fast"] = q.fast;
  ctx->saved_data["xdtype"] = static_cast<int64_t>(xdtype);
  ctx->saved_data["parts"] = c10::List<at::Tensor>(q.parts);
}

QWeight load(AutogradContext* ctx) {
  QWeight q;
  q.fmt = ctx->saved_data["fmt"].toInt();
  q.rows = ctx->saved_data["rows"].toInt();
  q.cols = ctx->saved_data["cols"].toInt();
  q.bs = ctx->saved_data["bs"].toInt();
  q.offset = ctx->saved_data["offset"].toDouble();
  q.fast = ctx->saved_data["fast"].toBool();
  const c10::List<at::Tensor> parts = ctx->saved_data["parts"].toTensorList();
  for (size_t i = 0; i < parts.size(); ++i) {
    q.parts.push_back(parts.get(i));
  }
  return q;
}

// The FP8 product's input (not autograd inputs: no gradient flows through the quantization).
struct Fp8In {
  at::Tensor xb, xs;  // x in e4m3 and its scale
  bool scaled_mm = false;
  int64_t out_dtype = 0;
};

struct QLinear : public torch::autograd::Function<QLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const QWeight& q,
                            const Fp8In& f) {
    save(ctx, q, x.scalar_type());
    if (q.fmt == kFp8) {
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = q.rows;
      at::Tensor y =
          fp8_product(q, f.xb, f.xs, f.scaled_mm, static_cast<at::ScalarType>(f.out_dtype))
              .view(shape);
      return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
    }
    at::Tensor w = dequant_rows(q, 0, q.rows, x.scalar_type());
    return at::linear(x, w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(3);
    if (!grads[0].defined()) {
      return out;
    }
    const QWeight q = load(ctx);
    const auto xdtype = static_cast<at::ScalarType>(ctx->saved_data["xdtype"].toInt());
    const at::Tensor& g = grads[0];
    at::Tensor w = dequant_rows(q, 0, q.rows, g.scalar_type());
    at::Tensor gx = at::matmul(g, w);
    out[0] = gx.scalar_type() == xdtype ? gx : gx.to(xdtype);
    return out;
  }
};

at::Tensor& deref(at::Tensor* t, const char* name) {
  if (t == nullptr || !t->defined()) {
    throw std::invalid_argument(std::string(name) + " is undefined");
  }
  return *t;
}

QWeight make(int64_t fmt, at::Tensor** parts, int64_t nparts, int64_t rows, int64_t cols,
             int64_t bs, double offset, int fast) {
  QWeight q;
  q.fmt = fmt;
  q.rows = rows;
  q.cols = cols;
  q.bs = bs;
  q.offset = offset;
  q.fast = fast != 0;
  for (int64_t i = 0; i < nparts; ++i) {
    q.parts.push_back(deref(parts[i], "quantized weight part"));
  }
  check_parts(q);
  return q;
}

at::ScalarType dtype_of(int code) {
  switch (code) {
    case 0:
      return at::kFloat;
    case 1:
      return at::kBFloat16;
    case 2:
      return at::kHalf;
    case 3:
      return at::kDouble;
    default:
      throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  }
}

}  // namespace

extern "C" {

// Rows [r0, r1) of a quantized weight, dense, in dtype `dtype` (0 fp32, 1 bf16, 2 fp16,
// 3 fp64). Never records a gradient.
int vt_qweight_dequant(int64_t fmt, at::Tensor** parts, int64_t nparts, int64_t rows,
                       int64_t cols, int64_t bs, double offset, int fast, int64_t r0, int64_t r1,
                       int dtype, at::Tensor** out, char** err) {
  return guarded(err, "quantized weight dequantize", [&] {
    const QWeight q = make(fmt, parts, nparts, rows, cols, bs, offset, fast);
    *out = new at::Tensor(dequant_rows(q, r0, r1, dtype_of(dtype)));
  });
}

// x [..., cols] times the quantized weight's transpose, with a gradient for x only (see the
// file comment). For fp8 (`fmt` 2), `xb`/`xs` are x (as [m, cols]) in e4m3 and its scale,
// `scaled_mm` picks libtorch's `_scaled_mm`, `out_dtype` the product's dtype code.
int vt_qweight_linear(at::Tensor* x, int64_t fmt, at::Tensor** parts, int64_t nparts,
                      int64_t rows, int64_t cols, int64_t bs, double offset, int fast,
                      at::Tensor* xb, at::Tensor* xs, int scaled_mm, int out_dtype,
                      at::Tensor** out, char** err) {
  return guarded(err, "quantized linear", [&] {
    const at::Tensor& xv = deref(x, "x");
    const QWeight q = make(fmt, parts, nparts, rows, cols, bs, offset, fast);
    TORCH_CHECK(xv.dim() >= 1 && xv.size(-1) == cols, "input ", xv.sizes(),
                " does not fit a weight [", rows, ", ", cols, "]");
    Fp8In f;
    if (fmt == kFp8) {
      f.xb = deref(xb, "fp8 input");
      f.xs = deref(xs, "fp8 input scale");
      TORCH_CHECK(f.xb.dim() == 2 && f.xb.size(1) == cols && f.xb.size(0) * cols == xv.numel(),
                  "fp8 input ", f.xb.sizes(), " does not fit x ", xv.sizes());
      f.scaled_mm = scaled_mm != 0;
      f.out_dtype = static_cast<int64_t>(dtype_of(out_dtype));
    }
    *out = new at::Tensor(QLinear::apply(xv, q, f));
  });
}

// The four-bit CPU kernel on raw buffers, vector loop (`vector` != 0) or scalar loop, for the
// parity test of the two: `packed` uint8, `absmax` and `code` fp32, `out` fp32 of nblocks * bs.
int vt_dequant_4bit_raw(at::Tensor* packed, at::Tensor* absmax, at::Tensor* code, at::Tensor* out,
                        int64_t bs, int vector, char** err) {
  return guarded(err, "four-bit dequantize kernel", [&] {
    const at::Tensor& p = deref(packed, "packed");
    const at::Tensor& a = deref(absmax, "absmax");
    const at::Tensor& c = deref(code, "code");
    at::Tensor& o = deref(out, "out");
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == at::kByte && p.is_contiguous(),
                "packed must be contiguous uint8 on the CPU");
    for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&a, &c, &o}) {
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                  "absmax, code and out must be contiguous fp32 on the CPU");
    }
    const int64_t nb = a.numel();
    TORCH_CHECK(bs > 0 && bs % 2 == 0 && c.numel() == 16 && p.numel() == nb * bs / 2 &&
                    o.numel() == nb * bs,
                "sizes do not fit ", nb, " blocks of ", bs);
    auto f = vector != 0 ? vtk_dequant_4bit : vtk_dequant_4bit_scalar;
    f(p.data_ptr<uint8_t>(), a.data_ptr<float>(), c.data_ptr<float>(), o.data_ptr<float>(), 0,
      nb, bs);
  });
}

}  // extern "C"
