/*
 * Channel kernels of the fused selective scan (csrc/ssm.cpp holds the autograd glue).
 *
 * The scan of transformers' `mamba_selective_scan` (its PyTorch path, models/mamba and
 * models/jamba in transformers 5.23), per channel d of batch row b, with state size N:
 *
 *   delta_t = softplus(dt_t + bias)                       (threshold 20, as F.softplus)
 *   h_t[n]  = exp(delta_t A[n]) h_{t-1}[n] + (delta_t B_t[n]) u_t,   h_{-1} = 0
 *   y_t     = (sum_n h_t[n] C_t[n] + D u_t) * silu(z_t)
 *
 * Layouts (fp32, contiguous): u, dt, z, y and their gradients [batch, d, T]; B, C [batch, T, N];
 * A [d, N]; D, bias [d]. One call handles the channels [c0, c1) of every batch row, so the
 * per-channel gradients (A, D, bias) have one writer; the caller gives each call its own
 * [batch, T, N] accumulators for the gradients of B and C and sums them afterwards.
 *
 * Backward keeps nothing from forward but the inputs: it re-runs the channel's recurrence into
 * a T x N buffer (16 KiB for T = 256, N = 16), then walks it backwards.
 *
 * Same build rules as kernels.c (compiled alone with -mavx2 -mfma on x86-64; exp on 8 lanes is
 * SLEEF's Sleef_expf8_u10 from libtorch_cpu).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#include <sleef.h>
#define VT_AVX2 1
#endif

/* out[i] = exp(s * a[i]) for i < n. */
static void exp_scaled(const float* a, float s, float* out, int64_t n) {
  int64_t i = 0;
#ifdef VT_AVX2
  const __m256 sv = _mm256_set1_ps(s);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i, Sleef_expf8_u10(_mm256_mul_ps(_mm256_loadu_ps(a + i), sv)));
  }
#endif
  for (; i < n; ++i) out[i] = expf(s * a[i]);
}

static inline float softplus20(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static inline float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }

/* Runs the recurrence of one channel; h_all (T x N) receives every state when not null.
 * Returns nothing; writes y (T) when not null. `da` is N floats of scratch, `h` N floats. */
static void channel_forward(const float* u, const float* dt, const float* z, const float* B,
                            const float* C, const float* A, float D, float bias, float* y,
                            float* h_all, float* h, float* da, int64_t T, int64_t N) {
  memset(h, 0, (size_t)N * sizeof(float));
  for (int64_t t = 0; t < T; ++t) {
    const float delta = softplus20(dt[t] + bias);
    const float ut = u[t];
    const float* Bt = B + t * N;
    const float* Ct = C + t * N;
    exp_scaled(A, delta, da, N);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      const float hn = da[n] * h[n] + (delta * Bt[n]) * ut;
      h[n] = hn;
      acc += hn * Ct[n];
    }
    if (h_all != NULL) memcpy(h_all + t * N, h, (size_t)N * sizeof(float));
    if (y != NULL) {
      const float zt = z[t];
      y[t] = (acc + ut * D) * (zt * sigmoid1(zt));
    }
  }
}

void vtk_ssm_fwd(const float* u, const float* dt, const float* z, const float* B, const float* C,
                 const float* A, const float* D, const float* bias, float* y, int64_t nb,
                 int64_t nd, int64_t T, int64_t N, int64_t c0, int64_t c1) {
  float* scratch = (float*)malloc((size_t)(2 * N) * sizeof(float));
  if (scratch == NULL) return;
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t row = (b * nd + c) * T;
      channel_forward(u + row, dt + row, z + row, B + b * T * N, C + b * T * N, A + c * N, D[c],
                      bias[c], y + row, NULL, scratch, scratch + N, T, N);
    }
  }
  free(scratch);
}

/* Gradients of the channels [c0, c1): gu, gdt, gz rows; gA, gD, gbias of those channels
 * (overwritten, summed over batch rows); gB_acc, gC_acc ([nb, T, N], added to). Returns 0, or
 * -1 when the scratch buffer could not be allocated. */
int vtk_ssm_bwd(const float* gy, const float* u, const float* dt, const float* z, const float* B,
                const float* C, const float* A, const float* D, const float* bias, float* gu,
                float* gdt, float* gz, float* gA, float* gD, float* gbias, float* gB_acc,
                float* gC_acc, int64_t nb, int64_t nd, int64_t T, int64_t N, int64_t c0,
                int64_t c1) {
  float* buf = (float*)malloc((size_t)(T * N + 4 * N) * sizeof(float));
  if (buf == NULL) return -1;
  float* h_all = buf;
  float* h = buf + T * N;
  float* da = h + N;
  float* gh = da + N;
  float* gAc = gh + N;
  for (int64_t c = c0; c < c1; ++c) {
    const float* Ac = A + c * N;
    const float Dc = D[c], bc = bias[c];
    float gDc = 0.0f, gbc = 0.0f;
    memset(gAc, 0, (size_t)N * sizeof(float));
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t row = (b * nd + c) * T;
      const float* Bb = B + b * T * N;
      const float* Cb = C + b * T * N;
      float* gBb = gB_acc + b * T * N;
      float* gCb = gC_acc + b * T * N;
      channel_forward(u + row, dt + row, z + row, Bb, Cb, Ac, Dc, bc, NULL, h_all, h, da, T, N);
      memset(gh, 0, (size_t)N * sizeof(float));
      for (int64_t t = T - 1; t >= 0; --t) {
        const float x = dt[row + t] + bc;
        const float delta = softplus20(x);
        const float ut = u[row + t];
        const float zt = z[row + t];
        const float* Bt = Bb + t * N;
        const float* Ct = Cb + t * N;
        const float* ht = h_all + t * N;
        float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; ++n) acc += ht[n] * Ct[n];
        const float yv = acc + ut * Dc;
        const float sz = sigmoid1(zt);
        const float g = gy[row + t];
        const float gyv = g * (zt * sz);
        gz[row + t] = g * yv * (sz * (1.0f + zt * (1.0f - sz)));
        gDc += gyv * ut;
        float gut = gyv * Dc;
        float gdelta = 0.0f;
        exp_scaled(Ac, delta, da, N);
        float* gBt = gBb + t * N;
        float* gCt = gCb + t * N;
        const float* hp = t > 0 ? h_all + (t - 1) * N : NULL;
#pragma omp simd reduction(+ : gut, gdelta)
        for (int64_t n = 0; n < N; ++n) {
          const float ght = gh[n] + Ct[n] * gyv;
          gCt[n] += ht[n] * gyv;
          const float hprev = hp != NULL ? hp[n] : 0.0f;
          const float ga = ght * hprev * da[n];
          gdelta += ga * Ac[n] + ght * Bt[n] * ut;
          gAc[n] += ga * delta;
          gBt[n] += ght * delta * ut;
          gut += ght * delta * Bt[n];
          gh[n] = ght * da[n];
        }
        const float gx = x > 20.0f ? gdelta : gdelta * sigmoid1(x);
        gdt[row + t] = gx;
        gbc += gx;
        gu[row + t] = gut;
      }
    }
    memcpy(gA + c * N, gAc, (size_t)N * sizeof(float));
    gD[c] = gDc;
    gbias[c] = gbc;
  }
  free(buf);
  return 0;
}
