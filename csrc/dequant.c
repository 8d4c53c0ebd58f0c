/*
 * 4-bit (NF4 / FP4) blockwise dequantization on the CPU: out[i] = code[nibble(i)] * absmax[block],
 * in fp32, the element with the even index in the high nibble of its byte (bitsandbytes' layout,
 * src/quant/nf4.rs). csrc/qlinear.cpp holds the glue (threading, shapes) and calls this.
 *
 * Built with kernels.c (same flags: -mavx2 -mfma on x86-64, see build.rs); the Rust side calls
 * it only after checking the CPU for AVX2 and FMA. The AVX2 loop does exactly the scalar loop's
 * products: it scales the 16-value code table by the block's absmax (the same 16 fp32
 * multiplications) and then only selects values, so both paths give the same bits.
 */

#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VT_AVX2 1
#endif

/* Blocks [b0, b1) of `bs` values (bs even; a multiple of 16 takes the vector loop): reads
 * bs / 2 bytes of `packed` and one absmax per block, writes bs floats per block to `out`.
 * All pointers are to the start of the whole tensor. */
void vtk_dequant_4bit(const uint8_t* packed, const float* absmax, const float* code, float* out,
                      int64_t b0, int64_t b1, int64_t bs) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = packed + b * (bs / 2);
    float* o = out + b * bs;
    const float a = absmax[b];
    int64_t i = 0; /* bytes done */
#ifdef VT_AVX2
    if (bs % 16 == 0) {
      const __m256 av = _mm256_set1_ps(a);
      const __m256 tlo = _mm256_mul_ps(_mm256_loadu_ps(code), av);
      const __m256 thi = _mm256_mul_ps(_mm256_loadu_ps(code + 8), av);
      const __m256i fifteen = _mm256_set1_epi32(15);
      for (; i + 8 <= bs / 2; i += 8) {
        /* 8 bytes -> 8 int32 -> high and low nibbles, interleaved in element order */
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + i)));
        const __m256i hi = _mm256_srli_epi32(v, 4);
        const __m256i lo = _mm256_and_si256(v, fifteen);
        const __m256i a0 = _mm256_unpacklo_epi32(hi, lo); /* h0 l0 h1 l1 | h4 l4 h5 l5 */
        const __m256i a1 = _mm256_unpackhi_epi32(hi, lo); /* h2 l2 h3 l3 | h6 l6 h7 l7 */
        const __m256i i0 = _mm256_permute2x128_si256(a0, a1, 0x20);
        const __m256i i1 = _mm256_permute2x128_si256(a0, a1, 0x31);
        /* table lookup: low 3 bits select within a half, bit 3 (moved to the sign) the half */
        const __m256 r0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i0),
                                           _mm256_permutevar8x32_ps(thi, i0),
                                           _mm256_castsi256_ps(_mm256_slli_epi32(i0, 28)));
        const __m256 r1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, i1),
                                           _mm256_permutevar8x32_ps(thi, i1),
                                           _mm256_castsi256_ps(_mm256_slli_epi32(i1, 28)));
        _mm256_storeu_ps(o + 2 * i, r0);
        _mm256_storeu_ps(o + 2 * i + 8, r1);
      }
    }
#endif
    for (; i < bs / 2; ++i) {
      const uint8_t byte = p[i];
      o[2 * i] = code[byte >> 4] * a;
      o[2 * i + 1] = code[byte & 15] * a;
    }
  }
}

/* The scalar loop alone (for the parity test of the vector loop). */
void vtk_dequant_4bit_scalar(const uint8_t* packed, const float* absmax, const float* code,
                             float* out, int64_t b0, int64_t b1, int64_t bs) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint8_t* p = packed + b * (bs / 2);
    float* o = out + b * bs;
    const float a = absmax[b];
    for (int64_t i = 0; i < bs / 2; ++i) {
      const uint8_t byte = p[i];
      o[2 * i] = code[byte >> 4] * a;
      o[2 * i + 1] = code[byte & 15] * a;
    }
  }
}
