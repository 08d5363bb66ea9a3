#pragma once
// exp(x) in double with the same bits on the host and on a CUDA device, and vectorisable by the host
// compiler. The block masses the engine computes from block statistics (and the device ranks by) go
// through it: with each side's own libm exp they agreed only as far as the two libraries happened to,
// and the host's scalar calls were most of a token-level view's cost.
//
// Every step is one IEEE operation (multiplications, fused multiply-adds, rint, exact scalings by
// powers of two), so any conforming host or device rounds alike. Accuracy: within 1 ulp of exp (worst
// seen 0.87; tests/test_common.cpp measures it against long double), exp(-inf) = 0, exp(+inf) = +inf,
// NaN in NaN out, underflow to subnormals and 0, overflow to +inf. Speed needs the CPU's fused
// multiply-add instruction (the default -march=native build on any x86 CPU since 2013): built without
// it (-DHYSPARSE_NATIVE=OFF) every fma is a library call, about 7x libm's exp.
#include <cmath>
#include <cstdint>
#include <cstring>

// Always inlined: a loop over blocks is vectorised only with the function's body in it.
#if defined(__CUDACC__)
#define HYSPARSE_HOST_DEVICE_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define HYSPARSE_HOST_DEVICE_INLINE inline __attribute__((always_inline))
#else
#define HYSPARSE_HOST_DEVICE_INLINE inline
#endif

namespace hysparse {
namespace portable_exp_detail {

// 2^k for an integer-valued k in [-1022, 1023], built from its exponent bits. k + 1023 + 2^52 holds the
// biased exponent in its low mantissa bits, which a shift moves into place: double arithmetic and one
// 64-bit shift, which AVX2 has in vector form (unlike a double-to-int64 conversion), so that loops over
// blocks vectorise on x86 CPUs without AVX-512 too.
HYSPARSE_HOST_DEVICE_INLINE double power_of_two(double k) {
  const double biased = (k + 1023.0) + 4503599627370496.0;  // + 2^52: exact for the integers in range
  std::uint64_t bits;
  std::memcpy(&bits, &biased, sizeof bits);
  bits <<= 52;
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace portable_exp_detail

HYSPARSE_HOST_DEVICE_INLINE double portable_exp(double x) {
#if !defined(__CUDA_ARCH__)
  using std::fma;
  using std::rint;
  using std::trunc;
#endif
  constexpr double kLog2E = 1.4426950408889634074;
  // ln 2 split so that k * kLn2High is exact for |k| < 2^11 (its low 32 bits are zero).
  constexpr double kLn2High = 6.93147180369123816490e-01;
  constexpr double kLn2Low = 1.90821492927058770002e-10;
  // Outside [-746, 710] exp is 0 or +inf in double; clamping keeps k in range (NaN clamps too and is
  // restored at the end).
  const double clamped = x > 710.0 ? 710.0 : (x >= -746.0 ? x : -746.0);
  const double k = rint(clamped * kLog2E);
  // x = k ln 2 + r, |r| <= ln(2) / 2 (plus rounding).
  double r = fma(-k, kLn2High, clamped);
  r = fma(-k, kLn2Low, r);
  // exp(r) by its Taylor series to degree 13 (the remainder is below 1e-17 relative), Horner's rule.
  double p = 1.0 / 6227020800.0;
  p = fma(p, r, 1.0 / 479001600.0);
  p = fma(p, r, 1.0 / 39916800.0);
  p = fma(p, r, 1.0 / 3628800.0);
  p = fma(p, r, 1.0 / 362880.0);
  p = fma(p, r, 1.0 / 40320.0);
  p = fma(p, r, 1.0 / 5040.0);
  p = fma(p, r, 1.0 / 720.0);
  p = fma(p, r, 1.0 / 120.0);
  p = fma(p, r, 1.0 / 24.0);
  p = fma(p, r, 1.0 / 6.0);
  p = fma(p, r, 0.5);
  p = fma(p, r, 1.0);
  p = fma(p, r, 1.0);
  // Times 2^k in two exact halves (k / 2 rounded toward zero, and the rest), each a normal power of two;
  // only the second product rounds (to a subnormal, 0 or +inf where exp does).
  const double half = trunc(k * 0.5);
  const double value = p * portable_exp_detail::power_of_two(half) * portable_exp_detail::power_of_two(k - half);
  return x == x ? value : x;
}

}  // namespace hysparse
