/*
 * Row kernels of VoltTrain's fused CPU training ops (csrc/fused.cpp holds the autograd glue).
 *
 * Plain C on raw fp32 pointers, one call per range of rows [r0, r1): the caller splits rows
 * across threads (at::parallel_for) and owns every buffer. Written in C, with no C++ inline
 * functions that the linker could merge with other translation units, because build.rs compiles
 * this file alone with `-mavx2 -mfma` on x86-64: nothing here may run before the Rust side has
 * checked that the CPU has AVX2 and FMA (`nn::fused::available`).
 *
 * exp() and tanh() are SLEEF's 1-ulp `Sleef_expf8_u10` and `Sleef_tanhf8_u10` (exported by
 * libtorch_cpu, the functions PyTorch's own AVX2 kernels call) on 8 lanes, and libm's expf and
 * tanhf on the tails and on builds without AVX2.
 */

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#define VT_AVX2 1
#endif

/* e[i] = exp(x[i] - shift) for i < n; returns the sum of e (float lanes, then double). */
static double exp_shift_sum(const float* x, float* e, int64_t n, float shift) {
  int64_t i = 0;
  double total = 0.0;
#ifdef VT_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 s = _mm256_set1_ps(shift);
  for (; i + 8 <= n; i += 8) {
    __m256 v = Sleef_expf8_u10(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    if (e) _mm256_storeu_ps(e + i, v);
    acc = _mm256_add_ps(acc, v);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (int k = 0; k < 8; ++k) total += lanes[k];
#endif
  for (; i < n; ++i) {
    float v = expf(x[i] - shift);
    if (e) e[i] = v;
    total += v;
  }
  return total;
}

/* 1 / (1 + exp(-x)) on 8 lanes. */
#ifdef VT_AVX2
static inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_div_ps(one, _mm256_add_ps(one, e));
}
#endif

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

/* ---------------------------------------------------------------- RMSNorm
 * y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps): transformers' LlamaRMSNorm in fp32.
 */
void vtk_rms_fwd(const float* x, const float* w, float* y, float* rstd, int64_t r0, int64_t r1,
                 int64_t h, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * h;
    float* yr = y + r * h;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < h; ++j) ss += xr[j] * xr[j];
    float rs = 1.0f / sqrtf(ss / (float)h + eps);
    rstd[r] = rs;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) yr[j] = w[j] * (xr[j] * rs);
  }
}

/* gx = r * (gy w) - r^3 x mean(gy w x); gw_acc += gy * x * r (when gw_acc is not null). */
void vtk_rms_bwd(const float* gy, const float* x, const float* w, const float* rstd, float* gx,
                 float* gw_acc, int64_t r0, int64_t r1, int64_t h) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = gy + r * h;
    const float* xr = x + r * h;
    float* o = gx + r * h;
    float rs = rstd[r];
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < h; ++j) dot += g[j] * w[j] * xr[j];
    float c = rs * rs * rs * dot / (float)h;
#pragma omp simd
    for (int64_t j = 0; j < h; ++j) o[j] = rs * (g[j] * w[j]) - c * xr[j];
    if (gw_acc) {
#pragma omp simd
      for (int64_t j = 0; j < h; ++j) gw_acc[j] += g[j] * (xr[j] * rs);
    }
  }
}

/* ---------------------------------------------------------------- SwiGLU
 * y = silu(g) * u, silu(g) = g / (1 + exp(-g)) (ATen's silu), over elements [i0, i1).
 */
void vtk_swiglu_fwd(const float* g, const float* u, float* y, int64_t i0, int64_t i1) {
  int64_t i = i0;
#ifdef VT_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= i1; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), gv));
    __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < i1; ++i) y[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* gg = gy u s (1 + g (1 - s)), gu = gy silu(g), s = sigmoid(g) (ATen's silu_backward). */
void vtk_swiglu_bwd(const float* gy, const float* g, const float* u, float* gg, float* gu,
                    int64_t i0, int64_t i1) {
  int64_t i = i0;
#ifdef VT_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; i + 8 <= i1; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    __m256 s = sigmoid8(gv);
    __m256 d = _mm256_loadu_ps(gy + i);
    __m256 silu = _mm256_mul_ps(gv, s);
    _mm256_storeu_ps(gu + i, _mm256_mul_ps(d, silu));
    __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(gg + i, _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(u + i)), ds));
  }
#endif
  for (; i < i1; ++i) {
    float s = sigmoidf(g[i]);
    gu[i] = gy[i] * (g[i] * s);
    gg[i] = gy[i] * u[i] * (s * (1.0f + g[i] * (1.0f - s)));
  }
}

/* ---------------------------------------------------------------- RoPE
 * x, y: [b, t, heads, d] contiguous; cos, sin: [cb, t, d] with cb 1 (shared) or b. Rows are the
 * b*t positions. y = x cos + rotate_half(x) sin, rotate_half(x) = cat(-x2, x1) (transformers).
 * With `inverse`, applies the transpose (the backward): y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1.
 */
void vtk_rope(const float* x, const float* cos_t, const float* sin_t, float* y, int64_t r0,
              int64_t r1, int64_t t, int64_t cb, int64_t heads, int64_t d, int inverse) {
  int64_t half = d / 2;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t bi = r / t, ti = r % t;
    int64_t crow = ((cb == 1) ? ti : bi * t + ti) * d;
    const float* c = cos_t + crow;
    const float* s = sin_t + crow;
    for (int64_t hh = 0; hh < heads; ++hh) {
      const float* xr = x + (r * heads + hh) * d;
      float* yr = y + (r * heads + hh) * d;
      if (!inverse) {
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          yr[j] = xr[j] * c[j] + (-xr[j + half]) * s[j];
          yr[j + half] = xr[j + half] * c[j + half] + xr[j] * s[j + half];
        }
      } else {
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          yr[j] = xr[j] * c[j] + xr[j + half] * s[j + half];
          yr[j + half] = xr[j + half] * c[j + half] - xr[j] * s[j];
        }
      }
    }
  }
}

/* ---------------------------------------------------------------- cross-entropy
 * logits: [n, v]. For each row r in [r0, r1) with target t = targets[r]:
 *   loss[r] = logsumexp(row) - row[t]        (0 when t == ignore)
 * and, when `grad` is set, the row is overwritten in place with its gradient times `scale`:
 *   scale * (softmax(row) - onehot(t))       (zeros when t == ignore).
 * With `cap` > 0 the row is first soft-capped, y = cap * tanh(z / cap) (Gemma's final logit
 * soft-capping), the loss is that of y, and the gradient is taken with respect to z:
 *   scale * (softmax(y) - onehot(t)) * (1 - tanh(z / cap)^2).
 * Returns the index of the first row whose target is out of range, or -1.
 */
static float row_max(const float* row, int64_t v) {
  float m = -INFINITY;
  int64_t j = 0;
#ifdef VT_AVX2
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= v; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + j));
  float lanes[8];
  _mm256_storeu_ps(lanes, mv);
  for (int k = 0; k < 8; ++k) m = lanes[k] > m ? lanes[k] : m;
#endif
  for (; j < v; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

/* One soft-capped row: y = cap * tanh(z / cap), shift m = max(y); returns sum(exp(y - m)). When
 * `g` is set, row[j] becomes exp(y_j - m) * (1 - tanh(z_j / cap)^2) (the softmax numerator times
 * the cap's derivative, before the 1 / sum). */
static double capped_exp_sum(float* row, int64_t v, float cap, float m, int g) {
  const float inv = 1.0f / cap;
  int64_t j = 0;
  double total = 0.0;
#ifdef VT_AVX2
  __m256 acc = _mm256_setzero_ps();
  const __m256 vinv = _mm256_set1_ps(inv), vcap = _mm256_set1_ps(cap), vm = _mm256_set1_ps(m);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (; j + 8 <= v; j += 8) {
    __m256 t = Sleef_tanhf8_u10(_mm256_mul_ps(_mm256_loadu_ps(row + j), vinv));
    __m256 e = Sleef_expf8_u10(_mm256_fmsub_ps(t, vcap, vm));
    acc = _mm256_add_ps(acc, e);
    if (g) _mm256_storeu_ps(row + j, _mm256_mul_ps(e, _mm256_fnmadd_ps(t, t, one)));
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (int k = 0; k < 8; ++k) total += lanes[k];
#endif
  for (; j < v; ++j) {
    float t = tanhf(row[j] * inv);
    float e = expf(t * cap - m);
    total += e;
    if (g) row[j] = e * (1.0f - t * t);
  }
  return total;
}

int64_t vtk_ce_rows(float* logits, const int64_t* targets, double* loss, int64_t r0, int64_t r1,
                    int64_t v, int64_t ignore, float scale, float cap, int grad) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = logits + r * v;
    int64_t tg = targets[r];
    if (tg == ignore) {
      loss[r] = 0.0;
      if (grad) memset(row, 0, (size_t)v * sizeof(float));
      continue;
    }
    if (tg < 0 || tg >= v) return r;
    if (cap > 0.0f) {
      /* tanh is increasing: the capped row's max is the cap of the raw max */
      const float m = cap * tanhf(row_max(row, v) / cap);
      const float tt = tanhf(row[tg] / cap);
      const double sum = capped_exp_sum(row, v, cap, m, grad);
      loss[r] = (double)m + log(sum) - (double)(cap * tt);
      if (grad) {
        float k = (float)((double)scale / sum);
#pragma omp simd
        for (int64_t q = 0; q < v; ++q) row[q] *= k;
        row[tg] -= scale * (1.0f - tt * tt);
      }
      continue;
    }
    float m = row_max(row, v);
    float xt = row[tg];
    double sum = exp_shift_sum(row, grad ? row : NULL, v, m);
    loss[r] = (double)m + log(sum) - (double)xt;
    if (grad) {
      float k = (float)((double)scale / sum);
#pragma omp simd
      for (int64_t q = 0; q < v; ++q) row[q] *= k;
      row[tg] -= scale;
    }
  }
  return -1;
}
