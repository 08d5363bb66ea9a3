#pragma once
// The share of one key in a query row's attention, from fp32 q and k, with the same bits on the host and
// on a CUDA device: the replay computes forced keys (sinks, windows) and the keys of blocks they cut one
// by one, on whichever side holds the keys (Backend::key_run_shares), and reports must not depend on which.
#include <cstdint>

#include "common/portable_exp.hpp"

#if !defined(__CUDA_ARCH__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HYSPARSE_KEY_DOT_AVX 1
#endif

namespace hysparse {

// q . k over d channels in fp32: eight running sums (channel c into sum c mod 8, each step one fused
// multiply-add), combined as ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7)). One 8-wide register on a
// host with AVX2 and FMA (written out: compilers leave the scalar form scalar), the same steps one by one on
// a device thread or another host.
HYSPARSE_HOST_DEVICE_INLINE float key_dot(const float* q, const float* k, std::int64_t d) {
#if defined(HYSPARSE_KEY_DOT_AVX)
  __m256 sums = _mm256_setzero_ps();
  std::int64_t c = 0;
  for (; c + 8 <= d; c += 8) sums = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(k + c), sums);
  if (c < d) {
    // The last d mod 8 channels, into their lanes only (the others keep their sums, bit for bit).
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(d - c)), lanes);
    const __m256 tail = _mm256_fmadd_ps(_mm256_maskload_ps(q + c, mask), _mm256_maskload_ps(k + c, mask), sums);
    sums = _mm256_blendv_ps(sums, tail, _mm256_castsi256_ps(mask));
  }
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1));  // s_i + s_{i+4}
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));  // (s0+s4)+(s2+s6), (s1+s5)+(s3+s7)
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
#else
#if defined(__CUDA_ARCH__)
#define HYSPARSE_KEY_DOT_FMA(a, b, c) __fmaf_rn(a, b, c)
#else
#define HYSPARSE_KEY_DOT_FMA(a, b, c) std::fma(a, b, c)
#endif
  float s[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  std::int64_t c = 0;
  for (; c + 8 <= d; c += 8) {
    for (int lane = 0; lane < 8; ++lane) s[lane] = HYSPARSE_KEY_DOT_FMA(q[c + lane], k[c + lane], s[lane]);
  }
  // The last d mod 8 channels (a loop of constant bounds, so that s stays in registers on a device).
  for (int lane = 0; lane < 8; ++lane) {
    if (c + lane < d) s[lane] = HYSPARSE_KEY_DOT_FMA(q[c + lane], k[c + lane], s[lane]);
  }
#undef HYSPARSE_KEY_DOT_FMA
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
#endif
}

// exp(scale * q . k - lse_tokens): the key's probability over the row's token mass (sinks excluded), the
// logit's product and difference one fused multiply-add.
HYSPARSE_HOST_DEVICE_INLINE double key_share(const float* q, const float* k, std::int64_t d, double scale, double lse_tokens) {
#if defined(__CUDA_ARCH__)
  return portable_exp(__fma_rn(scale, static_cast<double>(key_dot(q, k, d)), -lse_tokens));
#else
  return portable_exp(std::fma(scale, static_cast<double>(key_dot(q, k, d)), -lse_tokens));
#endif
}

}  // namespace hysparse
